"""Triton face of ``lora_linear``: a shrink GEMM and a GEMM whose accumulator also takes the LoRA delta.

Forward, for x ``[M, K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``:
  1. ``s = x_lora·Aᵀ`` (``_shrink_kernel``; [M, r] is small: r ≤ 128 in practice, so K is split
     across programs until the grid gives every SM one, the fp32 parts summed after: ``shrink``);
  2. ``y = x·Wᵀ + bias + (scaling·s)·Bᵀ`` (``_fused_matmul_kernel``): the main K loop accumulates x·Wᵀ
     and then the same fp32 accumulator takes ``tl.dot(scaling·s, Bᵀ)``, so y is written once and
     x and W are read once. No ``W + ΔW`` is ever formed.

Backward reuses both kernels through transposed views (no kernel is written twice):
  ``t = dy·B`` is the shrink of dy by Bᵀ; ``dx = dy·W + (scaling·t)·A`` is the fused GEMM with
  W → Wᵀ and B → Aᵀ. ``dA = scaling·tᵀ·x_lora`` and ``dB = scaling·dyᵀ·s`` are skinny GEMMs
  (r rows or columns, reduced over M) left to ``torch.mm``: cuBLAS splits their long reduction
  across SMs, which a plain tiled Triton GEMM with a grid of ⌈r/BLOCK⌉ tiles cannot.

Kernels take arbitrary strides, so transposed views and Conv1D-style weights cost no copy.
Matmul tiles come from a fixed table (``MATMUL_TILES``, chosen by ``matmul_plan``: shared memory
first, then the first tile of its kind whose grid fills the device's SMs) rather than autotuning,
so every configuration launched is known ahead of time (CI compiles them all) and no call pays for
tuning.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import (BLOCK_R_CHOICES, GPU_ROOFLINE, TRITON_DTYPES, bf16_via_fp32, block_r, cdiv, dot, gpu_arch,
                      input_precision, note_short_grid, sm_count, smem_limit, wave_split)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R, K_PART,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sp, stride_sm, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """s[p, M, R] = x[M, Kₚ] · a[R, Kₚ]ᵀ over part p = [p·K_PART, (p+1)·K_PART) of K (K_PART a
    multiple of BLOCK_K), fp32 accumulation; grid (⌈M/BLOCK_M⌉, ⌈R/BLOCK_R⌉, parts). One part:
    s is the product itself (stride_sp unused)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_start = pid_p * K_PART
    k_end = tl.minimum(k_start + K_PART, K)
    # int64 offsets, advanced by pointer: transposed views have strides up to the other dimension.
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k[None, :]).to(tl.int64) * stride_xk
    a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + (k_start + offs_k[:, None]).to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, a_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(s_ptr + pid_p.to(tl.int64) * stride_sp + offs_m[:, None].to(tl.int64) * stride_sm
             + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def add_lora_delta(acc, s_ptr, b_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, R, scaling,
                   stride_sm, stride_sr, stride_bn, stride_br,
                   BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr):
    """acc + (scaling·s[offs_m, :])·b[offs_n, :]ᵀ over the rank in BLOCK_R chunks: the LoRA delta joins
    the base GEMM's fp32 accumulator. scaling is folded into the small s tile, rounded to x's dtype
    (one extra rounding of an [M, r] value, as PEFT's own `delta * scaling` has)."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        r_mask = r < R
        s = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + r[None, :].to(tl.int64) * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        s = (s.to(tl.float32) * scaling).to(x_ptr.dtype.element_ty)
        b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + r[:, None].to(tl.int64) * stride_br,
                      mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = dot(s, b_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
    return acc


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` of a num_m x num_n grid in grouped order: GROUP_M
    row tiles share each column strip of w while it is in L2."""
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def _tile_k_loop(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, m_mask, n_mask, r_mask, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 SHRINK: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr):
    """(x[offs_m, :]·w[offs_n, :]ᵀ [BLOCK_M, BLOCK_N], and with SHRINK x[offs_m, :]·a[offs_r, :]ᵀ
    [BLOCK_M, BLOCK_R] from the same x tiles, else zeros), fp32, over all of K."""
    offs_k = tl.arange(0, BLOCK_K)
    # int64 offsets, advanced by pointer: in the backward W arrives as Wᵀ, whose K stride is the
    # original K, so k·stride reaches N·K (past 2³¹ for a large vocabulary projection).
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk
    a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, w_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        if SHRINK:  # the x tile already loaded for the GEMM also feeds x·Aᵀ
            a_t = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            s_acc = dot(x, a_t, s_acc, INPUT_PRECISION, BF16_VIA_FP32)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, s_acc


@triton.jit
def store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_bias, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr):
    """y[offs_m, offs_n] = acc + bias[offs_n], rounded once to y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _fused_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    stride_bias,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """y[M, N] = x[M, K]·w[N, K]ᵀ + bias[N] + (scaling·s[M, R])·b[N, R]ᵀ in one fp32 accumulator."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)  # not read: x·Aᵀ comes in as s
    acc, _ = _tile_k_loop(x_ptr, w_ptr, x_ptr, offs_m, offs_n, offs_r, m_mask, n_mask, offs_r < R, K,
                          stride_xm, stride_xk, stride_wn, stride_wk, 0, 0,
                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, False, INPUT_PRECISION, BF16_VIA_FP32)
    if HAS_LORA:  # the LoRA delta joins the same accumulator
        acc = add_lora_delta(acc, s_ptr, b_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, R, scaling,
                             stride_sm, stride_sr, stride_bn, stride_br, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)
    store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_bias, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _add_delta_tile(acc, s_lora, b_ptr, offs_n, offs_r, n_mask, r_mask, stride_bn, stride_br,
                    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr):
    """acc + s_lora[BLOCK_M, BLOCK_R]·b[offs_n, offs_r]ᵀ: the whole rank in one MMA."""
    b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None].to(tl.int64) * stride_br,
                  mask=n_mask[None, :] & r_mask[:, None], other=0.0)
    return dot(s_lora, b_t, acc, INPUT_PRECISION, BF16_VIA_FP32)


