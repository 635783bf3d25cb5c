"""Triton face of ``bgmv_shrink`` / ``bgmv_expand``: one program per (token, output block), the
token's adapter slot looked up in the kernel. Decode-shaped work (few tokens, each its own
adapter) is a batch of GEMVs: products are summed in fp32 on the vector units rather than with
``tl.dot``, whose 16-row minimum would waste 15/16 of each MMA on a single token.

The shrink (R outputs per token, a reduction over K) splits K into parts when the tokens and rank
blocks alone make fewer programs than the device has SMs (:func:`shrink_plan`); the expand (N outputs per
token) has N/BLOCK_N programs per token, BLOCK_N narrowed for a few tokens (:func:`expand_plan`).

Slots outside ``[0, S)`` (including -1) mask every load of the factors: such a token gets s = 0
and out = base, and no id can make a kernel read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import BLOCK_R_CHOICES, TRITON_DTYPES, block_r, cdiv, note_short_grid, sm_count, sum_parts


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, ids_ptr, out_ptr,
    K, K_PART, R, S,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_oh, stride_ot, stride_or,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[h, t, r] = sum over k in part h (``[h·K_PART, (h+1)·K_PART) ∩ [0, K)``) of
    a[slot(t), r, k]·x[t, k]; grid (T, ⌈R/BLOCK_R⌉, parts). With one part, out is s itself.

    The K loop only multiplies and adds into a [BLOCK_R, BLOCK_K] fp32 accumulator (no trip waits
    on another's reduction, so the next trip's loads issue while this one's products are summed);
    the cross-thread sum runs once, after the loop."""
    t = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(2)
    slot = tl.load(ids_ptr + t)
    valid = (slot >= 0) & (slot < S)
    slot = tl.where(valid, slot, 0).to(tl.int64)
    r_mask = (offs_r < R) & valid
    offs_k = h.to(tl.int64) * K_PART + tl.arange(0, BLOCK_K)
    a_rows = a_ptr + slot * stride_as + offs_r[:, None].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K_PART, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xv = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_mask & valid, other=0.0).to(tl.float32)
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += a.to(tl.float32) * xv[None, :]
    s = tl.sum(acc, axis=1)
    tl.store(out_ptr + h * stride_oh + t * stride_ot + offs_r * stride_or, s.to(out_ptr.dtype.element_ty),
             mask=offs_r < R)


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


# BLOCK_N of the expand, widest first: 128 gives a 4-warp program 16-byte-per-lane loads of its B
# rows at rank 16; narrower blocks are taken while the grid T·⌈N/BLOCK_N⌉ is below a wave (expand_plan).
# One decode token of a 4096-wide layer (static-model estimates, sm_90 / sm_80): 128 wide, 32
# programs, 0.44 / 0.44 us; 64: 0.33 / 0.33; 32: 128 programs, 0.08 / 0.20; 16: 256 programs (a
# wave on sm_90), 0.10 / 0.26. So 32 is the narrowest, and one token stays 4 programs short of an
# H200's wave. Small under the interpreter so that ragged edges are exercised by small tests.
_BLOCK_N = {"gpu": (128, 64, 32), "interpret": (32, 16)}
# The shrink's accumulator: BLOCK_R·BLOCK_K fp32 entries, 4096 on the GPU (32 registers per thread
# of a 4-warp program whatever the rank block: BLOCK_K = 256, 128, 64 for BLOCK_R = 16, 32, 64, so a
# trip loads 8 KB of bf16 A); BLOCK_K 32 under the interpreter, so small tests split K.
SHRINK_ACC = 4096
_INTERPRET_BLOCK_K = 32
# The shrink splits K into parts (a power of two, at most one per BLOCK_K trip) until its grid gives
# every SM of the device a program (sm_count: 132 on an H100/H200). A decode batch of 64 tokens at
# rank 16 is 64 programs unsplit; 4 parts of 4 trips make 256 (an even split: wave_split's fewest
# parts would give 5, 5, 5, 1 trips). The parts' fp32 sums are added in a fixed order by a second
# kernel (_common.sum_parts): no atomics, the same result every run.


def _gpu_shrink_block_k(rb: int) -> int:
    return SHRINK_ACC // rb


