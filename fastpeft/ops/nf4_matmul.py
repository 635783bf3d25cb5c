"""NF4 dequant-matmul: ``y = x·dequant(W)ᵀ + bias`` (or ``x·dequant(W)`` for the backward's dx).

Faces: the pure-PyTorch reference here (dequantise, then matmul); Triton
``fastpeft/kernels/nf4_matmul.py`` (tiles dequantised in registers; no float weight is written);
C++ CPU ``csrc/cpu/nf4_matmul*.cpp`` (GEMVs for few rows and tiles above, per instruction set
chosen at run time: AVX-512 with bf16 dot products, AVX2, portable; ``fastpeft info`` lists the
path per shape); CUDA ``csrc/cuda/nf4_matmul.cu`` (a decode GEMV streaming the packed rows with
16-byte loads, tiles + cuBLAS otherwise).

``nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, transposed,
lora_s, lora_l, lora_scaling) -> y``
    x ``[M, K]`` (``[M, N]`` when transposed), packed: NF4 bytes of the ``[N, K]`` weight in
    bitsandbytes' layout (any storage dtype, read as bytes), absmax: float32 per block (already
    decoded when double-quantised), quant_map: the 16 float32 levels. y ``[M, N]`` (``[M, K]``
    when transposed) in x's dtype. With lora_s ``[M, r]`` and lora_l ``[r, N]`` (``[r, K]``
    transposed), in x's dtype, y gains ``lora_scaling·lora_s·lora_l``: QLoRA's delta, fused.
    Double quantisation: absmax holds the uint8 codes, nested_absmax (float32, one per 256
    blocks), nested_quant_map (256 float32 levels) and absmax_offset decode them inside the
    kernels, ``absmax = nested_quant_map[code]·nested_absmax[block // 256] + absmax_offset``, so
    no float absmax is materialised per call.

:func:`qlora_linear` is QLoRA's layer op with autograd: ``x·dequant(W)ᵀ + b + s·(x·Aᵀ)·Bᵀ``.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..quant.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, scale_blocks
from . import _registry


def dequantize_packed(packed, absmax, quant_map, blocksize, out_features, in_features, dtype):
    """The ``[out, in]`` weight of NF4 bytes, in `dtype` (the reference's one full-precision copy)."""
    raw = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[: out_features * in_features].long()
    return scale_blocks(quant_map[codes], absmax, blocksize).reshape(out_features, in_features).to(dtype)


def decode_absmax(absmax, nested_absmax=None, nested_quant_map=None, absmax_offset=0.0):
    """The float32 absmax per block: as given, or decoded from double quantisation's codes."""
    if nested_absmax is None:
        return absmax
    return scale_blocks(nested_quant_map[absmax.long()], nested_absmax, NESTED_BLOCKSIZE) + absmax_offset


def _in_features(x, packed, out_features, transposed):
    """The weight's in_features: x's columns, or for the transposed product what the bytes hold."""
    return x.shape[1] if not transposed else (2 * packed.numel() * packed.element_size()) // out_features


def _check(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False, lora_s=None,
           lora_l=None, lora_scaling=1.0, nested_absmax=None, nested_quant_map=None, absmax_offset=0.0):
    op = "nf4_matmul"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [tokens, features]")
    _registry.check_tensors(op, (("x", x), ("bias", bias), ("lora_s", lora_s), ("lora_l", lora_l)),
                            optional=("bias", "lora_s", "lora_l"))
    if out_features < 1:
        raise ValueError(f"{op}: out_features must be >= 1, got {out_features}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: blocksize {blocksize} is not an NF4 blocksize {BLOCKSIZES}")
    if transposed and x.shape[1] != out_features:
        raise ValueError(f"{op}: transposed x must have out_features = {out_features} columns; got {x.shape[1]}")
    nbytes = packed.numel() * packed.element_size()
    in_features = _in_features(x, packed, out_features, transposed)
    if (out_features * in_features + 1) // 2 != nbytes:
        raise ValueError(f"{op}: {nbytes} packed bytes do not hold a [{out_features}, {in_features}] weight")
    blocks = -(-out_features * in_features // blocksize)
    absmax_dtype = torch.float32 if nested_absmax is None else torch.uint8
    if absmax.dtype != absmax_dtype or absmax.numel() != blocks:
        raise ValueError(f"{op}: absmax must be {absmax_dtype} with {blocks} entries (blocks of {blocksize}"
                         f"{', double-quantised' if nested_absmax is not None else ''}); got {absmax.numel()} "
                         f"{absmax.dtype}")
    if (nested_absmax is None) != (nested_quant_map is None):
        raise ValueError(f"{op}: nested_absmax and nested_quant_map come together (double quantisation)")
    if nested_absmax is not None:
        nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nested_blocks:
            raise ValueError(f"{op}: nested_absmax must be float32 with {nested_blocks} entries (one per "
                             f"{NESTED_BLOCKSIZE} blocks); got {nested_absmax.numel()} {nested_absmax.dtype}")
        if nested_quant_map.dtype != torch.float32 or nested_quant_map.numel() != 256:
            raise ValueError(f"{op}: nested_quant_map must hold the 256 float32 levels of the 8-bit map")
    if quant_map.numel() != 16 or quant_map.dtype != torch.float32:
        raise ValueError(f"{op}: quant_map must hold the 16 float32 NF4 levels")
    for name, value in (("absmax_offset", absmax_offset), ("lora_scaling", lora_scaling)):
        if type(value) is float:  # the usual case, without numbers.Real's ABC check (0.4 us)
            continue
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}"
                            + (" (an NF4Weight without double quantisation has offset None: pass 0.0)"
                               if name == "absmax_offset" and value is None else ""))
    for name, t in (("packed", packed), ("absmax", absmax), ("quant_map", quant_map),
                    ("nested_absmax", nested_absmax), ("nested_quant_map", nested_quant_map)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and transposed:
        raise ValueError(f"{op}: bias is for the forward product only; transposed=True takes none")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{op}: bias must be [{out_features}]; got {list(bias.shape)}")
    if (lora_s is None) != (lora_l is None):
        raise ValueError(f"{op}: lora_s and lora_l come together (the LoRA term is lora_s·lora_l)")
    if lora_s is not None:
        n_out = in_features if transposed else out_features
        r = lora_s.shape[-1] if lora_s.dim() == 2 else -1
        if lora_s.dim() != 2 or lora_s.shape[0] != x.shape[0] or r < 1:
            raise ValueError(f"{op}: lora_s must be [{x.shape[0]}, r] with r >= 1; got {list(lora_s.shape)}")
        if tuple(lora_l.shape) != (r, n_out):
            raise ValueError(f"{op}: lora_l must be [r={r}, {n_out}]; got {list(lora_l.shape)}")


def nf4_matmul_reference(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False,
                         lora_s=None, lora_l=None, lora_scaling=1.0, nested_absmax=None, nested_quant_map=None,
                         absmax_offset=0.0):
    absmax = decode_absmax(absmax, nested_absmax, nested_quant_map, absmax_offset)
    w = dequantize_packed(packed, absmax, quant_map, blocksize, out_features,
                          _in_features(x, packed, out_features, transposed), x.dtype)
    y = x @ w if transposed else F.linear(x, w, bias)
    return y if lora_s is None else y + lora_scaling * (lora_s @ lora_l)


def _fake(x, packed, absmax, quant_map, blocksize, out_features, bias=None, transposed=False, lora_s=None,
          lora_l=None, lora_scaling=1.0, nested_absmax=None, nested_quant_map=None, absmax_offset=0.0):
    return x.new_empty(x.shape[0], _in_features(x, packed, out_features, transposed) if transposed else out_features)


# Arguments of the weight and its quantisation state: constants of the product, never trained.
_QUANT_STATE = {1: "packed", 2: "absmax", 3: "quant_map", 11: "nested_absmax", 12: "nested_quant_map"}


def _setup(ctx, inputs, output):
    (x, packed, absmax, quant_map, blocksize, out_features, _, transposed, lora_s, lora_l, lora_scaling,
     nested_absmax, nested_quant_map, absmax_offset) = inputs
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_quant_map, lora_s, lora_l)
    ctx.blocksize, ctx.out_features, ctx.transposed = blocksize, out_features, transposed
    ctx.lora_scaling, ctx.offset = lora_scaling, absmax_offset


