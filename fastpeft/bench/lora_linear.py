"""One LoRA layer: the base GEMM alone, fastpeft's fused layer, its reference, and PEFT's layer on
the same weights."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import LoRALinear
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, peft_lora_layer, with_faces

ISSUE_2 = "issue 2, Targets"
# The GPU's "≥ 1.3 × faster than PEFT's layer" (issue 2), one target per GPU case.
GPU_VS_PEFT = Target("peft/fastpeft", AT_LEAST, 1.3, "PEFT's layer over fastpeft's: fastpeft 1.3x faster", ISSUE_2)


def dims(M: int, K: int, N: int, r: int) -> dict:
    return dict(M=M, K=K, N=N, r=r)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", mode, default_dtype(device), dims(64, 256, 256, 8)) for mode in ("fwd", "fwd+bwd")]
    if device == "cuda":
        square = dims(4096, 4096, 4096, 16)
        return [
            Case("prefill", "fwd", "bf16", square, (
                Target("fastpeft/base", AT_MOST, 1.05, "fused forward over the base GEMM alone", ISSUE_2),
                GPU_VS_PEFT)),
            Case("training", "fwd+bwd", "bf16", square, (
                Target("fastpeft/base", AT_MOST, 1.10,
                       "fused forward+backward over the base forward + dx GEMMs", ISSUE_2),
                GPU_VS_PEFT)),
            Case("decode", "fwd", "bf16", dims(1, 4096, 4096, 16), (GPU_VS_PEFT,)),
            Case("decode", "fwd", "bf16", dims(16, 4096, 4096, 16), (GPU_VS_PEFT,)),
        ]
    # CPU: the GPU's square 4096³ shape scaled to 1024³ (64x less work: a 4096³ step takes seconds
    # here), and a wider layer with fewer tokens.
    cpu_vs_peft = (Target("fastpeft/peft", AT_MOST, 0.95, "fastpeft's layer over PEFT's, fp32, shapes scaled to fit",
                          ISSUE_2),)
    return [
        Case("prefill", "fwd", "fp32", dims(1024, 1024, 1024, 16), cpu_vs_peft),
        Case("training", "fwd+bwd", "fp32", dims(1024, 1024, 1024, 16), cpu_vs_peft),
        Case("prefill-wide", "fwd", "fp32", dims(512, 2048, 2048, 16)),
        Case("training-wide", "fwd+bwd", "fp32", dims(512, 2048, 2048, 16)),
        Case("decode", "fwd", "fp32", dims(1, 4096, 4096, 16)),
    ]


def variants(case: Case, device: str) -> Variants:
    """One iteration of the case per variant, on shared weights: inference under no_grad, or a
    training step of the layer (forward, then backward from a fixed dy)."""
    M, K, N, r = (case.dims[k] for k in "MKNr")
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(K, N, bias=False)
    peft_layer = peft_lora_layer(base, r)  # wraps the same base module: weights shared
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    layer = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, init_lora_weights=False).to(device, dtype)
    if peft_layer is not None:
        peft_layer = peft_layer.to(device=device, dtype=dtype)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    if case.training:
        x.requires_grad_(True)

    def step(fn):
        def run():
            if case.training:
                fn(x).backward(dy)
            else:
                with torch.no_grad():
                    fn(x)
        return run

    out = with_faces({"base": step(lambda t: F.linear(t, base.weight)), "fastpeft": step(layer)}, device)
    if peft_layer is not None:
        out["peft"] = step(peft_layer)
    return out


BENCH = BenchOp("lora_linear", cases, variants, baseline="base", peers=("peft",))