@triton.jit
def _fused_shrink_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, s_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    stride_sm, stride_sr, stride_bias,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, N_GROUP: tl.constexpr, GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BF16_VIA_FP32: tl.constexpr,
):
    """y[M, N] = x[M, K]·w[N, K]ᵀ + bias[N] + (scaling·s)·b[N, R]ᵀ and s[M, R] = x·a[R, K]ᵀ in one
    launch, R ≤ BLOCK_R. A program owns one BLOCK_M row block and N_GROUP consecutive BLOCK_N column
    tiles; the first tile's K loop also accumulates x·Aᵀ from the x tiles it loads anyway, and the
    later tiles reuse that [BLOCK_M, BLOCK_R] block from registers. Each program thus recomputes its
    row block's x·Aᵀ once: BLOCK_R/(N_GROUP·BLOCK_N) more MMA work than the base GEMM."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_g = grouped_tile(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N * N_GROUP), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    n_first = pid_g * N_GROUP * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc, s_acc = _tile_k_loop(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, m_mask, n_mask, r_mask, K,
                              stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, True, INPUT_PRECISION, BF16_VIA_FP32)
    s = s_acc.to(s_ptr.dtype.element_ty)  # rounded as the separate shrink's output is
    tl.store(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr, s,
             mask=m_mask[:, None] & r_mask[None, :] & (pid_g == 0))  # s leaves once per row block
    # scaling folded into the small s block, rounded to x's dtype (as add_lora_delta does)
    s_lora = (s.to(tl.float32) * scaling).to(x_ptr.dtype.element_ty)
    acc = _add_delta_tile(acc, s_lora, b_ptr, offs_n, offs_r, n_mask, r_mask, stride_bn, stride_br,
                          INPUT_PRECISION, BF16_VIA_FP32)
    store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_bias, stride_ym, stride_yn, HAS_BIAS)
    for j in tl.static_range(1, N_GROUP):
        if n_first + j * BLOCK_N < N:
            offs_n = n_first + j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            acc, _ = _tile_k_loop(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, m_mask, n_mask, r_mask, K,
                                  stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                                  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, False, INPUT_PRECISION, BF16_VIA_FP32)
            acc = _add_delta_tile(acc, s_lora, b_ptr, offs_n, offs_r, n_mask, r_mask, stride_bn, stride_br,
                                  INPUT_PRECISION, BF16_VIA_FP32)
            store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_bias, stride_ym, stride_yn,
                         HAS_BIAS)


# ---------------------------------------------------------------- launch configuration

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Half precision tiles follow the Triton
# matmul tutorial's best Hopper/Ampere entries; not yet re-measured on our kernels (no GPU in the
# session that wrote them: see benchmarks/results/ for the first measured run).
MATMUL_TILES = {
    "small_m": (32, 128, 64, 4, 4),    # M <= 64: decode and short prompts
    "small_m_narrow": (16, 16, 256, 4, 4),  # M <= 64 where small_m leaves SMs idle (N < 132·128)
    "large": (128, 256, 64, 8, 3),     # 96-160 KiB of shared memory (below): sm_80, sm_90
    "large_99k": (128, 128, 64, 8, 3),  # 64-80 KiB on sm_8x: the large tile for 99 KiB parts (sm_86, sm_89)
    "medium": (64, 64, 64, 4, 4),      # M > 64 where the large tiles leave SMs idle (M·N < 132·128·128)
    "fp32": (64, 128, 32, 4, 3),
    "fp32_narrow": (32, 64, 32, 4, 3),
    "interpret": (32, 32, 32, 4, 1),   # the CPU interpreter: small tiles keep tests fast, ragged edges hit
}
_SHRINK_TILES = {"gpu": (64, 128), "interpret": (32, 32)}  # (BLOCK_M, BLOCK_K)
GROUP_M = 8


# Shared memory of the "large" tile as Triton 3.8 compiles it for sm_8x (the architectures with
# 99 KiB parts), by BLOCK_R: the LoRA loop after the K loop is pipelined too, so the rank block
# adds its own stages. tests/test_triton_configs.py compiles every tile the rule below picks for
# sm_80/86/89/90 and checks it fits that architecture's limit.
LARGE_TILE_SMEM = {16: 98304, 32: 98304, 64: 114688}


# Tiles tried in order for each kind of launch (after the shared-memory rule): the first whose grid
# gives every SM a program (one wave at least) is taken; when none does, the last (the most programs)
# with the reason noted. Smaller tiles re-read x and W more often (from L2), so they come last.
_TILE_ORDER = {"fp32": ("fp32", "fp32_narrow"), "small_m": ("small_m", "small_m_narrow"),
               "large": ("large", "large_99k", "medium"), "large_99k": ("large_99k", "medium")}


def fused_shrink_large_tile(arch: int, rank_block: int) -> bool:
    """Whether the fused-shrink kernel takes the 128x256 tile on sm_`arch` at BLOCK_R = rank_block:
    only on sm_90, up to BLOCK_R 32, where wgmma reads its operands from shared memory and registers
    hold the accumulators alone (Triton 3.8, bf16, compiled: 232-242 registers, no spill, 150-156
    KiB of shared memory). On sm_80 mma.sync stages its operands in registers: the 128x256 tile
    spills (255 registers, 128 STL at BLOCK_R 16), and at BLOCK_R 64 so does sm_90's (13 STL);
    there the 128x128 tile ("large_99k", 68-80 KiB) fits every architecture."""
    return arch >= 90 and rank_block <= 32


def matmul_plan(M: int, N: int | None, dtype: torch.dtype, device: torch.device | None = None,
                rank_block: int = 64, extra_rows: int = 0, kernel: str = "fused") -> tuple[str, str | None]:
    """(tile of ``MATMUL_TILES``, why its grid is below one wave or None) for an [M, N] output of
    `dtype` on `device` (None: the current CUDA device), within its shared memory per block and
    filling its SMs when a tile of the kind can; rank_block: the launch's BLOCK_R; extra_rows: rows
    tiled after M's (DoRA's A); N None: the grid is not considered; kernel: "fused" (the GEMM
    kernels taking s) or "fused_shrink" (whose large tile also stages A)."""
    if triton_interpreting():
        return "interpret", None
    device = device if device is not None else torch.device("cuda")
    if dtype == torch.float32:
        kind = "fp32"
    elif M <= 64:
        kind = "small_m"
    else:
        kind = "large" if LARGE_TILE_SMEM[rank_block] <= smem_limit(device) else "large_99k"
        if kernel == "fused_shrink" and not fused_shrink_large_tile(gpu_arch(device), rank_block):
            kind = "large_99k"
    order = _TILE_ORDER[kind]
    if N is None:
        return order[0], None
    sms = sm_count(device)

    def programs(tile):
        bm, bn = MATMUL_TILES[tile][:2]
        return (cdiv(M, bm) + cdiv(extra_rows, bm)) * cdiv(N, bn)
    for tile in order:
        if programs(tile) >= sms:
            return tile, None
    bm, bn = MATMUL_TILES[order[-1]][:2]
    return order[-1], (f"the whole output is {programs(order[-1])} tiles of {bm}x{bn} (the smallest {kind} tile), "
                       f"fewer than the {sms} SMs")


def matmul_tile(M: int, dtype: torch.dtype, device: torch.device | None = None, rank_block: int = 64,
                N: int | None = None, extra_rows: int = 0) -> str:
    """The tile :func:`matmul_plan` picks."""
    return matmul_plan(M, N, dtype, device, rank_block, extra_rows)[0]


def shrink_parts(M: int, K: int, R: int, block_m: int, block_k: int, sms: int) -> tuple[int, int, str | None]:
    """(K_PART, parts, why the grid stays below `sms` programs or None) of the shrink: K split into
    parts of whole BLOCK_K blocks, the fewest that give every SM a program (``wave_split``)."""
    tiles = cdiv(M, block_m) * cdiv(R, block_r(R))
    blocks = max(1, cdiv(K, block_k))
    parts = wave_split(tiles, blocks, sms)
    k_part = cdiv(blocks, parts) * block_k
    parts = cdiv(blocks, k_part // block_k)
    reason = None if tiles * parts >= sms else (
        f"the whole product is {tiles} tile(s) of {block_m}x{block_r(R)} by {blocks} K block(s) of {block_k}: "
        f"{tiles * parts} programs, fewer than the {sms} SMs, each with {k_part // block_k} K block(s)")
    return k_part, parts, reason


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x[M, K] · a[R, K]ᵀ`` → ``[M, R]`` in x's dtype (any strides).

    [M, R] is a few tiles (64 at M = 4096, one at decode), so K is split across programs until the
    grid fills the device's SMs; each part writes its fp32 partial sums to its own slice of a
    [parts, M, R] buffer and the parts are summed by ``torch.sum`` in a fixed order (no atomics:
    the result is the same on every run), then rounded once to x's dtype."""
    M, K = x.shape
    R = a.shape[0]
    if M * R == 0:
        return torch.zeros((M, R), device=x.device, dtype=x.dtype)  # an empty grid is not a valid launch
    block_m, block_k = _SHRINK_TILES["interpret" if triton_interpreting() else "gpu"]
    rank_block = block_r(R)
    k_part, parts, reason = shrink_parts(M, K, R, block_m, block_k, sm_count(x.device))
    out = torch.empty((M, R) if parts == 1 else (parts, M, R), device=x.device,
                      dtype=x.dtype if parts == 1 else torch.float32)
    grid = (cdiv(M, block_m), cdiv(R, rank_block), parts)
    if reason:
        note_short_grid(reason)
    wrap_triton(_shrink_kernel)[grid](
        x, a, out, M, K, R, k_part,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0) if parts > 1 else 0,
        out.stride(-2), out.stride(-1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block, INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype),
        num_warps=4,
    )
    return out if parts == 1 else out.sum(0).to(x.dtype)


