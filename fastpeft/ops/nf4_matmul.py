"""NF4 dequant-matmul: ``y = x·dequant(W)ᵀ + bias`` (or ``x·dequant(W)`` for the backward's dx).

Faces: the pure-PyTorch reference here (dequantise, then matmul); Triton ``kernels/nf4_matmul.py``
(tiles dequantised in registers; no float weight is written); C++ CPU ``csrc/cpu/nf4_matmul.cpp``
(an AVX2 GEMV for M <= 16 with a portable fallback chosen at run time, a tiled dequant-matmul
above); CUDA ``csrc/cuda/nf4_matmul.cu`` (a decode GEMV streaming the packed rows with 16-byte
loads, tiles + cuBLAS otherwise).

``nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, transposed,
lora_s, lora_l, lora_scaling) -> y``
    x ``[M, K]`` (``[M, N]`` when transposed), packed: NF4 bytes of the ``[N, K]`` weight in
    bitsandbytes' layout (any storage dtype, read as bytes), absmax: float32 per block (already
    decoded when double-quantised), quant_map: the 16 float32 levels. y ``[M, N]`` (``[M, K]``
    when transposed) in x's dtype. With lora_s ``[M, r]`` and lora_l ``[r, N]`` (``[r, K]``
    transposed), in x's dtype, y gains ``lora_scaling·lora_s·lora_l``: QLoRA's delta, fused.

:func:`qlora_linear` is QLoRA's layer op with autograd: ``x·dequant(W)ᵀ + b + s·(x·Aᵀ)·Bᵀ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.nf4 import BLOCKSIZES, _per_block
from . import _registry
from .lora_linear import SUPPORTED_DTYPES


def dequantize_packed(packed, absmax, quant_map, blocksize, out_features, in_features, dtype):
    """The ``[out, in]`` weight of NF4 bytes, in `dtype` (the reference's one full-precision copy)."""
    raw = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[: out_features * in_features].long()
    return _per_block(quant_map[codes], absmax, blocksize).reshape(out_features, in_features).to(dtype)


def _check(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False, lora_s=None,
           lora_l=None, lora_scaling=1.0):
    op = "nf4_matmul"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [tokens, features]")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported dtypes are float32, float16 and bfloat16")
    if out_features < 1:
        raise ValueError(f"{op}: out_features must be >= 1, got {out_features}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: blocksize {blocksize} is not an NF4 blocksize {BLOCKSIZES}")
    nbytes = packed.numel() * packed.element_size()
    in_features = x.shape[1] if not transposed else None
    if transposed:
        if x.shape[1] != out_features:
            raise ValueError(f"{op}: transposed x must have out_features = {out_features} columns; got {x.shape[1]}")
        in_features = (2 * nbytes) // out_features
    if (out_features * in_features + 1) // 2 != nbytes:
        raise ValueError(f"{op}: {nbytes} packed bytes do not hold a [{out_features}, {in_features}] weight")
    blocks = -(-out_features * in_features // blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != blocks:
        raise ValueError(f"{op}: absmax must be float32 with {blocks} entries (blocks of {blocksize}); got "
                         f"{absmax.numel()} {absmax.dtype}")
    if quant_map.numel() != 16 or quant_map.dtype != torch.float32:
        raise ValueError(f"{op}: quant_map must hold the 16 float32 NF4 levels")
    for name, t in (("packed", packed), ("absmax", absmax), ("quant_map", quant_map), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be [{out_features}] in x's dtype")
    if (lora_s is None) != (lora_l is None):
        raise ValueError(f"{op}: lora_s and lora_l come together (the LoRA term is lora_s·lora_l)")
    if lora_s is not None:
        n_out = in_features if transposed else out_features
        r = lora_s.shape[-1] if lora_s.dim() == 2 else -1
        if lora_s.dim() != 2 or lora_s.shape[0] != x.shape[0] or r < 1:
            raise ValueError(f"{op}: lora_s must be [{x.shape[0]}, r] with r >= 1; got {list(lora_s.shape)}")
        if tuple(lora_l.shape) != (r, n_out):
            raise ValueError(f"{op}: lora_l must be [r={r}, {n_out}]; got {list(lora_l.shape)}")
        for name, t in (("lora_s", lora_s), ("lora_l", lora_l)):
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{op}: {name} must have x's dtype and device ({x.dtype}, {x.device}); got "
                                 f"{t.dtype} on {t.device}")


def _in_features(x, packed, out_features, transposed):
    return x.shape[1] if not transposed else (2 * packed.numel() * packed.element_size()) // out_features


def nf4_matmul_reference(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False,
                         lora_s=None, lora_l=None, lora_scaling=1.0):
    w = dequantize_packed(packed, absmax, quant_map, blocksize, out_features,
                          _in_features(x, packed, out_features, transposed), x.dtype)
    y = x @ w if transposed else F.linear(x, w, bias)
    return y if lora_s is None else y + lora_scaling * (lora_s @ lora_l)


def _fake(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False, lora_s=None,
          lora_l=None, lora_scaling=1.0):
    return x.new_empty(x.shape[0], _in_features(x, packed, out_features, transposed) if transposed else out_features)


def _choose(device, x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False, *lora):
    if device.type == "cuda":
        # Decode goes to the CUDA GEMV (one pass over the packed bytes); prefill and the backward's
        # dx to the Triton GEMM, which dequantises in registers. By design, not yet by measurement.
        decode = x.shape[0] <= 16 and not transposed
        return ("cuda", "triton", "torch") if decode else ("triton", "cuda", "torch")
    return _registry.DEFAULT_PREFERENCE.get(device.type, ("torch",))


nf4_matmul = _registry.define(
    "nf4_matmul",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor quant_map, int blocksize, int out_features, Tensor? bias=None,"
    " bool transposed=False, Tensor? lora_s=None, Tensor? lora_l=None, float lora_scaling=1.0) -> Tensor",
    check=_check, fake=_fake, reference=nf4_matmul_reference, choose=_choose)


class NF4LinearFunction(torch.autograd.Function):
    """dx = dy·dequant(W), recomputed from the 4-bit bytes: no float weight is kept for the backward."""

    @staticmethod
    def forward(ctx, x, packed, absmax, quant_map, blocksize, out_features, bias):
        ctx.save_for_backward(packed, absmax, quant_map)
        ctx.blocksize, ctx.out_features = blocksize, out_features
        return nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, False)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, quant_map = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul(grad_y.contiguous(), packed, absmax, quant_map, ctx.blocksize, ctx.out_features,
                                None, True)
        grad_bias = grad_y.sum(0) if ctx.needs_input_grad[6] else None
        return grad_x, None, None, None, None, None, grad_bias


