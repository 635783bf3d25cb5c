"""Triton face of ``nf4_matmul``: a tiled GEMM that dequantises NF4 weight tiles in registers.

Each W tile is read as packed bytes (two 4-bit codes per byte, the first in the high nibble),
looked up in the 16-entry NF4 table, scaled by its block's float32 absmax, cast to x's dtype and
fed to ``tl.dot``: no full-precision weight is ever written to memory. ``TRANSPOSED`` computes
``x·W`` instead of ``x·Wᵀ`` (the backward's dx), from the same bytes. ``HAS_LORA`` adds a LoRA
term ``scaling·s·L`` (s ``[M, r]``, L ``[r, n_out]``) to the same fp32 accumulator before the one
store: QLoRA's forward (s = x·Aᵀ, L = Bᵀ) and its dx (s = dy·B, L = A) each write y once.

Rows M <= 16 (decode) take ``_nf4_gemv_kernel`` instead: wide programs of 128 weight rows, split-K
through a view of the same bytes when fewer than 132 programs would run, a 256-entry byte-to-level-
pair table (one shared-memory read per two weights), one absmax per chunk applied to the MMA
result (see its docstring and :func:`gemv_split` for when it applies).

Element (n, k) of the ``[N, K]`` weight is number ``e = n·K + k`` of the row-major flattening:
byte ``e // 2``, high nibble when e is even, absmax ``e // blocksize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import TRITON_DTYPES, bf16_via_fp32, block_r, cdiv, dot, fitting, input_precision, smem_limit


@triton.jit
def store_with_lora_and_bias(acc, y_ptr, s_ptr, l_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, R, lora_scaling,
                             stride_ym, stride_yn, stride_sm, stride_sr, stride_lr, stride_ln,
                             HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BF16_VIA_FP32: tl.constexpr):
    """y[offs_m, offs_n] = acc (+ lora_scaling·s[offs_m, :]·L[:, offs_n] with HAS_LORA, + bias[offs_n]
    with HAS_BIAS), both NF4 kernels' epilogue. The LoRA term gets its own fp32 accumulator and is
    scaled once."""
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < R
            s = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + r[None, :] * stride_sr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            low = tl.load(l_ptr + r[:, None] * stride_lr + offs_n[None, :].to(tl.int64) * stride_ln,
                          mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            lora = dot(s, low, lora, INPUT_PRECISION, BF16_VIA_FP32)
        acc += lora * lora_scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, qmap_ptr, bias_ptr, s_ptr, l_ptr, y_ptr, nested_absmax_ptr, nested_map_ptr,
    M, N_OUT, K_RED, W_COLS, R, lora_scaling, absmax_offset,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_sm, stride_sr, stride_lr, stride_ln,
    BLOCKSIZE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """y[M, N_OUT] = x[M, K_RED] · Wᵀ (W is [N_OUT, K_RED]) or x · W (W is [K_RED, N_OUT]),
    plus lora_scaling·s[M, R]·L[R, N_OUT] with HAS_LORA; W_COLS: columns of the stored weight.
    NESTED: absmax holds double quantisation's uint8 codes, decoded here (one per 256 blocks)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_RED, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K_RED
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if TRANSPOSED:  # tile [BLOCK_K, BLOCK_N] of W itself: row k, column n
            e = k[:, None].to(tl.int64) * W_COLS + offs_n[None, :]
        else:           # tile of Wᵀ: row n of W, column k
            e = offs_n[None, :].to(tl.int64) * W_COLS + k[:, None]
        w_mask = k_mask[:, None] & n_mask[None, :]
        byte = tl.load(packed_ptr + e // 2, mask=w_mask, other=0).to(tl.int32)
        code = tl.where(e % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(qmap_ptr + code, mask=w_mask, other=0.0)
        if NESTED:
            block = e // BLOCKSIZE
            code8 = tl.load(absmax_ptr + block, mask=w_mask, other=0).to(tl.int32)
            scale = tl.load(nested_map_ptr + code8, mask=w_mask, other=0.0) * \
                tl.load(nested_absmax_ptr + block // 256, mask=w_mask, other=0.0) + absmax_offset
        else:
            scale = tl.load(absmax_ptr + e // BLOCKSIZE, mask=w_mask, other=0.0)
        w = (level * scale).to(x_ptr.dtype.element_ty)  # the reference rounds W to x's dtype too
        acc = dot(x, w, acc, INPUT_PRECISION, BF16_VIA_FP32)
    store_with_lora_and_bias(acc, y_ptr, s_ptr, l_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, R, lora_scaling,
                             stride_ym, stride_yn, stride_sm, stride_sr, stride_lr, stride_ln,
                             HAS_LORA, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, qmap_ptr, bias_ptr, s_ptr, l_ptr, y_ptr, nested_absmax_ptr, nested_map_ptr,
    M, N_OUT, K_PART, PART_BYTES, R, lora_scaling, absmax_offset,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_sm, stride_sr, stride_lr, stride_ln,
    BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, NESTED: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """y[M, N_OUT] = x[M, SPLIT·K_PART] · Wᵀ for M ≤ BLOCK_M (decode), W [N_OUT, SPLIT·K_PART] in NF4.

    Split-K without atomics: W is read as the ``[N_OUT·SPLIT, K_PART]`` matrix of the same bytes
    (row v = n·SPLIT + h holds part h of W's row n), so a program's BLOCK_N·SPLIT rows are BLOCK_N
    output features whole; x is read as ``[SPLIT·BLOCK_M, K_PART]`` (row h·BLOCK_M + m: part h of x's
    row m), one MMA covers every (row, part) pair and the matching pairs are summed at the end.
    Each byte is looked up once, in a 256-entry table of its two levels (built per program from the
    16 levels, in x's dtype: one shared-memory read per two weights, no nibble arithmetic); the
    absmax of a BLOCK_K chunk (within one quantisation block: BLOCKSIZE % BLOCK_K == 0) scales the
    chunk's MMA result per output column, not every weight."""
    pid = tl.program_id(0)
    BLOCK_V: tl.constexpr = BLOCK_N * SPLIT
    ROWS: tl.constexpr = BLOCK_M * SPLIT
    HALF_K: tl.constexpr = BLOCK_K // 2
    XT: tl.constexpr = x_ptr.dtype.element_ty
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)                  # rows of the [N_OUT·SPLIT, K_PART] view
    v_mask = offs_v < N_OUT * SPLIT
    rows = tl.arange(0, ROWS)
    row_m = rows % BLOCK_M
    x_rows = x_ptr + row_m.to(tl.int64) * stride_xm + ((rows // BLOCK_M) * K_PART).to(tl.int64) * stride_xk
    x_mask = row_m < M
    # the level pair of every byte value: high nibble (the even weight) in the low half of the word
    byte_values = tl.arange(0, 256)
    levels = tl.load(qmap_ptr + tl.arange(0, 16))
    if XT == tl.float32:
        first = tl.gather(levels, byte_values >> 4, 0).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        second = tl.gather(levels, byte_values & 15, 0).to(tl.int32, bitcast=True).to(tl.int64)
        pair_table = first | (second << 32)
    else:
        first = tl.gather(levels, byte_values >> 4, 0).to(XT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        second = tl.gather(levels, byte_values & 15, 0).to(XT).to(tl.int16, bitcast=True).to(tl.int32)
        pair_table = first | (second << 16)
    byte_rows = packed_ptr + offs_v.to(tl.int64)[:, None] * PART_BYTES
    block_rows = offs_v.to(tl.int64) * (K_PART // BLOCKSIZE)
    offs_b = tl.arange(0, HALF_K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K_PART, BLOCK_K):
        byte = tl.load(byte_rows + (k0 // 2 + offs_b)[None, :], mask=v_mask[:, None], other=0)
        pair = tl.reshape(tl.gather(pair_table, tl.reshape(byte.to(tl.int32), (BLOCK_V * HALF_K,)), 0),
                          (BLOCK_V, HALF_K))
        if XT == tl.float32:
            even = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            even = pair.to(tl.int16).to(XT, bitcast=True)
            odd = (pair >> 16).to(tl.int16).to(XT, bitcast=True)
        level = tl.reshape(tl.join(even, odd), (BLOCK_V, BLOCK_K))    # [rows, k], unscaled
        block = block_rows + k0 // BLOCKSIZE
        if NESTED:
            code8 = tl.load(absmax_ptr + block, mask=v_mask, other=0).to(tl.int32)
            scale = tl.load(nested_map_ptr + code8) * \
                tl.load(nested_absmax_ptr + block // 256, mask=v_mask, other=0.0) + absmax_offset
        else:
            scale = tl.load(absmax_ptr + block, mask=v_mask, other=0.0)
        x = tl.load(x_rows[:, None] + (k0 + offs_k)[None, :] * stride_xk, mask=x_mask[:, None], other=0.0)
        part = dot(x, tl.trans(level), tl.zeros((ROWS, BLOCK_V), dtype=tl.float32), INPUT_PRECISION, BF16_VIA_FP32)
        acc += part * scale[None, :]
    if SPLIT == 1:
        out = acc
    else:  # the (part h of x's row m, part h of W's row n) products: row h·BLOCK_M + m, column n·SPLIT + h
        pairs = tl.reshape(acc, (SPLIT, BLOCK_M, BLOCK_N, SPLIT))
        same = tl.arange(0, SPLIT)[:, None, None, None] == tl.arange(0, SPLIT)[None, None, None, :]
        out = tl.sum(tl.sum(tl.where(same, pairs, 0.0), axis=3), axis=0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    store_with_lora_and_bias(out, y_ptr, s_ptr, l_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, R, lora_scaling,
                             stride_ym, stride_yn, stride_sm, stride_sr, stride_lr, stride_ln,
                             HAS_LORA, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, INPUT_PRECISION, BF16_VIA_FP32)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, shared memory in bytes): a first guess, not
# measured (no GPU yet). The pipeliner stages the W tile's gathers (bytes, levels, scales: 4-byte
# loads per element) as well as x, so shared memory is ~2 KiB per element of BLOCK_K: 120-128 KiB
# at BLOCK_K = 64 in 3 stages (Triton 3.8, sm_80-sm_90, any dtype), 60-64 KiB at 32. The first tile
# within the device's shared memory per block is launched (99 KiB parts: sm_86, sm_89).
GPU_TILES = ((64, 64, 64, 4, 3, 131072), (64, 64, 32, 4, 3, 65536))
_INTERPRET_TILE = (16, 32, 32, 4, 1)


# The decode GEMV (M <= GEMV_MAX_M): BLOCK_V = BLOCK_N·SPLIT rows of W's split view per program,
# BLOCK_K = 64 weights (32 bytes) per row per trip, 4 warps, 4 stages. Chosen by the static model
# on sm_90 (fastpeft bench --static; estimates, not measurements): at M = 1..16, K = 4096,
# N = 14336, BLOCK_V = 128 issues ~0.11 warp-instructions per weight (64: ~0.21, its byte loads are
# not vectorised) and 3 stages keep 14 KB in flight per SM at one program per SM, 4 stages 20 KB.
GEMV_MAX_M = 16
GEMV_BLOCK_M, GEMV_BLOCK_V, GEMV_BLOCK_K, GEMV_WARPS, GEMV_STAGES = 16, 128, 64, 4, 4
GEMV_SPLITS = (1, 2, 4)
# Programs the GEMV splits K to reach: one wave on the 132 SMs of an H100/H200 (a fixed count, so
# a shape compiles the same variants on every GPU; 108-SM A100s get 1.2 waves or more).
GEMV_MIN_PROGRAMS = 132


def gemv_split(M: int, K: int, N: int, blocksize: int, transposed: bool) -> int | None:
    """SPLIT of the decode GEMV for this product, or None when it takes the tiled kernel: M above
    GEMV_MAX_M, the transposed product, or rows not made of whole quantisation blocks. The least
    split whose grid reaches GEMV_MIN_PROGRAMS, else the largest that keeps whole blocks per part."""
    if transposed or M > GEMV_MAX_M or blocksize < 32 or K % blocksize:
        return None
    split = 1
    for s in GEMV_SPLITS:
        if K % (s * blocksize):
            break
        split = s
        if cdiv(N * s, GEMV_BLOCK_V) >= GEMV_MIN_PROGRAMS:
            break
    return split


def tile(device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a launch on `device`."""
    if triton_interpreting():
        return _INTERPRET_TILE
    return fitting(GPU_TILES, smem_limit(device))[:5]


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
               blocksize: int, out_features: int, bias: torch.Tensor | None = None,
               transposed: bool = False, lora_s: torch.Tensor | None = None, lora_l: torch.Tensor | None = None,
               lora_scaling: float = 1.0, nested_absmax: torch.Tensor | None = None,
               nested_quant_map: torch.Tensor | None = None, absmax_offset: float = 0.0) -> torch.Tensor:
    """Triton face of ``fastpeft::nf4_matmul`` (shapes: fastpeft/ops/nf4_matmul.py)."""
    M, K_red = x.shape
    nbytes = packed.numel() * packed.element_size()
    if transposed:  # x [M, out]; W [out, in]; y = x·W [M, in]
        in_features = (2 * nbytes) // out_features
        n_out, w_cols = in_features, in_features
    else:
        n_out, w_cols = out_features, K_red
    y = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    raw = packed.reshape(-1).view(torch.uint8)
    # the kernel indexes these as flat arrays: strided views (the op's checks allow them) are copied
    absmax, quant_map = absmax.contiguous(), quant_map.contiguous()
    bias = None if bias is None else bias.contiguous()
    if nested_absmax is not None:
        nested_absmax, nested_quant_map = nested_absmax.contiguous(), nested_quant_map.contiguous()
    has_lora = lora_s is not None
    s, low = (lora_s, lora_l) if has_lora else (y, y)  # unused pointers when there is no LoRA term
    R = lora_s.shape[1] if has_lora else 0
    nested = nested_absmax is not None
    nested_args = (nested_absmax, nested_quant_map) if nested else (absmax, quant_map)  # unused when not nested
    split = gemv_split(M, K_red, n_out, blocksize, transposed)
    if split is not None:
        block_n = GEMV_BLOCK_V // split
        wrap_triton(_nf4_gemv_kernel)[(cdiv(n_out, block_n),)](
            x, raw, absmax, quant_map, y if bias is None else bias, s, low, y, *nested_args,
            M, n_out, K_red // split, K_red // split // 2, R, float(lora_scaling), float(absmax_offset),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            s.stride(0), s.stride(1), low.stride(0), low.stride(1),
            BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=has_lora, NESTED=nested, SPLIT=split,
            BLOCK_M=GEMV_BLOCK_M, BLOCK_N=block_n, BLOCK_K=min(GEMV_BLOCK_K, blocksize), BLOCK_R=block_r(R),
            INPUT_PRECISION=input_precision(x.dtype), BF16_VIA_FP32=bf16_via_fp32(x.dtype),
            num_warps=GEMV_WARPS, num_stages=GEMV_STAGES)
        return y
    bm, bn, bk, warps, stages = tile(x.device)
    wrap_triton(_nf4_matmul_kernel)[(cdiv(M, bm), cdiv(n_out, bn))](
        x, raw, absmax, quant_map, y if bias is None else bias, s, low, y, *nested_args,
        M, n_out, K_red, w_cols, R, float(lora_scaling), float(absmax_offset),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        s.stride(0), s.stride(1), low.stride(0), low.stride(1),
        BLOCKSIZE=blocksize, TRANSPOSED=transposed, HAS_BIAS=bias is not None, HAS_LORA=has_lora, NESTED=nested,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r(R), INPUT_PRECISION=input_precision(x.dtype),
        BF16_VIA_FP32=bf16_via_fp32(x.dtype), num_warps=warps, num_stages=stages)
    return y


def _aot_signature(ptr: str, nested: bool, reduction_sizes: tuple[str, str]) -> dict:
    """Both NF4 kernels' argument types for an AOT compile, x's pointer type `ptr`; they differ only in
    the names of their two reduction-size arguments (the tile kernel's K_RED, W_COLS; the GEMV's
    K_PART, PART_BYTES)."""
    k_size, w_size = reduction_sizes
    return {"x_ptr": ptr, "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
            "qmap_ptr": "*fp32", "bias_ptr": ptr, "s_ptr": ptr, "l_ptr": ptr, "y_ptr": ptr,
            "nested_absmax_ptr": "*fp32", "nested_map_ptr": "*fp32",
            "M": "i32", "N_OUT": "i32", k_size: "i32", w_size: "i32", "R": "i32",
            "lora_scaling": "fp32", "absmax_offset": "fp32",
            "stride_xm": "i32", "stride_xk": "i32", "stride_ym": "i32", "stride_yn": "i32",
            "stride_sm": "i32", "stride_sr": "i32", "stride_lr": "i32", "stride_ln": "i32"}


def aot_configs():
    yield from _gemv_aot_configs()
    for (bm, bn, bk, warps, stages, _), tname in ((t, d) for t in GPU_TILES for d in TRITON_DTYPES):
        dtype = TRITON_DTYPES[tname]
        ptr = f"*{tname}"
        for blocksize in (64, 128):  # the blocksizes QLoRA uses; others compile the same way
            for transposed in (False, True):
                for has_bias in ((False, True) if not transposed else (False,)):
                    # LoRA and double-quant variants at blocksize 64 only (QLoRA's); other rank blocks
                    # compile the same code with other constants
                    variants = (False, True) if blocksize == 64 else (False,)
                    for has_lora, rank_block in ((v, 16) for v in variants):
                        for nested in variants:
                            yield _nf4_matmul_kernel, _aot_signature(ptr, nested, ("K_RED", "W_COLS")), \
                                dict(BLOCKSIZE=blocksize, TRANSPOSED=transposed, HAS_BIAS=has_bias, HAS_LORA=has_lora,
                                     NESTED=nested, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=rank_block,
                                     INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                                     BF16_VIA_FP32=False), \
                                dict(num_warps=warps, num_stages=stages)


def _gemv_aot_configs():
    """The decode GEMV's variants: each dtype and split at QLoRA's blocksize 64, single and double
    quantised; bias and the fused LoRA term with bf16 only (other flags compile the same loop)."""
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for split in GEMV_SPLITS:
            for nested in (False, True):
                flags = [(False, False)] + ([(True, False), (False, True)] if tname == "bf16" and not nested else [])
                for has_bias, has_lora in flags:
                    yield _nf4_gemv_kernel, _aot_signature(ptr, nested, ("K_PART", "PART_BYTES")), \
                        dict(BLOCKSIZE=64, HAS_BIAS=has_bias, HAS_LORA=has_lora, NESTED=nested, SPLIT=split,
                             BLOCK_M=GEMV_BLOCK_M, BLOCK_N=GEMV_BLOCK_V // split, BLOCK_K=GEMV_BLOCK_K, BLOCK_R=16,
                             INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", BF16_VIA_FP32=False), \
                        dict(num_warps=GEMV_WARPS, num_stages=GEMV_STAGES)