def fused_matmul(x, w, bias, s, b, scaling: float) -> torch.Tensor:
    """``x[M, K]·w[N, K]ᵀ + bias[N] + (scaling·s[M, R])·b[N, R]ᵀ`` → ``[M, N]``; s/b None: no delta."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    has_lora = s is not None
    R = s.shape[1] if has_lora else 0
    tile, reason = matmul_plan(M, N, x.dtype, x.device, block_r(R))
    block_m, block_n, block_k, warps, stages = MATMUL_TILES[tile]
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    if reason:
        note_short_grid(reason)
    # Unused pointer arguments get y, a valid tensor of the right dtype, never dereferenced.
    s_, b_ = (s, b) if has_lora else (y, y)
    wrap_triton(_fused_matmul_kernel)[grid](
        x, w, y if bias is None else bias, s_, b_, y,
        M, N, K, R, scaling,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        s_.stride(0), s_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
        1 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r(R), GROUP_M=GROUP_M,
        INPUT_PRECISION=input_precision(x.dtype), BF16_VIA_FP32=bf16_via_fp32(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return y


# Column tiles per program of the fused-shrink kernel on sm_90, tried largest first: the first whose
# grid still gives every SM a program. Each program recomputes its row block's x·Aᵀ once, so the
# recompute is BLOCK_R/(N_GROUP·BLOCK_N) of the base GEMM's MMA work: 1/16 at the large tile
# (BLOCK_N 256) and r ≤ 16 with one tile per program, 1/64 with four. The x tile is re-read (from
# L2) for each of a program's tiles, as it is by separate programs. sm_8x keeps one tile per
# program: there the unrolled later tiles spill (128x128 tile, BLOCK_R 16, N_GROUP 4: 255
# registers, 11 STL on sm_86; 55 at BLOCK_R 64 on sm_80), one tile does not (128 registers).
N_GROUPS = (4, 2, 1)
FUSED_SHRINK_MAX_RANK = BLOCK_R_CHOICES[-1]   # x·Aᵀ [BLOCK_M, r] is held whole in registers


def fused_shrink_plan(M: int, N: int, R: int, dtype: torch.dtype, device: torch.device | None = None
                      ) -> tuple[str, int, str | None]:
    """(tile, N_GROUP, why the grid is below one wave or None) of the fused-shrink kernel for an
    [M, N] output of rank R: :func:`matmul_plan`'s tile for the kernel, then the most column tiles
    per program (``N_GROUPS``) that keep a program per SM."""
    tile, reason = matmul_plan(M, N, dtype, device, block_r(R), kernel="fused_shrink")
    bm, bn = MATMUL_TILES[tile][:2]
    device = device if device is not None else torch.device("cuda")
    sms = sm_count(device)
    for group in (N_GROUPS if gpu_arch(device) >= 90 else (1,)):
        if cdiv(M, bm) * cdiv(N, bn * group) >= sms:
            return tile, group, reason
    return tile, 1, reason


def fused_shrink_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[M, K]·w[N, K]ᵀ + bias[N] + (scaling·s)·b[N, R]ᵀ, s = x·a[R, K]ᵀ)`` → ``([M, N], [M, R])``
    in x's dtype, in one launch: x·Aᵀ accumulates in the base GEMM's K loop (no shrink launch, x
    read once). R ≤ ``FUSED_SHRINK_MAX_RANK`` (64); above, :func:`shrink` then :func:`fused_matmul`."""
    M, K = x.shape
    N, R = w.shape[0], a.shape[0]
    if R > FUSED_SHRINK_MAX_RANK:
        raise ValueError(f"fused_shrink_matmul: rank {R} is above {FUSED_SHRINK_MAX_RANK}, the most the kernel "
                         f"holds in registers as one [BLOCK_M, r] block; use shrink() then fused_matmul()")
    if N == 0:  # no column tile to carry x·Aᵀ: the shrink alone
        return x.new_empty((M, 0)), shrink(x, a)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, s
    tile, n_group, reason = fused_shrink_plan(M, N, R, x.dtype, x.device)
    block_m, block_n, block_k, warps, stages = MATMUL_TILES[tile]
    grid = (cdiv(M, block_m) * cdiv(N, block_n * n_group),)
    if reason:
        note_short_grid(reason)
    wrap_triton(_fused_shrink_matmul_kernel)[grid](
        x, w, y if bias is None else bias, a, b, y, s,
        M, N, K, R, scaling,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        y.stride(0), y.stride(1), s.stride(0), s.stride(1), 1 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r(R),
        N_GROUP=n_group, GROUP_M=GROUP_M, INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype), num_warps=warps, num_stages=stages,
    )
    return y, s


