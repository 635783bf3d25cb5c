"""A PHM layer's training step (Compacter): fastpeft's factored faces, the reference that
materialises W = Σ kron(Aᵢ, Bᵢ), and a trainable ``nn.Linear`` of the same shape (what a dense
projection costs)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import PHMLinear
from .case import AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, with_faces

ISSUE_6 = "issue 6, Benchmarks"
TARGETS = (Target("fastpeft/reference", AT_MOST, 1 / 3, "PHM forward+backward over the materialised reference: "
                  "3x faster", ISSUE_6),
           Target("fastpeft/linear", AT_MOST, 1.0, "PHM forward+backward over a same-shape nn.Linear", ISSUE_6))


def dims(M: int, K: int, N: int, n: int, rank: int | None) -> dict:
    """K in_features, N out_features, n phm_dim; rank: phm_rank of Bᵢ, None for full Bᵢ."""
    return dict(M=M, K=K, N=N, n=n, rank=rank)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", "fwd+bwd", default_dtype(device), dims(64, 256, 256, 4, 1))]
    if device == "cuda":
        return [Case("compacter" if rank else "full-B", "fwd+bwd", "bf16", dims(4096, 4096, 4096, n, rank), TARGETS)
                for n, rank in ((4, 1), (8, 1), (8, None))]
    return [Case("compacter++" if rank else "full-B", "fwd+bwd", "fp32", dims(512, k, k, n, rank), TARGETS)
            for k, n, rank in ((1024, 4, 1), (1024, 8, 1), (2048, 8, 1), (1024, 4, None), (2048, 8, None))]


def variants(case: Case, device: str) -> Variants:
    M, K, N, n, rank = (case.dims[k] for k in ("M", "K", "N", "n", "rank"))
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    layer = PHMLinear(K, N, n, phm_rank=rank).to(device, dtype)
    linear = nn.Linear(K, N).to(device, dtype)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    return with_faces({"linear": lambda: linear(x).backward(dy), "fastpeft": lambda: layer(x).backward(dy)}, device)


BENCH = BenchOp("phm_linear", cases, variants, baseline="linear")
