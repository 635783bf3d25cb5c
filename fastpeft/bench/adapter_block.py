"""A whole sequential bottleneck adapter block on h (down, activation, up, residual): fastpeft's op
in each face, the unfused reference, and ``x.clone()``, the least any block that reads x and
writes y can cost."""

from __future__ import annotations

import torch

from ..ops.adapter_block import adapter_block
from .case import AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, under_no_grad, with_faces

WITHIN_A_COPY = (Target("fastpeft/copy", AT_MOST, 1.3, "the whole block over copying x (GPU)",
                        "issue 6, Benchmarks"),)


def dims(M: int, D: int, R: int, act: str) -> dict:
    """M tokens, D the hidden size (a sequential block reads h itself: in = out = D), R the bottleneck."""
    return dict(M=M, D=D, R=R, act=act)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", "fwd", default_dtype(device), dims(64, 256, 16, "relu"))]
    if device == "cuda":
        return [Case("rf64", "fwd", "bf16", dims(4096, 4096, 64, "relu"), WITHIN_A_COPY),
                Case("rf16", "fwd", "bf16", dims(4096, 4096, 256, "relu"), WITHIN_A_COPY),
                Case("rf64", "fwd+bwd", "bf16", dims(4096, 4096, 64, "relu"))]
    # CPU: no target was set; the rows say what folding the epilogues into the GEMMs buys.
    return [Case("rf16", "fwd", "fp32", dims(1024, 1024, 64, "relu")),
            Case("rf16", "fwd+bwd", "fp32", dims(1024, 1024, 64, "relu")),
            Case("rf16", "fwd", "fp32", dims(512, 2048, 128, "gelu"))]


def variants(case: Case, device: str) -> Variants:
    M, D, R, act = (case.dims[k] for k in ("M", "D", "R", "act"))
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)
    x = rnd(M, D)
    w_down, b_down = rnd(R, D, scale=D ** -0.5), rnd(R)
    w_up, b_up = rnd(D, R, scale=R ** -0.5), rnd(D)
    if case.training:
        for t in (x, w_down, b_down, w_up, b_up):
            t.requires_grad_(True)
    dy = rnd(M, D)

    def block():
        y = adapter_block(x, x, w_down, b_down, w_up, b_up, 1.0, act)
        if case.training:
            y.backward(dy)

    out = with_faces({"copy": lambda: x.detach().clone(), "fastpeft": block}, device)
    return out if case.training else under_no_grad(out)


BENCH = BenchOp("adapter_block", cases, variants, baseline="copy")