# ---------------------------------------------------------------- the forward's cost rule

# Fractions of the tensor-core peak (GPU_ROOFLINE) a GEMM reaches, by who wrote it and the
# architecture. sm_90 measured (H200, bf16, M = N = K = 4096, r = 16; benchmarks/results/
# 2026-12-04-h200-device-check-1/2026-12-04-h200.json): cuBLAS's base GEMM 0.206 ms = 0.84 of
# 790 TFLOP/s; the Triton face (fused shrink) 0.465 ms = 0.37 (no TMA, no warp specialisation).
# Wall time per call (CUDA events), so each face's launch path is in it: the rule compares faces as
# a call costs them, though its rooflines leave launches out.
# sm_8x not measured: Triton's own matmul tutorial shows it level with cuBLAS there, both 0.9.
MMA_EFFICIENCY = {"triton": {90: 0.37, 80: 0.9, 86: 0.9, 89: 0.9}, "cublas": {90: 0.84, 80: 0.9, 86: 0.9, 89: 0.9}}


def _roofline(flops: float, nbytes: float, arch: int, who: str) -> float:
    """Seconds of a launch: its MMA FLOPs at `who`'s fraction of the peak, or its bytes at the
    effective bandwidth, whichever is longer."""
    peak = GPU_ROOFLINE[arch]
    return max(flops / (MMA_EFFICIENCY[who][arch] * peak["flops"]), nbytes / peak["bandwidth"])


