"""Triton face of ``sgmv_shrink`` / ``sgmv_expand``: one tiled GEMM per segment of tokens that
share an adapter slot (grid: segment × row block × column block). Rows are read and written
through ``sorted_tokens``, so the batch is never physically reordered.

Every routing value is bounds-masked in the kernel (token index in ``[0, T)``, position in
``sorted_tokens`` in ``[0, T)``, slot in ``[0, S)``): no routing can cause an out-of-bounds read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import BLOCK_R_CHOICES, TRITON_DTYPES, bf16_via_fp32, block_r, dot, input_precision


@triton.jit
def _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M: tl.constexpr):
    """This program's rows: token indices, their mask, and the segment's slot (0 if invalid)."""
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg)
    valid = (slot >= 0) & (slot < S)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = start + m
    pos_ok = (m < length) & (pos >= 0) & (pos < T) & valid
    tok = tl.load(sorted_ptr + pos, mask=pos_ok, other=0)
    tok_ok = pos_ok & (tok >= 0) & (tok < T)
    return tl.where(tok_ok, tok, 0).to(tl.int64), tok_ok, tl.where(valid, slot, 0).to(tl.int64)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, s_ptr, sorted_ptr, starts_ptr, lens_ptr, slots_ptr,
    T, K, R, S,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_st, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """s[tok, r] = x[tok, :]·a[slot, r, :] for the tokens of one segment; grid (U, ⌈maxlen/BM⌉, ⌈R/BR⌉)."""
    tok, tok_ok, slot = _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=tok_ok[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, a_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(s_ptr + tok[:, None] * stride_st + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    base_ptr, s_ptr, b_ptr, scal_ptr, out_ptr, sorted_ptr, starts_ptr, lens_ptr, slots_ptr,
    T, N, R, S,
    stride_baset, stride_basen, stride_st, stride_sr, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """out[tok, n] = base[tok, n] + scal[slot]·s[tok, :]·b[slot, n, :]; grid (U, ⌈maxlen/BM⌉, ⌈N/BN⌉)."""
    tok, tok_ok, slot = _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        r_mask = r < R
        sv = tl.load(s_ptr + tok[:, None] * stride_st + r[None, :].to(tl.int64) * stride_sr,
                     mask=tok_ok[:, None] & r_mask[None, :], other=0.0)
        b_t = tl.load(b_ptr + slot * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn + r[:, None].to(tl.int64) * stride_br,
                      mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = dot(sv, b_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
    scale = tl.load(scal_ptr + slot)
    mask = tok_ok[:, None] & n_mask[None, :]
    base = tl.load(base_ptr + tok[:, None] * stride_baset + offs_n[None, :].to(tl.int64) * stride_basen, mask=mask,
                   other=0.0).to(tl.float32)
    tl.store(out_ptr + tok[:, None] * stride_ot + offs_n[None, :].to(tl.int64) * stride_on,
             (base + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_K or BLOCK_N, num_warps): GPU tiles are a first guess, not yet measured;
# interpreter tiles are small so that small tests hit ragged edges.
_TILES = {"gpu": (32, 64, 4), "interpret": (16, 32, 4)}


def _tiles():
    return _TILES["interpret" if triton_interpreting() else "gpu"]


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, sorted_tokens: torch.Tensor, seg_starts: torch.Tensor,
                seg_lens: torch.Tensor, seg_adapters: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """Triton face of ``fastpeft::sgmv_shrink`` (shapes: fastpeft/ops/sgmv.py)."""
    T, K = x.shape
    S, R, _ = lora_a.shape
    s = torch.zeros((T, R), device=x.device, dtype=x.dtype)  # tokens in no segment keep s = 0
    U = seg_starts.shape[0]
    if s.numel() == 0 or U == 0 or max_seg_len == 0:
        return s
    bm, bk, warps = _tiles()
    rb = block_r(R)
    wrap_triton(_sgmv_shrink_kernel)[(U, triton.cdiv(max_seg_len, bm), triton.cdiv(R, rb))](
        x, lora_a, s, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, K, R, S,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), s.stride(0), s.stride(1),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=rb, INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype), num_warps=warps)
    return s


def sgmv_expand(base: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
                sorted_tokens: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                seg_adapters: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """Triton face of ``fastpeft::sgmv_expand``."""
    T, N = base.shape
    S, _, R = lora_b.shape
    out = base.clone()  # tokens in no segment keep out = base
    U = seg_starts.shape[0]
    if out.numel() == 0 or U == 0 or max_seg_len == 0:
        return out
    bm, bn, warps = _tiles()
    wrap_triton(_sgmv_expand_kernel)[(U, triton.cdiv(max_seg_len, bm), triton.cdiv(N, bn))](
        base, s, lora_b, scalings, out, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, N, R, S,
        base.stride(0), base.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_b.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r(R), INPUT_PRECISION=input_precision(base.dtype),
        BF16_VIA_FP32=bf16_via_fp32(base.dtype), num_warps=warps)
    return out


def aot_configs():
    bm, bkn, warps = _TILES["gpu"]
    routing = {"sorted_ptr": "*i32", "starts_ptr": "*i32", "lens_ptr": "*i32", "slots_ptr": "*i32"}
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            for rb in BLOCK_R_CHOICES:
                common = dict(INPUT_PRECISION=precision, BF16_VIA_FP32=False)
                yield _sgmv_shrink_kernel, {
                    "x_ptr": ptr, "a_ptr": ptr, "s_ptr": ptr, **routing, "T": "i32", "K": "i32", "R": "i32", "S": "i32",
                    **{f: "i32" for f in ("stride_xt", "stride_xk", "stride_as", "stride_ar", "stride_ak", "stride_st",
                                          "stride_sr")}}, dict(BLOCK_M=bm, BLOCK_K=bkn, BLOCK_R=rb, **common), \
                    dict(num_warps=warps)
                yield _sgmv_expand_kernel, {
                    "base_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr, "scal_ptr": "*fp32", "out_ptr": ptr, **routing,
                    "T": "i32", "N": "i32", "R": "i32", "S": "i32",
                    **{f: "i32" for f in ("stride_baset", "stride_basen", "stride_st", "stride_sr", "stride_bs",
                                          "stride_bn", "stride_br", "stride_ot", "stride_on")}}, \
                    dict(BLOCK_M=bm, BLOCK_N=bkn, BLOCK_R=rb, **common), dict(num_warps=warps)


@triton.jit
def _sgmv_outer_kernel(
    a_ptr, b_ptr, out_ptr, sorted_ptr, starts_ptr, lens_ptr, slots_ptr,
    T, P, Q, S,
    stride_at, stride_ap, stride_bt, stride_bq, stride_os, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """out[slot, p, q] += Σ_t a[t, p]·b[t, q] over one segment's tokens; grid (U, ⌈P/BP⌉, ⌈Q/BQ⌉).
    The loop runs over the segment's length read on the device (no grid bound from the host); the
    float32 sums are added atomically, so segments naming one slot add up."""
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg)
    valid = (slot >= 0) & (slot < S)
    n = tl.where(valid, tl.minimum(length, T), 0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, n, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        pos = start + m
        pos_ok = (m < n) & (pos >= 0) & (pos < T)
        tok = tl.load(sorted_ptr + pos, mask=pos_ok, other=0)
        tok_ok = pos_ok & (tok >= 0) & (tok < T)
        tok = tl.where(tok_ok, tok, 0).to(tl.int64)
        a_t = tl.load(a_ptr + tok[None, :] * stride_at + offs_p[:, None].to(tl.int64) * stride_ap,
                      mask=p_mask[:, None] & tok_ok[None, :], other=0.0)                        # [BP, BM]
        b = tl.load(b_ptr + tok[:, None] * stride_bt + offs_q[None, :].to(tl.int64) * stride_bq,
                    mask=tok_ok[:, None] & q_mask[None, :], other=0.0)                          # [BM, BQ]
        acc = dot(a_t, b, acc, INPUT_PRECISION, BF16_VIA_FP32)
    slot = tl.where(valid, slot, 0).to(tl.int64)
    tl.atomic_add(out_ptr + slot * stride_os + offs_p[:, None].to(tl.int64) * stride_op
                  + offs_q[None, :].to(tl.int64) * stride_oq, acc,
                  mask=(n > 0) & p_mask[:, None] & q_mask[None, :])


# (BLOCK_M, largest BLOCK_P/BLOCK_Q, num_warps) of sgmv_outer: a first guess on the GPU, not yet
# measured; small under the interpreter so that small tests cross tile edges.
_OUTER_TILES = {"gpu": (32, 64, 4), "interpret": (16, 32, 4)}


def sgmv_outer(a: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor, seg_starts: torch.Tensor,
               seg_lens: torch.Tensor, seg_adapters: torch.Tensor, max_seg_len: int, num_slots: int) -> torch.Tensor:
    """Triton face of ``fastpeft::sgmv_outer`` (shapes: fastpeft/ops/sgmv.py)."""
    T, P = a.shape
    Q = b.shape[1]
    out = torch.zeros((num_slots, P, Q), device=a.device, dtype=torch.float32)
    U = seg_starts.shape[0]
    if out.numel() == 0 or U == 0 or T == 0 or max_seg_len == 0:
        return out.to(a.dtype)
    bm, widest, warps = _OUTER_TILES["interpret" if triton_interpreting() else "gpu"]
    bp = min(max(16, triton.next_power_of_2(P)), widest)
    bq = min(max(16, triton.next_power_of_2(Q)), widest)
    wrap_triton(_sgmv_outer_kernel)[(U, triton.cdiv(P, bp), triton.cdiv(Q, bq))](
        a, b, out, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, P, Q, num_slots,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, INPUT_PRECISION=input_precision(a.dtype),
        BF16_VIA_FP32=bf16_via_fp32(a.dtype), num_warps=warps)
    return out.to(a.dtype)
