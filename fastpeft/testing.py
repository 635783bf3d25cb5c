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
