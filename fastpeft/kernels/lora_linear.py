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

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import (BLOCK_R_CHOICES, TRITON_DTYPES, bf16_via_fp32, block_r, dot, input_precision, note_short_grid,
                      sm_count, smem_limit, wave_split)


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
    # Grouped tile order: GROUP_M row-tiles share each column strip of w while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # int64 offsets, advanced by pointer: in the backward W arrives as Wᵀ, whose K stride is the
    # original K, so k·stride reaches N·K (past 2³¹ for a large vocabulary projection).
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, w_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LORA:  # the LoRA delta joins the same accumulator
        acc = add_lora_delta(acc, s_ptr, b_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, R, scaling,
                             stride_sm, stride_sr, stride_bn, stride_br, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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


def matmul_plan(M: int, N: int | None, dtype: torch.dtype, device: torch.device | None = None,
                rank_block: int = 64, extra_rows: int = 0) -> tuple[str, str | None]:
    """(tile of ``MATMUL_TILES``, why its grid is below one wave or None) for an [M, N] output of
    `dtype` on `device` (None: the current CUDA device), within its shared memory per block and
    filling its SMs when a tile of the kind can; rank_block: the launch's BLOCK_R; extra_rows: rows
    tiled after M's (DoRA's A); N None: the grid is not considered."""
    if triton_interpreting():
        return "interpret", None
    device = device if device is not None else torch.device("cuda")
    if dtype == torch.float32:
        kind = "fp32"
    elif M <= 64:
        kind = "small_m"
    else:
        kind = "large" if LARGE_TILE_SMEM[rank_block] <= smem_limit(device) else "large_99k"
    order = _TILE_ORDER[kind]
    if N is None:
        return order[0], None
    sms = sm_count(device)

    def programs(tile):
        bm, bn = MATMUL_TILES[tile][:2]
        return (triton.cdiv(M, bm) + triton.cdiv(extra_rows, bm)) * triton.cdiv(N, bn)
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
    tiles = triton.cdiv(M, block_m) * triton.cdiv(R, block_r(R))
    blocks = max(1, triton.cdiv(K, block_k))
    parts = wave_split(tiles, blocks, sms)
    k_part = triton.cdiv(blocks, parts) * block_k
    parts = triton.cdiv(blocks, k_part // block_k)
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
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, rank_block), parts)
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
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
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


# ---------------------------------------------------------------- the op's Triton face

def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float,
                    x_lora: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::lora_linear_fwd`` (shapes and dtypes: fastpeft/ops/lora_linear.py)."""
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
