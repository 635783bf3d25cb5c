"""Triton face of ``dora_linear``: one GEMM over W for x's rows and A's rows, then a scale epilogue.

Forward, for x ``[M, K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``, magnitude m ``[N]``:
  1. ``s = x_l·Aᵀ`` (lora_linear's shrink kernel);
  2. ``_dora_matmul_kernel``: one launch whose row tiles are x's (⌈M/BLOCK_M⌉ of them) followed by
     A's (⌈r/BLOCK_M⌉), every tile against the same W column strip, grouped so that the programs
     sharing a strip run together: W is read once for ``x·Wᵀ`` and ``A·Wᵀ``. x tiles write
     ``z = x_l·Wᵀ + scaling·s·Bᵀ`` (the LoRA delta joins the fp32 accumulator, as in lora_linear);
     with dropout they also read x_lora against the same W tile and write d = x·Wᵀ − x_l·Wᵀ.
     A tiles write ``A·Wᵀ`` in float32.
  3. ``_dora_scale_kernel``: per column block, the row norms from
     ``‖Wᵢ‖² + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ`` (computed in torch: [N] from [N, r] and [r, r] work) plus
     ``2s·Bᵢ·(A·Wᵢᵀ)``, g = m / norm, and ``y = g⊙z (+ d) + bias`` in float32, written once.

Backward: ``_dora_grad_kernel`` reads dy and z once and writes dy_g = g⊙dy (and (g − 1)⊙dy with
dropout) and per-tile column sums of dy⊙z (the magnitude's gradient); the rest is lora_linear's
Triton backward applied to dy_g (its fused dx GEMM, shrink and skinny GEMMs).

Tiles come from lora_linear's fixed table, so every configuration is known ahead of time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import (BLOCK_R_CHOICES, TRITON_DTYPES, bf16_via_fp32, block_r, cdiv, dot, input_precision,
                      note_short_grid, sm_count)
from .lora_linear import GROUP_M, MATMUL_TILES, add_lora_delta, fused_matmul, lora_linear_bwd, matmul_plan, shrink


@triton.jit
def _dora_matmul_kernel(
    x_ptr, xl_ptr, a_ptr, w_ptr, s_ptr, b_ptr, z_ptr, d_ptr, aw_ptr,
    M, N, K, R, scaling, tiles_x,
    stride_xm, stride_xk, stride_am, stride_ak, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_zm, stride_awr,
    HAS_X_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """Row tiles [0, tiles_x) are x's, the rest A's; see the module docstring. x_lora shares x's strides."""
    pid = tl.program_id(0)
    num_m = tiles_x + tl.cdiv(R, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    is_a = pid_m >= tiles_x
    offs_m = (pid_m - tiles_x * is_a.to(tl.int32)) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # A tile's rows are all A's or all x's: the other load is masked off whole (no memory traffic).
    x_rows = (offs_m < M) & (pid_m < tiles_x)
    a_rows = (offs_m < R) & is_a
    n_mask = offs_n < N
    x_off = offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        src = tl.load(x_ptr + x_off, mask=x_rows[:, None] & k_mask[None, :], other=0.0) + \
            tl.load(a_ptrs, mask=a_rows[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(src, w_t, acc, INPUT_PRECISION, BF16_VIA_FP32)
        if HAS_X_LORA:
            x_l = tl.load(xl_ptr + x_off, mask=x_rows[:, None] & k_mask[None, :], other=0.0)
            acc_l = dot(x_l, w_t, acc_l, INPUT_PRECISION, BF16_VIA_FP32)
        x_off += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if is_a:  # A·Wᵀ, kept in float32 for the norms
        tl.store(aw_ptr + offs_m[:, None].to(tl.int64) * stride_awr + offs_n[None, :], acc,
                 mask=a_rows[:, None] & n_mask[None, :])
    else:
        out_mask = x_rows[:, None] & n_mask[None, :]
        out_off = offs_m[:, None].to(tl.int64) * stride_zm + offs_n[None, :].to(tl.int64)
        if HAS_X_LORA:  # d = x·Wᵀ − x_l·Wᵀ from the two fp32 accumulators; z is the x_lora branch's
            tl.store(d_ptr + out_off, (acc - acc_l).to(d_ptr.dtype.element_ty), mask=out_mask)
            acc = acc_l
        acc = add_lora_delta(acc, s_ptr, b_ptr, x_ptr, offs_m, offs_n, x_rows, n_mask, R, scaling,
                             stride_sm, stride_sr, stride_bn, stride_br, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)
        tl.store(z_ptr + out_off, acc.to(z_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dora_scale_kernel(
    z_ptr, d_ptr, aw_ptr, b_ptr, partial_ptr, m_ptr, bias_ptr, y_ptr, norm_ptr,
    M, N, R, scaling,
    stride_zm, stride_awr, stride_bn, stride_br, stride_m, stride_bias,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """norm = sqrt(partial + 2·scaling·Σ_r B[n, r]·AW[r, n]); y = (m / norm)⊙z (+ d) + bias, fp32.
    Every row tile recomputes its columns' norms (r·BLOCK_N work); the first one stores them."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        mask = (r < R)[:, None] & n_mask[None, :]
        aw = tl.load(aw_ptr + r[:, None].to(tl.int64) * stride_awr + offs_n[None, :], mask=mask, other=0.0)
        b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + r[:, None].to(tl.int64) * stride_br,
                      mask=mask, other=0.0).to(tl.float32)
        cross += tl.sum(b_t * aw, axis=0)
    norm_sq = tl.load(partial_ptr + offs_n, mask=n_mask, other=1.0) + 2.0 * scaling * cross
    norm = tl.sqrt(tl.maximum(norm_sq, 0.0))  # below zero only by rounding where the row nearly cancels
    g = tl.load(m_ptr + offs_n * stride_m, mask=n_mask, other=0.0).to(tl.float32) / norm
    if pid_m == 0:
        tl.store(norm_ptr + offs_n, norm, mask=n_mask)
    off = offs_m[:, None].to(tl.int64) * stride_zm + offs_n[None, :].to(tl.int64)
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32) * g[None, :]
    if HAS_D:
        y += tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dora_grad_kernel(
    dy_ptr, z_ptr, m_ptr, norm_ptr, dyg_ptr, dygm1_ptr, colsum_ptr,
    M, N, stride_m,
    HAS_X_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dy_g = g⊙dy, (g − 1)⊙dy with dropout, and this row tile's Σ dy⊙z per column (fp32),
    g = m / norm; dy, z and the outputs are contiguous [M, N]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    g = tl.load(m_ptr + offs_n * stride_m, mask=n_mask, other=0.0).to(tl.float32) / \
        tl.load(norm_ptr + offs_n, mask=n_mask, other=1.0)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(colsum_ptr + pid_m * N + offs_n, tl.sum(dy * z, axis=0), mask=n_mask)
    tl.store(dyg_ptr + off, (dy * g[None, :]).to(dyg_ptr.dtype.element_ty), mask=mask)
    if HAS_X_LORA:
        tl.store(dygm1_ptr + off, (dy * (g - 1.0)[None, :]).to(dygm1_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launch configuration

_ELEMENTWISE_TILES = {"gpu": (32, 128), "interpret": (16, 32)}  # (BLOCK_M, BLOCK_N) of the epilogues


def _elementwise_tile() -> tuple[int, int]:
    return _ELEMENTWISE_TILES["interpret" if triton_interpreting() else "gpu"]


def _note_elementwise_grid(M: int, N: int, device: torch.device) -> None:
    """The epilogues' grid is one program per 32x128 tile of [M, N], each a few KB of traffic: below
    one wave only when the whole [M, N] is (the reason the static model reports)."""
    em, en = _elementwise_tile()
    programs, sms = max(1, cdiv(M, em)) * cdiv(N, en), sm_count(device)
    if programs < sms:
        note_short_grid(f"the whole [{M}, {N}] output is {programs} tiles of {em}x{en}, fewer than the {sms} SMs")


def quad_terms(weight_norm_sq: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
               ) -> torch.Tensor:
    """``‖Wᵢ‖² + scaling²·Bᵢ·(A·Aᵀ)·Bᵢᵀ``, ``[N]`` float32: the norm terms W's product with A is not in."""
    a, b = lora_a.float(), lora_b.float()
    return weight_norm_sq + (scaling * scaling) * ((b @ (a @ a.t())) * b).sum(1)


# ---------------------------------------------------------------- the op's Triton face

def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, magnitude: torch.Tensor, weight_norm_sq: torch.Tensor, scaling: float,
                    x_lora: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::dora_linear_fwd`` (shapes and dtypes: fastpeft/ops/dora_linear.py)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    s = shrink(x if x_lora is None else x_lora, lora_a)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype)
    y = torch.empty_like(z)  # with dropout it holds d until the epilogue overwrites it with y
    aw = torch.empty((R, N), device=x.device, dtype=torch.float32)
    norm = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return y, s, z, norm
    tile, reason = matmul_plan(M, N, x.dtype, x.device, extra_rows=R)  # A's rows are tiled after x's
    block_m, block_n, block_k, warps, stages = MATMUL_TILES[tile]
    tiles_x = cdiv(M, block_m)
    grid = ((tiles_x + cdiv(R, block_m)) * cdiv(N, block_n),)
    if reason:
        note_short_grid(reason)
    xl = x if x_lora is None else x_lora
    if xl.stride() != x.stride():  # x_lora is read with x's strides (F.dropout returns it contiguous)
        xl = xl.contiguous()
        x = x.contiguous()
    wrap_triton(_dora_matmul_kernel)[grid](
        x, xl, lora_a, weight, s, lora_b, z, y, aw,
        M, N, K, R, scaling, tiles_x,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), weight.stride(0), weight.stride(1),
        s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1), z.stride(0), aw.stride(0),
        HAS_X_LORA=x_lora is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r(R), GROUP_M=GROUP_M,
        INPUT_PRECISION=input_precision(x.dtype), BF16_VIA_FP32=bf16_via_fp32(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    partial = quad_terms(weight_norm_sq, lora_a, lora_b, scaling)
    em, en = _elementwise_tile()
    _note_elementwise_grid(M, N, x.device)
    wrap_triton(_dora_scale_kernel)[(max(1, cdiv(M, em)), cdiv(N, en))](
        z, y, aw, lora_b, partial, magnitude, y if bias is None else bias, y, norm,
        M, N, R, scaling,
        z.stride(0), aw.stride(0), lora_b.stride(0), lora_b.stride(1), magnitude.stride(0),
        1 if bias is None else bias.stride(0),
        HAS_D=x_lora is not None, HAS_BIAS=bias is not None,
        BLOCK_M=em, BLOCK_N=en, BLOCK_R=block_r(R), num_warps=4,
    )
    return y, s, z, norm


def dora_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, magnitude: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                    norm: torch.Tensor, scaling: float, x_lora: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::dora_linear_bwd``."""
    M, N = grad_y.shape
    dy = grad_y.contiguous()
    z = z.contiguous()
    dy_g = torch.empty_like(dy)
    dy_gm1 = torch.empty_like(dy) if x_lora is not None else dy_g
    em, en = _elementwise_tile()
    tiles_m = cdiv(M, em)
    colsum = torch.zeros((max(tiles_m, 1), N), device=dy.device, dtype=torch.float32)
    if dy.numel():
        _note_elementwise_grid(M, N, dy.device)
        wrap_triton(_dora_grad_kernel)[(tiles_m, cdiv(N, en))](
            dy, z, magnitude, norm, dy_g, dy_gm1, colsum, M, N, magnitude.stride(0),
            HAS_X_LORA=x_lora is not None, BLOCK_M=em, BLOCK_N=en, num_warps=4)
    grad_m = (colsum.sum(0) / norm).to(magnitude.dtype)
    if x_lora is None:
        grad_x, grad_x_lora, grad_a, grad_b = lora_linear_bwd(dy_g, x, weight, lora_a, lora_b, s, scaling)
        return grad_x, grad_x_lora, grad_a, grad_b, grad_m
    t = shrink(dy_g, lora_b.t())                                                      # dy_g·B: [M, r]
    grad_x = fused_matmul(dy, weight.t(), None, None, None, 0.0)                      # dy·W
    grad_x_lora = fused_matmul(dy_gm1, weight.t(), None, t, lora_a.t(), scaling)      # (g−1)dy·W + s·t·A
    grad_a = torch.mm(t.t() * scaling, x_lora)
    grad_b = torch.mm(dy_g.t(), s).mul_(scaling)
    return grad_x, grad_x_lora, grad_a, grad_b, grad_m


# ---------------------------------------------------------------- ahead-of-time compile list

def aot_configs():
    """Yield (kernel, signature, constexprs, options) for every launch configuration above."""
    em, en = _ELEMENTWISE_TILES["gpu"]
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            for tile in (["fp32", "fp32_narrow"] if dtype == torch.float32 else
                         ["small_m", "small_m_narrow", "large", "large_99k", "medium"]):
                bm, bn, bk, warps, stages = MATMUL_TILES[tile]
                for has_x_lora in (False, True):
                    for rb in BLOCK_R_CHOICES:
                        sig = {"x_ptr": ptr, "xl_ptr": ptr, "a_ptr": ptr, "w_ptr": ptr, "s_ptr": ptr, "b_ptr": ptr,
                               "z_ptr": ptr, "d_ptr": ptr, "aw_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                               "R": "i32", "scaling": "fp32", "tiles_x": "i32",
                               **{f: "i32" for f in ("stride_xm", "stride_xk", "stride_am", "stride_ak", "stride_wn",
                                                     "stride_wk", "stride_sm", "stride_sr", "stride_bn", "stride_br",
                                                     "stride_zm", "stride_awr")}}
                        yield _dora_matmul_kernel, sig, dict(
                            HAS_X_LORA=has_x_lora, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=rb, GROUP_M=GROUP_M,
                            INPUT_PRECISION=precision, BF16_VIA_FP32=False), dict(num_warps=warps, num_stages=stages)
        for has_d in (False, True):
            for has_bias in (False, True):
                for rb in BLOCK_R_CHOICES:
                    sig = {"z_ptr": ptr, "d_ptr": ptr, "aw_ptr": "*fp32", "b_ptr": ptr, "partial_ptr": "*fp32",
                           "m_ptr": ptr, "bias_ptr": ptr, "y_ptr": ptr, "norm_ptr": "*fp32", "M": "i32", "N": "i32",
                           "R": "i32", "scaling": "fp32",
                           **{f: "i32" for f in ("stride_zm", "stride_awr", "stride_bn", "stride_br", "stride_m",
                                                 "stride_bias")}}
                    yield _dora_scale_kernel, sig, dict(HAS_D=has_d, HAS_BIAS=has_bias, BLOCK_M=em, BLOCK_N=en,
                                                        BLOCK_R=rb), dict(num_warps=4, num_stages=1)
        for has_x_lora in (False, True):
            sig = {"dy_ptr": ptr, "z_ptr": ptr, "m_ptr": ptr, "norm_ptr": "*fp32", "dyg_ptr": ptr, "dygm1_ptr": ptr,
                   "colsum_ptr": "*fp32", "M": "i32", "N": "i32", "stride_m": "i32"}
            yield _dora_grad_kernel, sig, dict(HAS_X_LORA=has_x_lora, BLOCK_M=em, BLOCK_N=en), \
                dict(num_warps=4, num_stages=1)
