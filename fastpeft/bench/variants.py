"""Pieces the op modules build their variants from."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .. import backends
from .case import Variants

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype(device: str) -> str:
    """The quick cases' dtype: what each device computes natively."""
    return "fp32" if device == "cpu" else "bf16"


def speed_faces(device: str) -> list[str]:
    """The fast faces worth timing on `device` (the Triton interpreter is a test tool, not a speed)."""
    return [f for f in ("triton", "cuda", "cpu")
            if backends.availability(f, torch.device(device)).usable and not (f == "triton" and device == "cpu")]


def on_backend(face: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run():
        with backends.use_backend(face):
            fn()
    return run


def layer_inputs(case, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (requiring a gradient in a training case) and dy [M, N] of a layer case, in its dtype,
    the same values every run."""
    M, K, N = (case.dims[k] for k in "MKN")
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(case.training)
    return x, torch.randn(M, N, generator=gen).to(device, dtype)


def layer_stack(layers: list[nn.Module], x: torch.Tensor, dy: torch.Tensor, training: bool) -> Callable[[], None]:
    """One call runs every layer on x, one after the other: forward and backward from dy when
    training, else the forwards under one no_grad block (entered once, not per layer: a tiny
    layer's call is a few microseconds, and so is entering the block)."""
    def run():
        if training:
            for layer in layers:
                layer(x).backward(dy)
        else:
            with torch.no_grad():
                for layer in layers:
                    layer(x)
    return run


def with_faces(variants: Variants, device: str, reference: bool = True) -> Variants:
    """`variants` plus ``fastpeft[<face>]`` for every fast face usable here, and ``reference`` (the
    pure-PyTorch face) unless told otherwise, each forcing its face on the ``fastpeft`` variant."""
    fastpeft = variants["fastpeft"]
    out = dict(variants)
    out.update({f"fastpeft[{face}]": on_backend(face, fastpeft) for face in speed_faces(device)})
    if reference:
        out["reference"] = on_backend("torch", fastpeft)
    return out


def under_no_grad(variants: Variants) -> Variants:
    """The same variants, each run under torch.no_grad() (serving: no autograd graph is built)."""
    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run
    return {name: no_grad(fn) for name, fn in variants.items()}


def peft_lora_layer(base: nn.Linear, r: int, adapter_names=("default",), use_dora: bool = False):
    """PEFT's LoRA layer (DoRA with `use_dora`) around `base` (shared, not copied) with one adapter
    per name; None without peft."""
    try:
        import peft
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    def config():
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False,
                               use_dora=use_dora)

    model = peft.get_peft_model(Holder(), config(), adapter_name=adapter_names[0])
    for name in adapter_names[1:]:
        model.add_adapter(name, config())
    return model.base_model.model.proj