class QLoRALinearFunction(torch.autograd.Function):
    """QLoRA with the delta fused into the NF4 GEMMs: forward ``y = nf4(x) + b + scaling·s·Bᵀ``
    (s = x_lora·Aᵀ), backward ``dx = nf4ᵀ(dy) + scaling·(dy·B)·A`` from the same 4-bit bytes.
    x_lora: the dropped-out input of the LoRA branch, or None when it is x itself (then its
    gradient is folded into dx's GEMM). No float weight is kept."""

    @staticmethod
    def forward(ctx, x, x_lora, packed, absmax, quant_map, blocksize, out_features, bias, lora_a, lora_b, scaling):
        s = (x if x_lora is None else x_lora) @ lora_a.t()
        y = nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, False, s, lora_b.t(), scaling)
        ctx.save_for_backward(x if x_lora is None else x_lora, packed, absmax, quant_map, lora_a, lora_b, s)
        ctx.blocksize, ctx.out_features, ctx.scaling, ctx.separate = blocksize, out_features, scaling, x_lora is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, packed, absmax, quant_map, lora_a, lora_b, s = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need = ctx.needs_input_grad
        t = grad_y @ lora_b  # [M, r]
        grad_x = grad_x_lora = None
        if need[0]:
            fused = (t, lora_a) if not ctx.separate else (None, None)
            grad_x = nf4_matmul(grad_y, packed, absmax, quant_map, ctx.blocksize, ctx.out_features, None, True,
                                *fused, ctx.scaling)
        if ctx.separate and need[1]:
            grad_x_lora = ctx.scaling * (t @ lora_a)
        grad_a = ctx.scaling * (t.t() @ x_lora) if need[8] else None
        grad_b = ctx.scaling * (grad_y.t() @ s) if need[9] else None
        grad_bias = grad_y.sum(0) if need[7] else None
        return grad_x, grad_x_lora, None, None, None, None, None, grad_bias, grad_a, grad_b, None


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                 blocksize: int, out_features: int, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·dequant(W)ᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ`` from NF4 bytes, with autograd.

    x ``[M, in]`` contiguous; packed/absmax/quant_map/blocksize: the NF4 weight ``[out, in]``
    (absmax float32 per block, decoded); lora_a ``[r, in]``, lora_b ``[out, r]`` and bias in x's
    dtype. Returns ``[M, out]`` in x's dtype.
    """
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    return QLoRALinearFunction.apply(x, x_lora, packed, absmax, quant_map, blocksize, out_features, bias, lora_a,
                                     lora_b, float(scaling))


def _register_triton_faces():
    try:
        from ..kernels import nf4_matmul as triton_nf4
    except ImportError:
        return
    nf4_matmul.register_triton(triton_nf4.nf4_matmul)


_register_triton_faces()