def fwd_estimates(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device | None = None
                  ) -> dict[str, float]:
    """The cost rule's seconds for the LoRA forward of a half-precision [M, K]·[N, K]ᵀ at rank R on
    `device`'s architecture (launch cost left out, as the static model leaves it out), each path a
    sum of rooflines (:func:`_roofline`):

    * ``"shrink_then_fused"``: :func:`shrink` (x read again; its split's fp32 parts written and
      summed) then :func:`fused_matmul` (MMA on whole tiles, the delta at BLOCK_R);
    * ``"fused_shrink"`` (R ≤ 64): :func:`fused_shrink_matmul`, with the recompute of x·Aᵀ per
      program: 2·M·K·BLOCK_R per N_GROUP column tiles;
    * ``"cublas"``: the CUDA face above its GEMV rows (csrc/cuda/lora_linear.cu): s = x·Aᵀ, the
      delta s·Bᵀ (+ bias) written as an [M, N] tensor, then cuBLAS's GEMM taking it as its C operand;
    * ``"base"``: x·Wᵀ alone by cuBLAS, what the bench's targets divide by.
    """
    device = device if device is not None else torch.device("cuda")
    arch, e = gpu_arch(device), dtype.itemsize
    rank_block = block_r(R)
    shrink_bytes = (M * K + R * K + M * R) * e
    out = {"base": _roofline(2.0 * M * N * K, (M * K + N * K + M * N) * e, arch, "cublas")}
    out["cublas"] = (_roofline(2.0 * M * K * R, shrink_bytes, arch, "cublas")
                     + _roofline(2.0 * M * N * R, (M * R + N * R + M * N) * e, arch, "cublas")
                     + _roofline(2.0 * M * N * K, (M * K + N * K + 2 * M * N) * e, arch, "cublas"))

    def padded(n, block):
        return cdiv(n, block) * block
    gemm_bytes = (M * K + N * K + M * N + N * R + M * R) * e
    tile = MATMUL_TILES[matmul_plan(M, N, dtype, device, rank_block)[0]]
    parts = shrink_parts(M, K, R, *_SHRINK_TILES["gpu"], sm_count(device))[1]
    split_bytes = 2 * parts * M * R * 4 if parts > 1 else 0      # fp32 parts written, then summed
    out["shrink_then_fused"] = (_roofline(2.0 * M * K * rank_block, shrink_bytes + split_bytes, arch, "triton")
                                + _roofline(2.0 * padded(M, tile[0]) * padded(N, tile[1]) * (K + rank_block),
                                            gemm_bytes, arch, "triton"))
    if R <= FUSED_SHRINK_MAX_RANK:
        name, n_group, _ = fused_shrink_plan(M, N, R, dtype, device)
        bm, bn = MATMUL_TILES[name][:2]
        flops = (2.0 * padded(M, bm) * padded(N, bn) * (K + rank_block)
                 + 2.0 * padded(M, bm) * K * rank_block * cdiv(N, bn * n_group))
        out["fused_shrink"] = _roofline(flops, gemm_bytes + R * K * e, arch, "triton")
    return out