def _backward(ctx, grad_y):
    """``y = x·Wᵀ + b + c·S·L`` (``x·W + c·S·L`` transposed): dx is the other product from the
    same 4-bit bytes (no float weight is kept), db = Σ dy, dS = c·dy·Lᵀ, dL = c·Sᵀ·dy."""
    packed, absmax, quant_map, nested_absmax, nested_quant_map, lora_s, lora_l = ctx.saved_tensors
    need = ctx.needs_input_grad
    for index, name in _QUANT_STATE.items():
        if need[index]:
            raise RuntimeError(f"nf4_matmul: {name} is the quantised weight's state and has no gradient; "
                               "detach it (only x, bias, lora_s and lora_l are differentiable)")
    grad_y = grad_y.contiguous()
    grad_x = grad_bias = grad_s = grad_l = None
    if need[0]:
        grad_x = nf4_matmul(grad_y, packed, absmax, quant_map, ctx.blocksize, ctx.out_features, None,
                            not ctx.transposed, None, None, 1.0, nested_absmax, nested_quant_map, ctx.offset)
    if need[6]:
        grad_bias = grad_y.sum(0)
    if need[8]:
        grad_s = ctx.lora_scaling * (grad_y @ lora_l.t())
    if need[9]:
        grad_l = ctx.lora_scaling * (lora_s.t() @ grad_y)
    return (grad_x, None, None, None, None, None, grad_bias, None, grad_s, grad_l, None, None, None, None)


