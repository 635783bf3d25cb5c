"""Triton face of ``adapter_block``: the whole bottleneck adapter block, one pass over the rows.

Forward, for x ``[M, K]``, h ``[M, N]``, Wd ``[R, K]``, Wu ``[N, R]`` (R the bottleneck, small):
one program per ``BLOCK_M`` rows

  1. ``z = x_tile·Wdᵀ + bd`` over the K loop into a ``[BLOCK_M, BLOCK_R]`` fp32 accumulator;
  2. ``a = act(z)`` in registers, rounded to the input dtype for the second GEMM;
  3. for each ``BLOCK_N`` column chunk: ``y = h + scaling·(a·Wuᵀ + bu)`` in fp32, stored once.

The intermediate never leaves the chip, and each element of y is written exactly once: x and h are
read once, y written once, the weights come from L2. With R up to the largest BLOCK_R (256) that
is the whole story; a wider bottleneck loops over R chunks, each adding its share onto y (read
back from memory after the first chunk): correct for any R, one extra read and write of y per
extra chunk. A barrier (``tl.debug_barrier``, bar.sync) between chunks orders the read-back after
every thread's stores, so correctness does not rest on loads and stores sharing a layout.

Backward (grad_y = dy): one program per row tile recomputes ``z`` and ``a = act(z)`` (never saved
by the forward), forms ``da = dy·Wu`` over the N loop and ``dz = scaling·da⊙act'(z)`` in registers,
and writes ``dx = dz·Wd`` over the K loop, plus the small ``[M, R]`` tensors a and dz. The weight
gradients ``dWd = dzᵀ·x`` and ``dWu = scaling·dyᵀ·a`` reduce over all M rows: skinny GEMMs left
to ``torch.mm``, whose cuBLAS kernels split that long reduction across SMs (as ``lora_linear``'s
dA and dB are).

The activation is a runtime argument (an index into ``fastpeft.activations.ADAPTER_ACTIVATIONS``),
not a constexpr: one uniform branch per tile costs nothing next to the GEMMs, and it keeps the
compiled configurations (``aot_configs``, compiled by CI for sm_80 and sm_90) to 54, as do the
runtime bias flags (the rows per program are halved on a short grid: ``_launch_params``). gelu is the exact (erf) form or the tanh approximation, as asked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..activations import ADAPTER_ACTIVATIONS
from ..backends import triton_interpreting
from ._common import TRITON_DTYPES, bf16_via_fp32, cdiv, dot, input_precision, note_short_grid, sm_count

ACTIVATIONS = ADAPTER_ACTIVATIONS


@triton.jit
def _tanh(u):
    # tanh(u) = 2σ(2u) - 1: σ is in every Triton backend (the interpreter too), tanh is not.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _activate(z, ACT):
    """act(z) for fp32 z; ACT indexes ACTIVATIONS."""
    if ACT == 0:
        out = tl.maximum(z, 0.0)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 3:
        out = z * tl.sigmoid(z)
    elif ACT == 4:
        out = _tanh(z)
    else:
        out = z
    return out


@triton.jit
def _activate_grad(z, ACT):
    """act'(z) for fp32 z."""
    if ACT == 0:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:  # Φ(z) + z·φ(z)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 3:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        t = _tanh(z)
        out = 1.0 - t * t
    else:
        out = tl.full(z.shape, 1.0, tl.float32)
    return out