def fwd_mode(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device | None = None,
             dropout: bool = False) -> str:
    """How the Triton face computes the forward: "fused_shrink" (one launch) or "shrink_then_fused".

    The separate shrink stays where the one launch cannot win or cannot run:
    * dropout: the shrink reads x_lora, another tensor than the GEMM's x;
    * M ≤ 64 (decode, short prompts): the small_m tiles are 16-128 columns wide, so each program
      re-reads A (r·K) for every BLOCK_N·K of W it reads: at the decode tile (16 wide) as many
      bytes of A as of W. Static-model estimates (4096², r = 16, bf16, the one launch forced):
      M = 1 and 16, sm_80 31.7 us against 18.8-18.9 for shrink + fused GEMM; sm_90 7.9 either way,
      where the shrink's two launches cost what the model leaves out;
    * fp32: its MMA peak (TF32, or FMA without it) is not the half types' that the rule assumes;
    * BLOCK_R 64 on sm_8x, where the 128x128 tile spills (14 STL on sm_80), and r > 64;
    otherwise the faster by :func:`fwd_estimates`: x·Aᵀ recomputed per program costs BLOCK_R/
    (N_GROUP·BLOCK_N) of the GEMM's MMA time, the separate shrink a read of x (2·M·K bytes), so the
    one launch wins at narrow N and small ranks. Rule estimates, M = K = 4096, r = 16, bf16: sm_90
    N = 4096 (two 256-wide tiles per program) 240.1 us against 241.2, N = 14336 827.7 against 823.4;
    sm_80 (one 128-wide tile per program) N = 1024 138.1 against 142.2, N = 4096 552.5 against 510.7.
    """
    device = device if device is not None else torch.device("cuda")
    rank_block = block_r(R)
    if (dropout or M <= 64 or dtype == torch.float32 or R > FUSED_SHRINK_MAX_RANK
            or rank_block > 32 and gpu_arch(device) < 90):
        return "shrink_then_fused"
    est = fwd_estimates(M, N, K, R, dtype, device)
    return "fused_shrink" if est["fused_shrink"] < est["shrink_then_fused"] else "shrink_then_fused"