nf4_matmul = _registry.define(
    "nf4_matmul",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor quant_map, int blocksize, int out_features, Tensor? bias=None,"
    " bool transposed=False, Tensor? lora_s=None, Tensor? lora_l=None, float lora_scaling=1.0,"
    " Tensor? nested_absmax=None, Tensor? nested_quant_map=None, float absmax_offset=0.0) -> Tensor",
    check=_check, fake=_fake, reference=nf4_matmul_reference,
    # On a GPU the CUDA face first for every shape (the registry's default order), as measured on an
    # H200 (bf16, K = 4096, N = 14336, wall per layer of eight; benchmarks/results/
    # 2026-12-04-h200-device-check-1 and -2): M = 1 its GEMV 55 us, Triton 226 (kernel 55, the
    # rest its launch path); M = 2-8 Triton 120-220 us, where the CUDA face dequantises and calls
    # cuBLAS as bitsandbytes does (bitsandbytes 69-121); M = 512 CUDA 0.64 ms, Triton 13.7.
    triton="nf4_matmul", cpp=("cpu", "cuda"), setup_context=_setup, backward=_backward)


def weight_args(q) -> tuple:
    """The op's weight arguments of an :class:`~fastpeft.quant.NF4Weight`, in schema order after
    out_features/bias: (packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset)."""
    return q.packed, q.absmax, q.quant_map, q.blocksize, q.nested_absmax, q.nested_quant_map, float(q.offset or 0.0)


def nf4_linear(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x·dequant(W)ᵀ + bias`` from an NF4Weight q (W ``[out, in]``), x ``[M, in]`` contiguous, with
    autograd (the op's derivative: dx = dy·dequant(W) recomputed from the 4-bit bytes)."""
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    return nf4_matmul(x, packed, absmax, quant_map, blocksize, q.shape[0], bias, False, None, None, 1.0,
                      nested_absmax, nested_quant_map, offset)


def nf4_linear_plan(x: torch.Tensor, q, bias: torch.Tensor | None = None):
    """The :class:`~fastpeft.ops._registry.Plan` of :func:`nf4_linear` over q and bias, made with an example
    x ``[M, in]``: ``plan(x)`` is ``nf4_linear(x, q, bias)`` with q and bias checked once."""
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    return nf4_matmul.plan(x, packed, absmax, quant_map, blocksize, q.shape[0], bias, False, None, None, 1.0,
                           nested_absmax, nested_quant_map, offset)


class QLoRALinearFunction(torch.autograd.Function):
    """QLoRA with the delta fused into the NF4 GEMMs: forward ``y = nf4(x) + b + scaling·s·Bᵀ``
    (s = x_lora·Aᵀ), backward ``dx = nf4ᵀ(dy) + scaling·(dy·B)·A`` from the same 4-bit bytes.
    x_lora: the dropped-out input of the LoRA branch, or None when it is x itself (then its
    gradient is folded into dx's GEMM). No float weight is kept."""

    @staticmethod
    def forward(ctx, x, x_lora, packed, absmax, quant_map, blocksize, out_features, bias, lora_a, lora_b, scaling,
                nested_absmax, nested_quant_map, offset):
        s = (x if x_lora is None else x_lora) @ lora_a.t()
        y = nf4_matmul(x, packed, absmax, quant_map, blocksize, out_features, bias, False, s, lora_b.t(), scaling,
                       nested_absmax, nested_quant_map, offset)
        ctx.save_for_backward(x if x_lora is None else x_lora, packed, absmax, quant_map, lora_a, lora_b, s,
                              nested_absmax, nested_quant_map)
        ctx.blocksize, ctx.out_features, ctx.scaling, ctx.separate = blocksize, out_features, scaling, x_lora is not None
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, packed, absmax, quant_map, lora_a, lora_b, s, nested_absmax, nested_quant_map = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need = ctx.needs_input_grad
        t = grad_y @ lora_b  # [M, r]
        grad_x = grad_x_lora = None
        if need[0]:
            fused = (t, lora_a) if not ctx.separate else (None, None)
            grad_x = nf4_matmul(grad_y, packed, absmax, quant_map, ctx.blocksize, ctx.out_features, None, True,
                                *fused, ctx.scaling, nested_absmax, nested_quant_map, ctx.offset)
        if ctx.separate and need[1]:
            grad_x_lora = ctx.scaling * (t @ lora_a)
        grad_a = ctx.scaling * (t.t() @ x_lora) if need[8] else None
        grad_b = ctx.scaling * (grad_y.t() @ s) if need[9] else None
        grad_bias = grad_y.sum(0) if need[7] else None
        return (grad_x, grad_x_lora, None, None, None, None, None, grad_bias, grad_a, grad_b, None, None, None,
                None)


def qlora_linear(x: torch.Tensor, q, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·dequant(W)ᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ`` from NF4 bytes, with autograd.

    x ``[M, in]`` contiguous; q: the :class:`~fastpeft.quant.NF4Weight` of W ``[out, in]``;
    lora_a ``[r, in]``, lora_b ``[out, r]`` and bias in x's dtype. Returns ``[M, out]`` in x's dtype.
    """
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    return QLoRALinearFunction.apply(x, x_lora, packed, absmax, quant_map, blocksize, q.shape[0], bias, lora_a,
                                     lora_b, float(scaling), nested_absmax, nested_quant_map, offset)

