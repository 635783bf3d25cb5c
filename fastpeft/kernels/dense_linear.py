"""Triton face of ``fastpeft::dense_linear``: ``y = x·Wᵀ + bias``, tiles of y summed in fp32 with
``tl.dot`` over tiles of x and W, the bias added once before the single rounding to x's dtype.

On a GPU the op prefers torch's matmul (cuBLAS; fastpeft/ops/dense_linear.py): this face is the
op's portable kernel, run when forced, and unmeasured on a GPU so far.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import TRITON_DTYPES, bf16_via_fp32, cdiv, dot, input_precision, note_short_grid, sm_count


@triton.jit
def _dense_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_b, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """y[m, n] = Σ_k x[m, k]·w[n, k] (+ b[n]) for one [BLOCK_M, BLOCK_N] tile; grid (⌈N/BLOCK_N⌉,
    ⌈M/BLOCK_M⌉). x and w rows are unit-stride (the op's checker); the bias any stride."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn   # [BLOCK_K, BLOCK_N] tiles of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(a, w, acc, INPUT_PRECISION, BF16_VIA_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K): tl.dot's 16 rows for decode-sized x, 64 above. Small under the
# interpreter so that small tests leave remainders in every dimension.
_TILES = {"gpu": {"few": (16, 64, 64), "many": (64, 64, 64)}, "interpret": {"few": (16, 16, 16), "many": (16, 16, 16)}}
_FEW_ROWS = 16


def tiles(M: int) -> tuple[int, int, int]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K) of an x with M rows."""
    return _TILES["interpret" if triton_interpreting() else "gpu"]["few" if M <= _FEW_ROWS else "many"]


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton face of ``fastpeft::dense_linear`` (shapes: fastpeft/ops/dense_linear.py)."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    bm, bn, bk = tiles(M)
    grid = (cdiv(N, bn), cdiv(M, bm))
    if grid[0] * grid[1] < sm_count(x.device):
        note_short_grid(f"{grid[0]} blocks of {bn} outputs x {grid[1]} of {bm} rows: each program sums all of K "
                        "(no split of K)")
    wrap_triton(_dense_linear_kernel)[grid](
        x, weight, bias if bias is not None else x, y, M, N, K, x.stride(0), weight.stride(0),
        bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype), num_warps=4)
    return y


def aot_configs():
    """Yield (kernel, signature, constexprs, options) for every launch configuration above."""
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            for bm, bn, bk in _TILES["gpu"].values():
                for has_bias in (False, True):
                    sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "M": "i32", "N": "i32", "K": "i32",
                           "stride_xm": "i32", "stride_wn": "i32", "stride_b": "i32", "stride_ym": "i32"}
                    yield _dense_linear_kernel, sig, dict(HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                          INPUT_PRECISION=precision, BF16_VIA_FP32=False), \
                        dict(num_warps=4)
