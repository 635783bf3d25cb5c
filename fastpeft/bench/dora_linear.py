"""One DoRA layer's training step: fastpeft's DoRA beside fastpeft's LoRA on the same shapes (what
DoRA should cost: issue 17's yardstick), its reference (which forms W + s·B·A), and PEFT's DoRA
layer on the same weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import LoRALinear
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, peft_lora_layer, with_faces

ISSUE_17 = "issue 17, Targets"
TARGETS = (
    Target("fastpeft/lora", AT_MOST, 1.10, "DoRA forward+backward over fastpeft's LoRA forward+backward, same shapes",
           ISSUE_17),
    Target("peft/fastpeft", AT_LEAST, 1.5, "PEFT's DoRA layer over fastpeft's: fastpeft 1.5x faster", ISSUE_17),
)


def dims(M: int, K: int, N: int, r: int) -> dict:
    return dict(M=M, K=K, N=N, r=r)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", "fwd+bwd", default_dtype(device), dims(64, 256, 256, 8))]
    if device == "cuda":
        return [Case("training", "fwd+bwd", "bf16", dims(4096, 4096, 4096, 16), TARGETS),
                Case("training-small-batch", "fwd+bwd", "bf16", dims(256, 4096, 4096, 16), TARGETS)]
    # CPU: lora_linear's training shapes (1024³ and a wider layer with fewer tokens), the square one
    # in bf16, which an AVX512_BF16 CPU computes natively, and a 4096² layer seeing 128 tokens (a
    # micro-batch's share), where PEFT's weight-sized work per step weighs most against the GEMMs.
    return [Case("training", "fwd+bwd", "fp32", dims(1024, 1024, 1024, 16), TARGETS),
            Case("training-wide", "fwd+bwd", "fp32", dims(512, 2048, 2048, 16), TARGETS),
            Case("training", "fwd+bwd", "bf16", dims(1024, 1024, 1024, 16), TARGETS),
            Case("training-short", "fwd+bwd", "bf16", dims(128, 4096, 4096, 16), TARGETS)]


def variants(case: Case, device: str) -> Variants:
    """One training step of the layer per variant (forward, then backward from a fixed dy), every
    layer over the same base weight and the same adapter tensors."""
    M, K, N, r = (case.dims[k] for k in "MKNr")
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(K, N, bias=False)
    peft_layer = peft_lora_layer(base, r, use_dora=True)  # wraps the same base module: weights shared
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    dora = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, init_lora_weights=False, use_dora=True).to(device)
    lora = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, init_lora_weights=False).to(device)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(lora, name)["default"].weight.copy_(getattr(dora, name)["default"].weight)
        if peft_layer is not None:
            peft_layer = peft_layer.to(device=device, dtype=dtype)
            for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                getattr(peft_layer, name)["default"].weight.copy_(getattr(dora, name)["default"].weight)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)

    def step(layer):
        return lambda: layer(x).backward(dy)

    out = with_faces({"lora": step(lora), "fastpeft": step(dora)}, device)
    if peft_layer is not None:
        out["peft"] = step(peft_layer)
    return out


BENCH = BenchOp("dora_linear", cases, variants, baseline="lora", peers=("peft",))