def fastest_fwd_face(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device) -> str:
    """"triton" or "cuda" (its cuBLAS composition): the one :func:`fwd_estimates` puts first for a
    half-precision forward above the CUDA face's GEMV rows, the Triton face at :func:`fwd_mode`'s
    choice. The op's per-shape rule on CUDA (fastpeft/ops/lora_linear.py) orders its faces by it."""
    return _fastest_fwd_face(M, N, K, R, dtype, device, gpu_arch(device), sm_count(device), smem_limit(device))


@functools.lru_cache(maxsize=4096)
def _fastest_fwd_face(M, N, K, R, dtype, device, arch, sms, smem) -> str:
    # keyed by what the plan reads of the device too (the static model plans several architectures)
    est = fwd_estimates(M, N, K, R, dtype, device)
    return "triton" if est[fwd_mode(M, N, K, R, dtype, device)] <= est["cublas"] else "cuda"


# ---------------------------------------------------------------- the op's Triton face

def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float,
                    x_lora: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::lora_linear_fwd`` (shapes and dtypes: fastpeft/ops/lora_linear.py):
    one fused-shrink launch or the shrink then the fused GEMM, as :func:`fwd_mode` decides."""
    M, K = x.shape
    if fwd_mode(M, weight.shape[0], K, lora_a.shape[0], x.dtype, x.device, x_lora is not None) == "fused_shrink":
        return fused_shrink_matmul(x, weight, bias, lora_a, lora_b, scaling)
    return shrink_then_fused(x, weight, bias, lora_a, lora_b, scaling, x_lora)


def shrink_then_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float,
                      x_lora: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward in two launches (three with a split shrink): :func:`shrink`, then
    :func:`fused_matmul` taking s; returns (y, s)."""
    s = shrink(x if x_lora is None else x_lora, lora_a)
    return fused_matmul(x, weight, bias, s, lora_b, scaling), s


