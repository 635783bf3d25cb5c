"""The one tolerance table every comparison of a face with its reference uses (the test suite, and
the device check's smoke run of every face on a GPU)."""

from __future__ import annotations

import torch

# (rtol, atol) against the reference, atol relative to the largest magnitude of the expected
# tensor (rounding error grows with it). fp32 allows TF32-free accumulation-order differences;
# half types allow a few units in the last place of their 10- and 7-bit mantissas.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """`actual` equals `expected` within the tolerance of `dtype` (default: expected's)."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=msg or None)


def full_precision_reductions() -> None:
    """Make the reference the truth on a GPU: cuBLAS may otherwise reduce a split-K half-precision
    matmul in that half type (torch's default allows it). With it allowed, the reference's bf16
    x·Wᵀ at M = 8, K = 4100, N = 33 was 0.156 off an fp32-accumulating GEMV (4 % of the value; an
    H200, benchmarks/results/2026-12-04-h200-device-check-1) where the GEMV was the closer one.
    Process-wide: call it in test and check processes only, never from the library, whose own
    cuBLAS calls (NF4's dequantise + GEMM, LoRA's compositions) follow the user's setting as
    torch's matmul does."""
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