def shrink_plan(T: int, K: int, R: int, sms: int) -> tuple[int, int, int, int, str | None]:
    """(BLOCK_R, BLOCK_K, parts, K_PART, why the grid stays below `sms` programs or None) of the
    shrink of T tokens, K inputs, rank R: the least power-of-two split of K whose grid
    T·⌈R/BLOCK_R⌉·parts reaches `sms`, at most one BLOCK_K trip per part; K_PART a whole number of
    trips, and no part empty (so the parts may number fewer than the split: K = 1536 in 256-wide
    trips split 4 ways is 3 parts of 512)."""
    rb = block_r(R)
    bk = _INTERPRET_BLOCK_K if triton_interpreting() else _gpu_shrink_block_k(rb)
    programs = T * cdiv(R, rb)
    trips = max(1, cdiv(K, bk))
    split = 1
    while split < trips and programs * split < sms:
        split *= 2
    k_part = cdiv(trips, min(split, trips)) * bk
    parts = cdiv(trips, k_part // bk)
    reason = None if programs * parts >= sms else (
        f"{T} token(s) x {cdiv(R, rb)} rank block(s) of {rb}, K in {trips} trip(s) of {bk}: {programs * parts} "
        f"programs of one trip or more, fewer than the {sms} SMs")
    return rb, bk, parts, k_part, reason


def expand_plan(T: int, N: int, sms: int) -> tuple[int, str | None]:
    """(BLOCK_N, why the grid stays below `sms` programs or None) of the expand of T tokens to N
    outputs: the widest block of _BLOCK_N whose grid T·⌈N/BLOCK_N⌉ reaches `sms`, else the
    narrowest (narrower still is estimated slower: _BLOCK_N's comment)."""
    choices = _BLOCK_N["interpret" if triton_interpreting() else "gpu"]
    for block_n in choices:
        if T * cdiv(N, block_n) >= sms:
            return block_n, None
    programs = T * cdiv(N, block_n)
    return block_n, (f"{T} token(s) x {cdiv(N, block_n)} blocks of {block_n} outputs: {programs} programs "
                     f"(blocks narrower than {block_n} estimated slower)")


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """Triton face of ``fastpeft::bgmv_shrink`` (shapes: fastpeft/ops/bgmv.py)."""
    T, K = x.shape
    S, R, _ = lora_a.shape
    if T * R == 0:
        return torch.empty((T, R), device=x.device, dtype=x.dtype)
    rb, bk, parts, k_part, reason = shrink_plan(T, K, R, sm_count(x.device))
    # one part: the sums go to s; more: to fp32 planes [parts, T, R], added after
    out = torch.empty((T, R), device=x.device, dtype=x.dtype) if parts == 1 else \
        torch.empty((parts, T, R), device=x.device, dtype=torch.float32)
    plane = out.stride(0) if parts > 1 else 0
    if reason:
        note_short_grid(reason)
    wrap_triton(_bgmv_shrink_kernel)[(T, cdiv(R, rb), parts)](
        x, lora_a, adapter_ids, out, K, k_part, R, S,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), plane, out.stride(-2),
        out.stride(-1), BLOCK_K=bk, BLOCK_R=rb, num_warps=4)
    return out if parts == 1 else sum_parts(out, x.dtype)


def bgmv_expand(base: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
                adapter_ids: torch.Tensor) -> torch.Tensor:
    """Triton face of ``fastpeft::bgmv_expand``."""
    T, N = base.shape
    S, _, R = lora_b.shape
    out = torch.empty_like(base)
    if out.numel() == 0:
        return out
    block_n, reason = expand_plan(T, N, sm_count(base.device))
    if reason:
        note_short_grid(reason)
    wrap_triton(_bgmv_expand_kernel)[(T, cdiv(N, block_n))](
        base, s, lora_b, scalings, adapter_ids, out, N, R, S,
        base.stride(0), base.stride(1), s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_b.stride(2), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r(R), num_warps=4)
    return out


def aot_configs():
    """Every launch the launchers make: each dtype and rank block; the shrink writing s (one part)
    or fp32 planes (a split K; their sum is _common's), the expand at each of its BLOCK_N."""
    i32 = "i32"
    for tname in TRITON_DTYPES:
        ptr = f"*{tname}"
        for rb in BLOCK_R_CHOICES:
            for out in sorted({ptr, "*fp32"}):
                yield _bgmv_shrink_kernel, {
                    "x_ptr": ptr, "a_ptr": ptr, "ids_ptr": "*i32", "out_ptr": out, "K": i32, "K_PART": i32, "R": i32,
                    "S": i32, **{f: i32 for f in ("stride_xt", "stride_xk", "stride_as", "stride_ar", "stride_ak",
                                                  "stride_oh", "stride_ot", "stride_or")}}, \
                    dict(BLOCK_K=_gpu_shrink_block_k(rb), BLOCK_R=rb), dict(num_warps=4)
            for block_n in _BLOCK_N["gpu"]:
                yield _bgmv_expand_kernel, {
                    "base_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr, "scal_ptr": "*fp32", "ids_ptr": "*i32",
                    "out_ptr": ptr, "N": i32, "R": i32, "S": i32,
                    **{f: i32 for f in ("stride_baset", "stride_basen", "stride_st", "stride_sr", "stride_bs",
                                        "stride_bn", "stride_br", "stride_ot", "stride_on")}}, \
                    dict(BLOCK_N=block_n, BLOCK_R=rb), dict(num_warps=4)
