"""NF4 dequant-matmul: ``y = x·dequant(W)ᵀ + bias`` (or ``x·dequant(W)`` for the backward's dx).

Faces: the pure-PyTorch reference here (dequantise, then matmul); Triton ``kernels/nf4_matmul.py``
(tiles dequantised in registers; no float weight is written); C++ CPU ``csrc/cpu/nf4_matmul.cpp``
(an AVX2 GEMV for M <= 16 with a portable fallback chosen at run time, a tiled dequant-matmul
above). The CUDA decode GEMV is the QLoRA issue's remaining work.

``nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, transposed) -> y``
    x ``[M, K]`` (``[M, N]`` when transposed), packed: NF4 bytes of the ``[N, K]`` weight in
    bitsandbytes' layout (any storage dtype, read as bytes), absmax: float32 per block (already
    decoded when double-quantised), quant_map: the 16 float32 levels. y ``[M, N]`` (``[M, K]``
    when transposed) in x's dtype.
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


def _check(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False):
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


def _in_features(x, packed, out_features, transposed):
    return x.shape[1] if not transposed else (2 * packed.numel() * packed.element_size()) // out_features


def nf4_matmul_reference(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False):
    w = dequantize_packed(packed, absmax, quant_map, blocksize, out_features,
                          _in_features(x, packed, out_features, transposed), x.dtype)
    return x @ w if transposed else F.linear(x, w, bias)


def _fake(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False):
    return x.new_empty(x.shape[0], _in_features(x, packed, out_features, transposed) if transposed else out_features)


nf4_matmul = _registry.define(
    "nf4_matmul",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor quant_map, int blocksize, int out_features, Tensor? bias=None,"
    " bool transposed=False) -> Tensor",
    check=_check, fake=_fake, reference=nf4_matmul_reference)


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


def _register_triton_faces():
    try:
        from ..kernels import nf4_matmul as triton_nf4
    except ImportError:
        return
    nf4_matmul.register_triton(triton_nf4.nf4_matmul)


_register_triton_faces()