@triton.jit
def _down_projection(x_ptr, wd_ptr, bd_ptr, m64, m_mask, offs_r, r_mask, K, HAS_BD,
                     stride_xm, stride_xk, stride_dr, stride_dk,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr):
    """z = x[rows]·Wd[offs_r]ᵀ + bd[offs_r]: ``[BLOCK_M, BLOCK_R]`` fp32 (padded columns 0)."""
    offs_k = tl.arange(0, BLOCK_K)
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + m64[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wd_t = tl.load(wd_ptr + offs_r[None, :] * stride_dr + k[:, None] * stride_dk,
                       mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        z = dot(x, wd_t, z, INPUT_PRECISION, BF16_VIA_FP32)
    return z + tl.load(bd_ptr + offs_r, mask=r_mask & (HAS_BD != 0), other=0.0).to(tl.float32)[None, :]


@triton.jit
def _adapter_block_fwd_kernel(
    x_ptr, h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr,
    M, K, N, R, scaling, ACT, HAS_BD, HAS_BU,
    stride_xm, stride_xk, stride_hm, stride_hn, stride_dr, stride_dk, stride_un, stride_ur, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """y[M, N] = h + scaling·(act(x·Wdᵀ + bd)·Wuᵀ + bu); grid (⌈M/BLOCK_M⌉,)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    m64 = offs_m.to(tl.int64)  # rows·stride passes 2³¹ for long inputs
    offs_n = tl.arange(0, BLOCK_N)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        z = _down_projection(x_ptr, wd_ptr, bd_ptr, m64, m_mask, offs_r, r_mask, K, HAS_BD,
                             stride_xm, stride_xk, stride_dr, stride_dk,
                             BLOCK_M, BLOCK_K, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)
        # Padded columns have z = 0 and act(0) = 0 for every activation; Wu's padded rows load as 0 too.
        a = _activate(z, ACT).to(x_ptr.dtype.element_ty)
        if r0 != 0:
            # The chunk loop below reads y back, written by the previous chunk: threads of this CTA
            # may read elements another thread stored (store and load layouts need not match).
            # A CTA barrier makes those global writes visible to every thread of the block.
            tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < N
            mask = m_mask[:, None] & n_mask[None, :]
            wu_t = tl.load(wu_ptr + n[None, :] * stride_un + offs_r[:, None] * stride_ur,
                           mask=n_mask[None, :] & r_mask[:, None], other=0.0)
            acc = dot(a, wu_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, BF16_VIA_FP32)
            y_ptrs = y_ptr + m64[:, None] * stride_ym + n[None, :] * stride_yn
            if r0 == 0:
                acc += tl.load(bu_ptr + n, mask=n_mask & (HAS_BU != 0), other=0.0).to(tl.float32)[None, :]
                # Both branches in float32: h is x's dtype, y float32 where R > BLOCK_R (partial sums),
                # and Triton's compiler refuses an `if` whose branches give one name two types.
                base = tl.load(h_ptr + m64[:, None] * stride_hm + n[None, :] * stride_hn, mask=mask,
                               other=0.0).to(tl.float32)
            else:  # a bottleneck wider than BLOCK_R: add this chunk's share onto y
                base = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (base + scaling * acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_block_bwd_kernel(
    dy_ptr, x_ptr, wd_ptr, bd_ptr, wu_ptr, dx_ptr, dz_ptr, a_ptr,
    M, K, N, R, scaling, ACT, HAS_BD,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_dr, stride_dk, stride_un, stride_ur,
    stride_dxm, stride_dxk, stride_zm, stride_zr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """dx[M, K] = dz·Wd with dz = scaling·(dy·Wu)⊙act'(z); also writes a = act(z) and dz ([M, R],
    same strides) for the weight gradients. grid (⌈M/BLOCK_M⌉,)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    m64 = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        z = _down_projection(x_ptr, wd_ptr, bd_ptr, m64, m_mask, offs_r, r_mask, K, HAS_BD,
                             stride_xm, stride_xk, stride_dr, stride_dk,
                             BLOCK_M, BLOCK_K, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)
        mr_mask = m_mask[:, None] & r_mask[None, :]
        mr_offsets = m64[:, None] * stride_zm + offs_r[None, :] * stride_zr
        tl.store(a_ptr + mr_offsets, _activate(z, ACT).to(a_ptr.dtype.element_ty), mask=mr_mask)
        da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < N
            dy = tl.load(dy_ptr + m64[:, None] * stride_gm + n[None, :] * stride_gn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            wu = tl.load(wu_ptr + n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            da = dot(dy, wu, da, INPUT_PRECISION, BF16_VIA_FP32)
        dz = (scaling * da * _activate_grad(z, ACT)).to(dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + mr_offsets, dz, mask=mr_mask)
        if r0 != 0:  # dx is read back below, written by the previous chunk: see the forward
            tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            mask = m_mask[:, None] & k_mask[None, :]
            wd = tl.load(wd_ptr + offs_r[:, None] * stride_dr + k[None, :] * stride_dk,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            dx = dot(dz, wd, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INPUT_PRECISION, BF16_VIA_FP32)
            dx_ptrs = dx_ptr + m64[:, None] * stride_dxm + k[None, :] * stride_dxk
            if r0 != 0:  # a bottleneck wider than BLOCK_R: add this chunk's share onto dx
                dx += tl.load(dx_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launch configuration

BLOCK_R_CHOICES = (16, 64, 256)   # the bottleneck rounded up to one of these; wider ones loop over 256
# (kernel, fp32?, BLOCK_R) -> (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages). The [BLOCK_M, BLOCK_R]
# intermediate (and in the backward da beside it) lives in registers, so wide bottlenecks and fp32
# take fewer rows or narrower K/N tiles. Chosen so that ptxas spills at most 16 bytes for sm_90
# (cuobjdump --dump-resource-usage on the AOT cubins), except fp32 without TF32 at BLOCK_R 256
# (288 bytes in the forward); speed not yet measured (no GPU run of this kernel yet).
_TILES = {
    ("fwd", False, 16): (64, 64, 64, 8, 3),
    ("fwd", False, 64): (64, 64, 64, 8, 3),
    ("fwd", False, 256): (64, 32, 32, 8, 3),
    ("bwd", False, 16): (64, 64, 64, 8, 3),
    ("bwd", False, 64): (64, 64, 64, 8, 3),
    ("bwd", False, 256): (32, 32, 32, 8, 2),
    ("fwd", True, 16): (32, 32, 32, 4, 2),
    ("fwd", True, 64): (32, 16, 32, 8, 2),
    ("fwd", True, 256): (16, 16, 16, 8, 2),
    ("bwd", True, 16): (32, 32, 32, 4, 2),
    ("bwd", True, 64): (32, 16, 32, 8, 2),
    ("bwd", True, 256): (16, 16, 16, 8, 2),
}
_INTERPRET_TILES = (16, 16, 16, 16)  # (BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R): R > 16 takes the chunk loop


def _block_r(R: int) -> int:
    return next((b for b in BLOCK_R_CHOICES if R <= b), BLOCK_R_CHOICES[-1])


# Rows per program never go below this (tl.dot's least M).
MIN_BLOCK_M = 16


def _block_m_choices(block_m: int) -> tuple[int, ...]:
    """A table entry's BLOCK_M and its halvings down to MIN_BLOCK_M: the rows a launch may take."""
    return tuple(block_m >> i for i in range(block_m.bit_length()) if block_m >> i >= MIN_BLOCK_M)


def _launch_params(kernel: str, M: int, R: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, str | None]:
    """(the launch's constexprs and options, why its grid is below one wave or None). One program
    per BLOCK_M rows: the table's BLOCK_M, halved (down to MIN_BLOCK_M) until the grid gives every SM
    of `device` a program; 4096 rows: 16 on 132 SMs (256 programs), 32 on 108 (128). Halving further
    only adds issue work: the static model (fastpeft bench --static) estimates 4096 rows, R = 64, on
    sm_80 at 112 µs with 32 rows per program and 242 µs with 16 (estimates, not measurements). Each
    program reads both weights whole (from L2): fewer rows per program cost L2 traffic, not DRAM."""
    if triton_interpreting():
        block_m, block_k, block_n, block_r = _INTERPRET_TILES
        warps, stages = 4, 1
    else:
        block_r = _block_r(R)
        block_m, block_k, block_n, warps, stages = _TILES[(kernel, dtype == torch.float32, block_r)]
    sms = sm_count(device)
    for block_m in _block_m_choices(block_m):
        if cdiv(M, block_m) >= sms:
            break
    programs = cdiv(M, block_m)
    reason = None if programs >= sms else (
        f"{M} rows are {programs} row tiles of {block_m} (the fewest rows a program takes), fewer than the {sms} SMs")
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r,
                INPUT_PRECISION=input_precision(dtype), BF16_VIA_FP32=bf16_via_fp32(dtype),
                num_warps=warps, num_stages=stages), reason


def _partial_sums_dtype(R: int, params: dict, dtype: torch.dtype) -> torch.dtype:
    """y (forward) or dx (backward) holds the partial sums of a bottleneck wider than BLOCK_R between
    chunks: in float32 then (cast once at the end), or each chunk's share would round to a half
    type again (19 roundings at R = 300 in the interpreter's 16-wide chunks: 5 % off in bf16)."""
    return torch.float32 if R > params["BLOCK_R"] else dtype


# ---------------------------------------------------------------- the op's Triton face

def adapter_block_fwd(x: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                      w_up: torch.Tensor, b_up: torch.Tensor | None, scaling: float,
                      activation: str) -> torch.Tensor:
    """Triton face of ``fastpeft::adapter_block_fwd`` (shapes and dtypes: fastpeft/ops/adapter_block.py)."""
    M, K = x.shape
    R, N = w_down.shape[0], w_up.shape[0]
    params, reason = _launch_params("fwd", M, R, x.dtype, x.device)
    y = torch.empty((M, N), device=x.device, dtype=_partial_sums_dtype(R, params, x.dtype))
    if y.numel() == 0:
        return y.to(x.dtype)  # an empty grid is not a valid launch
    if reason:
        note_short_grid(reason)
    # Absent biases get a valid pointer of the right dtype, never dereferenced (the flag masks the load).
    wrap_triton(_adapter_block_fwd_kernel)[(cdiv(M, params["BLOCK_M"]),)](
        x, h, w_down, w_down if b_down is None else b_down, w_up, w_up if b_up is None else b_up, y,
        M, K, N, R, scaling, ACTIVATIONS.index(activation), int(b_down is not None), int(b_up is not None),
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1),
        w_up.stride(0), w_up.stride(1), y.stride(0), y.stride(1),
        **params,
    )
    return y.to(x.dtype)


def adapter_block_bwd(grad_y: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                      w_up: torch.Tensor, scaling: float, activation: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::adapter_block_bwd``."""
    M, K = x.shape
    R, N = w_down.shape[0], w_up.shape[0]
    params, reason = _launch_params("bwd", M, R, x.dtype, x.device)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format, dtype=_partial_sums_dtype(R, params, x.dtype))
    a = x.new_empty((M, R))
    dz = x.new_empty((M, R))
    if M:  # with no rows every output is empty or (the weight gradients below) zero
        if reason:
            note_short_grid(reason)
        wrap_triton(_adapter_block_bwd_kernel)[(cdiv(M, params["BLOCK_M"]),)](
            grad_y, x, w_down, w_down if b_down is None else b_down, w_up, grad_x, dz, a,
            M, K, N, R, scaling, ACTIVATIONS.index(activation), int(b_down is not None),
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), w_down.stride(0), w_down.stride(1),
            w_up.stride(0), w_up.stride(1), grad_x.stride(0), grad_x.stride(1), dz.stride(0), dz.stride(1),
            **params,
        )
    grad_x = grad_x.to(x.dtype)
    grad_b_down = dz.sum(0) if b_down is not None else x.new_empty(0)
    return grad_x, torch.mm(dz.t(), x), grad_b_down, torch.mm(grad_y.t(), a).mul_(scaling)


# ---------------------------------------------------------------- ahead-of-time compile list

def _aot_launches(kernel: str, dtype: torch.dtype, precision: str, block_r: int):
    """(constexprs, options) of one table entry at each BLOCK_M ``_launch_params`` may give it on a GPU."""
    block_m, block_k, block_n, warps, stages = _TILES[(kernel, dtype == torch.float32, block_r)]
    for bm in _block_m_choices(block_m):
        yield (dict(BLOCK_M=bm, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r, INPUT_PRECISION=precision,
                    BF16_VIA_FP32=False), dict(num_warps=warps, num_stages=stages))


def aot_configs():
    """Yield (kernel, signature, constexprs, options) for every launch configuration above:
    2 kernels × 3 BLOCK_R × 4 dtype/precision pairs × each entry's BLOCK_M halvings = 54, and the
    float32 partial sums of fp16 and bf16 at BLOCK_R 256: 64."""
    scalars = {"M": "i32", "K": "i32", "N": "i32", "R": "i32", "scaling": "fp32", "ACT": "i32", "HAS_BD": "i32"}
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            for block_r in BLOCK_R_CHOICES:
                fwd = {**{p: ptr for p in ("x_ptr", "h_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr", "y_ptr")},
                       **scalars, "HAS_BU": "i32",
                       **{f"stride_{s}": "i32" for s in ("xm", "xk", "hm", "hn", "dr", "dk", "un", "ur", "ym", "yn")}}
                # a half-precision bottleneck wider than the largest BLOCK_R sums its chunks into
                # float32 y and dx (_partial_sums_dtype): those pointers are other types then
                wide = block_r == BLOCK_R_CHOICES[-1] and dtype != torch.float32
                for launch in _aot_launches("fwd", dtype, precision, block_r):
                    yield _adapter_block_fwd_kernel, fwd, *launch
                    if wide:
                        yield _adapter_block_fwd_kernel, {**fwd, "y_ptr": "*fp32"}, *launch
                bwd = {**{p: ptr for p in ("dy_ptr", "x_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "dx_ptr", "dz_ptr",
                                           "a_ptr")},
                       **scalars,
                       **{f"stride_{s}": "i32" for s in ("gm", "gn", "xm", "xk", "dr", "dk", "un", "ur", "dxm", "dxk",
                                                         "zm", "zr")}}
                for launch in _aot_launches("bwd", dtype, precision, block_r):
                    yield _adapter_block_bwd_kernel, bwd, *launch
                    if wide:
                        yield _adapter_block_bwd_kernel, {**bwd, "dx_ptr": "*fp32"}, *launch
