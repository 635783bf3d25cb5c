"""Triton face of ``bgmv_shrink`` / ``bgmv_expand``: one program per (token, output block), the
token's adapter slot looked up in the kernel. Decode-shaped work (few tokens, each its own
adapter) is a batch of GEMVs: products are summed with ``tl.sum`` in fp32 rather than ``tl.dot``,
whose 16-row minimum would waste 15/16 of each MMA on a single token.

Slots outside ``[0, S)`` (including -1) mask every load of the factors: such a token gets s = 0
and out = base, and no id can make a kernel read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import BLOCK_R_CHOICES, TRITON_DTYPES, block_r


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, ids_ptr, s_ptr,
    K, R, S,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_st, stride_sr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """s[t, r] = sum_k a[slot(t), r, k]·x[t, k]; grid (T, ⌈R/BLOCK_R⌉)."""
    t = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(ids_ptr + t)
    valid = (slot >= 0) & (slot < S)
    slot = tl.where(valid, slot, 0).to(tl.int64)
    r_mask = (offs_r < R) & valid
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + slot * stride_as + offs_r[:, None].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xv = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_mask & valid, other=0.0).to(tl.float32)
        a = tl.load(a_rows + k[None, :].to(tl.int64) * stride_ak, mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * xv[None, :], axis=1)
    tl.store(s_ptr + t * stride_st + offs_r * stride_sr, acc.to(s_ptr.dtype.element_ty), mask=offs_r < R)


@triton.jit
def _bgmv_expand_kernel(
    base_ptr, s_ptr, b_ptr, scal_ptr, ids_ptr, out_ptr,
    N, R, S,
    stride_baset, stride_basen, stride_st, stride_sr, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, n] = base[t, n] + scal[slot]·sum_r b[slot, n, r]·s[t, r]; grid (T, ⌈N/BLOCK_N⌉)."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    slot = tl.load(ids_ptr + t)
    valid = (slot >= 0) & (slot < S)
    slot = tl.where(valid, slot, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    b_rows = b_ptr + slot * stride_bs + offs_n[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        r_mask = (r < R) & valid
        sv = tl.load(s_ptr + t * stride_st + r * stride_sr, mask=r_mask, other=0.0).to(tl.float32)
        b = tl.load(b_rows + r[None, :].to(tl.int64) * stride_br, mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(b * sv[None, :], axis=1)
    scale = tl.load(scal_ptr + slot, mask=valid, other=0.0)
    base = tl.load(base_ptr + t * stride_baset + offs_n * stride_basen, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_n * stride_on, (base + scale * acc).to(out_ptr.dtype.element_ty),
             mask=n_mask)


# BLOCK_K of the shrink, BLOCK_N of the expand: 16-byte-per-lane loads of a 4-warp program on the GPU;
# small under the interpreter so ragged edges are exercised by small tests.
_BLOCKS = {"gpu": (256, 128), "interpret": (32, 32)}


def _blocks():
    return _BLOCKS["interpret" if triton_interpreting() else "gpu"]


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """Triton face of ``fastpeft::bgmv_shrink`` (shapes: fastpeft/ops/bgmv.py)."""
    T, K = x.shape
    S, R, _ = lora_a.shape
    s = torch.empty((T, R), device=x.device, dtype=x.dtype)
    if s.numel() == 0:
        return s
    block_k, _ = _blocks()
    rb = block_r(R)
    wrap_triton(_bgmv_shrink_kernel)[(T, triton.cdiv(R, rb))](
        x, lora_a, adapter_ids, s, K, R, S,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), s.stride(0), s.stride(1),
        BLOCK_K=block_k, BLOCK_R=rb, num_warps=4)
    return s


def bgmv_expand(base: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
                adapter_ids: torch.Tensor) -> torch.Tensor:
    """Triton face of ``fastpeft::bgmv_expand``."""
    T, N = base.shape
    S, _, R = lora_b.shape
    out = torch.empty_like(base)
    if out.numel() == 0:
        return out
    _, block_n = _blocks()
    wrap_triton(_bgmv_expand_kernel)[(T, triton.cdiv(N, block_n))](
        base, s, lora_b, scalings, adapter_ids, out, N, R, S,
        base.stride(0), base.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_b.stride(2), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r(R), num_warps=4)
    return out


def aot_configs():
    block_k, block_n = _BLOCKS["gpu"]
    for tname in TRITON_DTYPES:
        ptr = f"*{tname}"
        for rb in BLOCK_R_CHOICES:
            yield _bgmv_shrink_kernel, {
                "x_ptr": ptr, "a_ptr": ptr, "ids_ptr": "*i32", "s_ptr": ptr, "K": "i32", "R": "i32", "S": "i32",
                **{f: "i32" for f in ("stride_xt", "stride_xk", "stride_as", "stride_ar", "stride_ak", "stride_st",
                                      "stride_sr")}}, dict(BLOCK_K=block_k, BLOCK_R=rb), dict(num_warps=4)
            yield _bgmv_expand_kernel, {
                "base_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr, "scal_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": ptr,
                "N": "i32", "R": "i32", "S": "i32",
                **{f: "i32" for f in ("stride_baset", "stride_basen", "stride_st", "stride_sr", "stride_bs",
                                      "stride_bn", "stride_br", "stride_ot", "stride_on")}}, \
                dict(BLOCK_N=block_n, BLOCK_R=rb), dict(num_warps=4)
