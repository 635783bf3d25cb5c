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
from ._common import (BLOCK_R_CHOICES, TRITON_DTYPES, bf16_via_fp32, block_r, cdiv, dot, input_precision,
                      next_power_of_2, note_short_grid, sm_count, sum_parts, wave_split)


@triton.jit
def _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M: tl.constexpr):
    """This program's rows: token indices, their mask, the segment's slot (0 if invalid), and
    whether any of its rows holds a token (a program past its segment's end does no work)."""
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg)
    valid = (slot >= 0) & (slot < S)
    m0 = tl.program_id(1) * BLOCK_M
    m = m0 + tl.arange(0, BLOCK_M)
    pos = start + m
    pos_ok = (m < length) & (pos >= 0) & (pos < T) & valid
    tok = tl.load(sorted_ptr + pos, mask=pos_ok, other=0)
    tok_ok = pos_ok & (tok >= 0) & (tok < T)
    busy = valid & (m0 < length)
    return tl.where(tok_ok, tok, 0).to(tl.int64), tok_ok, tl.where(valid, slot, 0).to(tl.int64), busy


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, s_ptr, sorted_ptr, starts_ptr, lens_ptr, slots_ptr,
    T, K, R, S, K_PART,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_sp, stride_st, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """s[p, tok, r] = x[tok, Kₚ]·a[slot, r, Kₚ] for the tokens of one segment, over part
    p = [p·K_PART, (p+1)·K_PART) ∩ [0, K) of K (K_PART a multiple of BLOCK_K); grid
    (U, ⌈maxlen/BM⌉, ⌈R/BR⌉·parts), axis 2 = p·⌈R/BR⌉ + rank block. One part: s is the product
    itself (stride_sp unused). A program whose rows hold no token runs no trip."""
    tok, tok_ok, slot, busy = _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M)
    r_blocks = tl.cdiv(R, BLOCK_R)
    part = tl.program_id(2) // r_blocks
    offs_r = (tl.program_id(2) % r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    k_start = part * K_PART
    k_stop = tl.where(busy, tl.minimum(k_start + K_PART, K), k_start)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + (k_start + offs_k[None, :]).to(tl.int64) * stride_xk
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :].to(tl.int64) * stride_ar \
        + (k_start + offs_k[:, None]).to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k_mask = (k0 + offs_k) < k_stop
        x = tl.load(x_ptrs, mask=tok_ok[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, a_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(s_ptr + part * stride_sp + tok[:, None] * stride_st + offs_r[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=tok_ok[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    base_ptr, s_ptr, b_ptr, scal_ptr, out_ptr, sorted_ptr, starts_ptr, lens_ptr, slots_ptr,
    T, N, R, S,
    stride_baset, stride_basen, stride_st, stride_sr, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """out[tok, n] = base[tok, n] + scal[slot]·s[tok, :]·b[slot, n, :]; grid (U, ⌈maxlen/BM⌉, ⌈N/BN⌉).
    A program whose rows hold no token runs no trip (and stores nothing)."""
    tok, tok_ok, slot, busy = _segment(sorted_ptr, starts_ptr, lens_ptr, slots_ptr, T, S, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, tl.where(busy, R, 0), BLOCK_R):
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
# interpreter tiles are small so that small tests hit ragged edges. The grid is sized from
# max_seg_len (the token count: no host read of the segment lengths), U·⌈T/BLOCK_M⌉ row blocks of
# which those past their segment's end do no work. When a grid falls short of the device's SMs the
# shrink splits K and the expand narrows its N block, each taking 16-row blocks (tl.dot's least)
# first when even its finest split at the table's rows would stay below a wave (shrink_plan,
# expand_plan).
_TILES = {"gpu": (32, 64, 4), "interpret": (16, 32, 4)}
MIN_BLOCK_M = 16
MIN_BLOCK_N = 16


def _tiles():
    return _TILES["interpret" if triton_interpreting() else "gpu"]


def _block_m(max_seg_len: int, block_m: int, most_programs_per_row_block: int, sms: int) -> int:
    """The table's BLOCK_M, or 16 when the table's rows with the finest split per row block
    (`most_programs_per_row_block` programs) still leave the grid below `sms` programs."""
    if block_m > MIN_BLOCK_M and cdiv(max_seg_len, block_m) * most_programs_per_row_block < sms:
        return MIN_BLOCK_M
    return block_m


def shrink_plan(U: int, max_seg_len: int, K: int, R: int, sms: int) -> tuple[int, int, int, int, int, str | None]:
    """(BLOCK_M, BLOCK_K, BLOCK_R, parts, K_PART, why the grid stays below `sms` programs or None) of
    the shrink of U segments of at most max_seg_len tokens: the table's tile, K split into the fewest
    parts of whole BLOCK_K trips whose grid U·⌈maxlen/BM⌉·⌈R/BR⌉·parts reaches `sms`
    (_common.wave_split), on 16-row blocks when a part per trip at the table's rows would not. One
    segment of 64 tokens at rank 16, K = 4096: 2 programs of 64 trips at 32 rows (128 at most), so
    16 rows: 4 programs, 64 parts of one trip, 256 programs."""
    block_m, block_k, _ = _tiles()
    rb = block_r(R)
    trips = max(1, cdiv(K, block_k))
    block_m = _block_m(max_seg_len, block_m, U * cdiv(R, rb) * trips, sms)
    programs = U * cdiv(max_seg_len, block_m) * cdiv(R, rb)
    parts = wave_split(programs, trips, sms)
    k_part = cdiv(trips, parts) * block_k
    parts = cdiv(trips, k_part // block_k)   # no empty part
    reason = None if programs * parts >= sms else (
        f"{U} segment(s) x {cdiv(max_seg_len, block_m)} row block(s) of {block_m} x {cdiv(R, rb)} rank "
        f"block(s), K in {trips} trip(s) of {block_k}: {programs * parts} programs of one trip or more, fewer than "
        f"the {sms} SMs")
    return block_m, block_k, rb, parts, k_part, reason


def expand_plan(U: int, max_seg_len: int, N: int, sms: int) -> tuple[int, int, str | None]:
    """(BLOCK_M, BLOCK_N, why the grid stays below `sms` programs or None) of the expand: the table's
    tile, BLOCK_N halved (down to 16) until U·⌈maxlen/BM⌉·⌈N/BN⌉ reaches `sms`, on 16-row blocks
    when 16 columns at the table's rows would not. One segment of 64 tokens, N = 4096: 128 programs
    at 64 columns, 256 at 32."""
    block_m, block_n, _ = _tiles()
    block_m = _block_m(max_seg_len, block_m, U * cdiv(N, MIN_BLOCK_N), sms)
    rows = U * cdiv(max_seg_len, block_m)
    while block_n > MIN_BLOCK_N and rows * cdiv(N, block_n) < sms:
        block_n //= 2
    programs = rows * cdiv(N, block_n)
    reason = None if programs >= sms else (
        f"{U} segment(s) x {cdiv(max_seg_len, block_m)} row block(s) of {block_m} x {cdiv(N, block_n)} "
        f"column block(s) of {block_n}: {programs} programs, fewer than the {sms} SMs")
    return block_m, block_n, reason


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, sorted_tokens: torch.Tensor, seg_starts: torch.Tensor,
                seg_lens: torch.Tensor, seg_adapters: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """Triton face of ``fastpeft::sgmv_shrink`` (shapes: fastpeft/ops/sgmv.py)."""
    T, K = x.shape
    S, R, _ = lora_a.shape
    U = seg_starts.shape[0]
    if T * R == 0 or U == 0 or max_seg_len == 0:
        return torch.zeros((T, R), device=x.device, dtype=x.dtype)
    bm, bk, rb, parts, k_part, reason = shrink_plan(U, max_seg_len, K, R, sm_count(x.device))
    _, _, warps = _tiles()
    # tokens in no segment keep s = 0: zeros in s, or in every part's plane (fp32 [parts, T, R])
    out = torch.zeros((T, R) if parts == 1 else (parts, T, R), device=x.device,
                      dtype=x.dtype if parts == 1 else torch.float32)
    if reason:
        note_short_grid(reason)
    wrap_triton(_sgmv_shrink_kernel)[(U, cdiv(max_seg_len, bm), cdiv(R, rb) * parts)](
        x, lora_a, out, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, K, R, S, k_part,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        out.stride(0) if parts > 1 else 0, out.stride(-2), out.stride(-1),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=rb, INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype), num_warps=warps)
    return out if parts == 1 else sum_parts(out, x.dtype)


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
    bm, bn, reason = expand_plan(U, max_seg_len, N, sm_count(base.device))
    _, _, warps = _tiles()
    if reason:
        note_short_grid(reason)
    wrap_triton(_sgmv_expand_kernel)[(U, cdiv(max_seg_len, bm), cdiv(N, bn))](
        base, s, lora_b, scalings, out, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, N, R, S,
        base.stride(0), base.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_b.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r(R), INPUT_PRECISION=input_precision(base.dtype),
        BF16_VIA_FP32=bf16_via_fp32(base.dtype), num_warps=warps)
    return out


def aot_configs():
    """Each dtype, precision and rank block at the table's tile and at the plans' narrower ones: the
    shrink at 32 and 16 rows, writing s or fp32 parts; the expand at 32 and 16 rows, BLOCK_N 64 to 16."""
    bm, bkn, warps = _TILES["gpu"]
    routing = {"sorted_ptr": "*i32", "starts_ptr": "*i32", "lens_ptr": "*i32", "slots_ptr": "*i32"}
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            common = dict(INPUT_PRECISION=precision, BF16_VIA_FP32=False)
            for rb in BLOCK_R_CHOICES:
                for block_m in (bm, MIN_BLOCK_M):
                    for out in sorted({ptr, "*fp32"}):
                        yield _sgmv_shrink_kernel, {
                            "x_ptr": ptr, "a_ptr": ptr, "s_ptr": out, **routing, "T": "i32", "K": "i32", "R": "i32",
                            "S": "i32", "K_PART": "i32",
                            **{f: "i32" for f in ("stride_xt", "stride_xk", "stride_as", "stride_ar", "stride_ak",
                                                  "stride_sp", "stride_st", "stride_sr")}}, \
                            dict(BLOCK_M=block_m, BLOCK_K=bkn, BLOCK_R=rb, **common), dict(num_warps=warps)
                    block_n = bkn
                    while block_n >= MIN_BLOCK_N:
                        yield _sgmv_expand_kernel, {
                            "base_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr, "scal_ptr": "*fp32", "out_ptr": ptr, **routing,
                            "T": "i32", "N": "i32", "R": "i32", "S": "i32",
                            **{f: "i32" for f in ("stride_baset", "stride_basen", "stride_st", "stride_sr", "stride_bs",
                                                  "stride_bn", "stride_br", "stride_ot", "stride_on")}}, \
                            dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rb, **common), dict(num_warps=warps)
                        block_n //= 2


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
    bp = min(max(16, next_power_of_2(P)), widest)
    bq = min(max(16, next_power_of_2(Q)), widest)
    wrap_triton(_sgmv_outer_kernel)[(U, cdiv(P, bp), cdiv(Q, bq))](
        a, b, out, sorted_tokens, seg_starts, seg_lens, seg_adapters, T, P, Q, num_slots,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, INPUT_PRECISION=input_precision(a.dtype),
        BF16_VIA_FP32=bf16_via_fp32(a.dtype), num_warps=warps)
    return out.to(a.dtype)