def lora_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, s: torch.Tensor, scaling: float, x_lora: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::lora_linear_bwd``."""
    t = shrink(grad_y, lora_b.t())                                   # dy·B: [M, r]
    if x_lora is None:
        grad_x = fused_matmul(grad_y, weight.t(), None, t, lora_a.t(), scaling)   # dy·W + scaling·t·A
        grad_x_lora = x.new_empty(0)
    else:  # dropout: the two branches reach x through different paths
        grad_x = fused_matmul(grad_y, weight.t(), None, None, None, 0.0)
        grad_x_lora = torch.mm(t, lora_a).mul_(scaling)
    ts = t.t() * scaling
    grad_a = torch.mm(ts, x if x_lora is None else x_lora)
    grad_b = torch.mm(grad_y.t(), s).mul_(scaling)
    return grad_x, grad_x_lora, grad_a, grad_b


# ---------------------------------------------------------------- ahead-of-time compile list

def aot_configs():
    """Yield (kernel, signature, constexprs, options) for every launch configuration above."""
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        prec = ["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]
        for precision in prec:
            for rb in BLOCK_R_CHOICES:
                for out in dict.fromkeys((ptr, "*fp32")):  # s itself, or the fp32 partial sums of a split K
                    sig = {"x_ptr": ptr, "a_ptr": ptr, "s_ptr": out, "M": "i32", "K": "i32", "R": "i32", "K_PART": "i32",
                           **{f: "i32" for f in ("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_sp",
                                                 "stride_sm", "stride_sr")}}
                    bm, bk = _SHRINK_TILES["gpu"]
                    yield _shrink_kernel, sig, dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=rb, INPUT_PRECISION=precision,
                                                      BF16_VIA_FP32=False), \
                        dict(num_warps=4, num_stages=3)
            for tile in (["fp32", "fp32_narrow"] if dtype == torch.float32 else ["large", "large_99k", "medium"]):
                bm, bn, bk, warps, stages = MATMUL_TILES[tile]
                for has_bias in (False, True):
                    for rb in BLOCK_R_CHOICES:
                        if tile == "large" and not fused_shrink_large_tile(90, rb):
                            continue   # the plan never takes it
                        for n_group in N_GROUPS:
                            sig = {"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "a_ptr": ptr, "b_ptr": ptr,
                                   "y_ptr": ptr, "s_ptr": ptr, "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                                   "scaling": "fp32",
                                   **{f: "i32" for f in ("stride_xm", "stride_xk", "stride_wn", "stride_wk",
                                                         "stride_ar", "stride_ak", "stride_bn", "stride_br",
                                                         "stride_ym", "stride_yn", "stride_sm", "stride_sr",
                                                         "stride_bias")}}
                            yield _fused_shrink_matmul_kernel, sig, dict(
                                HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=rb, N_GROUP=n_group,
                                GROUP_M=GROUP_M, INPUT_PRECISION=precision, BF16_VIA_FP32=False), \
                                dict(num_warps=warps, num_stages=stages)
            tiles = (["fp32", "fp32_narrow"] if dtype == torch.float32 else
                     ["small_m", "small_m_narrow", "large", "large_99k", "medium"])
            for tile in tiles:
                bm, bn, bk, warps, stages = MATMUL_TILES[tile]
                for has_bias in (False, True):
                    for has_lora in (False, True):
                        for rb in (BLOCK_R_CHOICES if has_lora else (16,)):
                            sig = {"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr,
                                   "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32",
                                   **{f: "i32" for f in ("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_sm",
                                                         "stride_sr", "stride_bn", "stride_br", "stride_ym", "stride_yn",
                                                         "stride_bias")}}
                            yield _fused_matmul_kernel, sig, dict(
                                HAS_BIAS=has_bias, HAS_LORA=has_lora, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                BLOCK_R=rb, GROUP_M=GROUP_M, INPUT_PRECISION=precision, BF16_VIA_FP32=False), \
                                dict(num_warps=warps, num_stages=stages)
