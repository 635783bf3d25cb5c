"""Fused DoRA linear (weight-decomposed LoRA, Liu et al. 2024), as PEFT computes it:

    y = x·Wᵀ + bias + (g − 1)⊙(x_l·Wᵀ) + g⊙scaling·(x_l·Aᵀ)·Bᵀ,    g = m / ‖W + scaling·B·A‖_row

per output row i (``g`` and ``m`` are ``[out_features]``); x_l is x after the LoRA branch's
dropout. Without dropout (x_l = x) that is ``y = g⊙(x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ) + bias``. The row
norm is a constant of the backward (detached), as in the paper (section 4.3) and PEFT.

Faces (one op, one place):
  reference   this file: PEFT's formula with the materialised ``W + scaling·B·A`` (float32)
  triton      ``fastpeft/kernels/dora_linear.py``
  cpu         ``csrc/cpu/dora_linear.cpp``

The fast faces never form ``W + scaling·B·A`` (``[out, in]``). They take the row norms from

    ‖Wᵢ + s·Bᵢ·A‖² = ‖Wᵢ‖² + 2s·Bᵢ·(A·Wᵢᵀ) + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ

in float32: ``‖Wᵢ‖²`` is an input (``weight_norm_sq``: the base is frozen, so the layer computes it
once, see :func:`row_norms_sq`), ``A·Aᵀ`` is ``[r, r]``, and ``A·Wᵀ`` (``[r, out]``) contracts
over the same dimension as ``x·Wᵀ``: A's r rows go through the same GEMM as x's rows, so W is
read once for both, as a LoRA forward reads it.

Two registered ops carry the work, on 2-D inputs (the public :func:`dora_linear` flattens):

``dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, x_lora) -> (y, s, z, norm)``
    x ``[M, K]``, weight ``[N, K]`` (frozen, any strides), bias ``[N]`` or None, lora_a ``[r, K]``,
    lora_b ``[N, r]``, magnitude ``[N]``, all in one dtype (float32, float16 or bfloat16);
    weight_norm_sq ``[N]`` float32 (``‖Wᵢ‖²``); x_lora ``[M, K]`` (x after dropout) or None for x.
    Returns y ``[M, N]``, s = x_l·Aᵀ ``[M, r]``, z = x_l·Wᵀ + scaling·s·Bᵀ ``[M, N]`` (the
    direction's output, for the magnitude's gradient), all in x's dtype, and norm ``[N]`` float32.

``dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, s, z, norm, scaling, x_lora)``
``-> (grad_x, grad_x_lora, grad_a, grad_b, grad_magnitude)``
    With g = m / norm and dy_g = g⊙dy: without dropout the LoRA backward of dy_g
    (grad_x = dy_g·W + scaling·(dy_g·B)·A); with dropout grad_x = dy·W and
    grad_x_lora = ((g − 1)⊙dy)·W + scaling·(dy_g·B)·A (autograd takes it through the dropout mask).
    grad_a = scaling·(dy_g·B)ᵀ·x_l, grad_b = scaling·dy_gᵀ·s, grad_magnitude = Σ_rows dy⊙z / norm.

:func:`qdora_linear` is DoRA over a 4-bit NF4 base (QDoRA): the same maths around ``nf4_matmul``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry
from .lora_linear import check_lora_linear_args
from .nf4_matmul import nf4_matmul, weight_args

# Rows of W squared in float32 at a time by row_norms_sq: bounds its temporary to 4 MiB where
# one float32 copy of a 4096 x 14336 weight would take 224 MiB.
_NORM_CHUNK_ELEMENTS = 1 << 20


def _shape(t):
    return list(t.shape)


def row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """``‖Wᵢ‖²`` of every row of weight ``[N, K]`` (any strides and floating dtype): ``[N]`` float32,
    summed in float32 a block of rows at a time (never a float32 copy of the whole weight)."""
    if weight.dim() != 2:
        raise ValueError(f"row_norms_sq: weight must be 2-D [out_features, in_features]; got {_shape(weight)}")
    rows = max(1, _NORM_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    out = torch.empty(weight.shape[0], device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, weight.shape[0], rows):
            block = weight[i: i + rows].float()
            out[i: i + rows] = (block * block).sum(1)
    return out


def norm_from_products(weight_norm_sq: torch.Tensor, aw: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``‖Wᵢ + scaling·Bᵢ·A‖`` per row, ``[N]`` float32, from ``‖Wᵢ‖²`` ``[N]`` and aw = A·Wᵀ
    ``[r, N]``: the expansion of the module docstring, every term in float32. The sum can only come
    out below zero by rounding where Wᵢ and −scaling·Bᵢ·A nearly cancel (a row norm near zero):
    clamped there, as the norm of a vector cannot be negative."""
    a, b = lora_a.float(), lora_b.float()
    cross = (b * aw.float().t()).sum(1)              # Bᵢ·(A·Wᵢᵀ)
    quad = ((b @ (a @ a.t())) * b).sum(1)            # Bᵢ·(A·Aᵀ)·Bᵢᵀ
    return (weight_norm_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0.0).sqrt_()


def check_dora_linear_args(x, weight, bias, lora_a, lora_b, magnitude, x_lora=None, op="dora_linear"):
    """Validate a DoRA linear call; raises TypeError/ValueError naming the problem."""
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora, op=op)
    _registry.check_tensors(op, (("x", x), ("magnitude", magnitude)), hint=" (cast the adapter or the input)")
    N = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        raise ValueError(f"{op}: magnitude must be [out_features] = [{N}]; got {_shape(magnitude)}")


def _check_norm_vector(op, name, t, N, device, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != N:
        raise ValueError(f"{op}: {name} must be float32 [out_features] = [{N}] ({what}); got {t.dtype} "
                         f"{_shape(t)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; all tensors must be on one device")


# ---------------------------------------------------------------- forward

def _check_fwd(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, x_lora=None):
    op = "dora_linear_fwd"
    check_dora_linear_args(x, weight, bias, lora_a, lora_b, magnitude, x_lora, op=op)
    _check_norm_vector(op, "weight_norm_sq", weight_norm_sq, weight.shape[0], x.device,
                       "‖Wᵢ‖² of the base weight's rows: fastpeft.ops.dora_linear.row_norms_sq(weight)")


def _fake_fwd(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, x_lora=None):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty(M, N), x.new_empty(M, lora_a.shape[0]), x.new_empty(M, N),
            x.new_empty(N, dtype=torch.float32))


def dora_linear_fwd_reference(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, x_lora=None):
    """The definition: PEFT's DoRA layer with ``W + scaling·B·A`` materialised and its row norms
    and the combination in float32 (the GEMMs in the inputs' dtype, as PEFT's). weight_norm_sq,
    the fast faces' cached ‖Wᵢ‖², is not read: the truth does not trust a cache."""
    merged = weight.float() + scaling * (lora_b.float() @ lora_a.float())      # [N, K]
    norm = torch.linalg.vector_norm(merged, dim=1).detach()  # a constant of the backward, as PEFT's
    g = magnitude.float() / norm
    x_l = x if x_lora is None else x_lora
    s = F.linear(x_l, lora_a)
    base = F.linear(x, weight).float()
    base_l = base if x_lora is None else F.linear(x_l, weight).float()
    lora = scaling * F.linear(s, lora_b).float()
    # PEFT: result = base_layer(x) + (g - 1)·base_result + g·lora_result·scaling
    y = base + (g - 1) * base_l + g * lora
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), s, (base_l + lora).to(x.dtype), norm


# The forward's derivative: the backward op below, declared once here for every way the op is called
# (the Op object, torch.ops.fastpeft.dora_linear_fwd directly, the Triton op, AOTAutograd).

def _weight_grad(grad_y, x, x_lora, g):
    """dy/dW with the norm held constant (PEFT's detach): only for a base weight that trains."""
    if x_lora is None:
        return (grad_y.float() * g).to(grad_y.dtype).t() @ x
    return grad_y.t() @ x + (grad_y.float() * (g - 1)).to(grad_y.dtype).t() @ x_lora


def _setup_fwd(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, magnitude, _, scaling, x_lora = inputs
    _, s, z, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, s, z, norm, x_lora)
    # s, z and the (detached) norm are kept for the backward, as aten's saved outputs are: only y
    # is differentiable, so the norm is a constant of the backward as in the paper and PEFT.
    ctx.mark_non_differentiable(s, z, norm)
    ctx.scaling = scaling


def _backward_fwd(ctx, grad_y, *_):
    """Through the backward op; W and bias get gradients only if they require them, weight_norm_sq
    (a cache of the frozen base's ‖Wᵢ‖²) never."""
    x, weight, lora_a, lora_b, magnitude, s, z, norm, x_lora = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x, grad_x_lora, grad_a, grad_b, grad_m = dora_linear_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, s, z,
                                                                  norm, ctx.scaling, x_lora)
    grad_w = _weight_grad(grad_y, x, x_lora, magnitude.float() / norm) if need[1] else None
    grad_bias = grad_y.sum(0) if need[2] else None
    return (grad_x if need[0] else None, grad_w, grad_bias, grad_a if need[3] else None,
            grad_b if need[4] else None, grad_m if need[5] else None, None, None,
            grad_x_lora if x_lora is not None and need[8] else None)


dora_linear_fwd = _registry.define(
    "dora_linear_fwd",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, Tensor weight_norm_sq,"
    " float scaling, Tensor? x_lora=None) -> (Tensor, Tensor, Tensor, Tensor)",
    check=_check_fwd, fake=_fake_fwd, reference=dora_linear_fwd_reference, triton="dora_linear", cpp=("cpu",),
    setup_context=_setup_fwd, backward=_backward_fwd)


# ---------------------------------------------------------------- backward

def _check_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, s, z, norm, scaling, x_lora=None):
    op = "dora_linear_bwd"
    check_dora_linear_args(x, weight, None, lora_a, lora_b, magnitude, x_lora, op=op)
    _registry.check_tensors(op, (("x", x), ("grad_y", grad_y), ("s", s), ("z", z)))
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    for name, t, shape in (("grad_y", grad_y, (M, N)), ("s", s, (M, r)), ("z", z, (M, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}; got {_shape(t)}")
    _check_norm_vector(op, "norm", norm, N, x.device, "the row norms dora_linear_fwd returned")
    _registry.check_rows_contiguous(op, ("grad_y", grad_y), ("s", s), ("z", z))


def _fake_bwd(grad_y, x, weight, lora_a, lora_b, magnitude, s, z, norm, scaling, x_lora=None):
    grad_x_lora = x.new_empty(0) if x_lora is None else torch.empty_like(x)
    return (torch.empty_like(x), grad_x_lora, torch.empty_like(lora_a), torch.empty_like(lora_b),
            torch.empty_like(magnitude))


def dora_linear_bwd_reference(grad_y, x, weight, lora_a, lora_b, magnitude, s, z, norm, scaling, x_lora=None):
    g = magnitude.float() / norm
    dy = grad_y.float()
    grad_magnitude = ((dy * z.float()).sum(0) / norm).to(magnitude.dtype)
    dy_g = (dy * g).to(grad_y.dtype)           # what reaches the direction W + scaling·B·A
    t = dy_g @ lora_b                          # [M, r]
    grad_lora_in = scaling * (t @ lora_a)      # [M, K]
    if x_lora is None:
        grad_x = dy_g @ weight + grad_lora_in
        grad_x_lora = x.new_empty(0)
    else:
        grad_x = grad_y @ weight
        grad_x_lora = (dy * (g - 1)).to(grad_y.dtype) @ weight + grad_lora_in
    grad_a = scaling * (t.t() @ (x if x_lora is None else x_lora))
    grad_b = scaling * (dy_g.t() @ s)
    return grad_x, grad_x_lora, grad_a, grad_b, grad_magnitude


dora_linear_bwd = _registry.define(
    "dora_linear_bwd",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, Tensor s, Tensor z,"
    " Tensor norm, float scaling, Tensor? x_lora=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    check=_check_bwd, fake=_fake_bwd, reference=dora_linear_bwd_reference, triton="dora_linear", cpp=("cpu",))


# ---------------------------------------------------------------- autograd and public entry

def _check_entry(op, x, dropout_p):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1); got {dropout_p}")


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                weight_norm_sq: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """DoRA's ``m ⊙ (W + scaling·B·A) / ‖W + scaling·B·A‖_row`` applied to x, plus bias (PEFT's
    formula, dropout on the LoRA branch's input included), on the fastest face, with autograd.

    Args:
        x: ``[..., in_features]``, contiguous in its last dimension; float32, float16 or bfloat16.
        weight: ``[out_features, in_features]`` base weight (any strides; usually frozen).
        bias: ``[out_features]`` or None.
        lora_a: ``[r, in_features]``; lora_b: ``[out_features, r]``; magnitude: ``[out_features]``.
        scaling: the LoRA scale (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        weight_norm_sq: ``‖Wᵢ‖²``, ``[out_features]`` float32, the term the base weight alone gives:
            pass it when calling repeatedly on the same weight (:func:`row_norms_sq` makes it; a
            stale one gives wrong norms). None: computed here, one more pass over W.
        dropout_p: dropout on the LoRA branch's input; applied only when > 0.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    if not torch.compiler.is_compiling():  # compiled: the op's fake kernel checks instead
        _check_entry("dora_linear", x, dropout_p)
        _registry.check_rows_contiguous("dora_linear", ("x", x))
    if weight_norm_sq is None:
        weight_norm_sq = row_norms_sq(weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_lora = F.dropout(x2, dropout_p, training=True) if dropout_p > 0 else None
    # The op builds an autograd node (its declared derivative) only when an input needs a gradient.
    y = dora_linear_fwd(x2, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, float(scaling), x_lora)[0]
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------- over a 4-bit base (QDoRA)

def _nf4(x, q, transposed=False):
    """x·dequant(W)ᵀ (or x·dequant(W) transposed) from the NF4 bytes: the NF4 op's faces."""
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    return nf4_matmul(x, packed, absmax, quant_map, blocksize, q.shape[0], None, transposed, None, None, 1.0,
                      nested_absmax, nested_quant_map, offset)


class QDoRALinearFunction(torch.autograd.Function):
    """DoRA over an NF4 base. Forward: x's rows (and x_lora's, with dropout) and A's rows go
    through one ``nf4_matmul`` call, so the 4-bit weight is decoded once for ``x·Wᵀ`` and ``A·Wᵀ``;
    the norms and the scale in float32 in torch (``[N]`` and ``[M, N]`` work, no ``[N, K]``).
    Backward: the transposed NF4 product of ``g⊙dy`` with the LoRA term fused, as QLoRA's. No float
    copy of W is kept or made."""

    @staticmethod
    def forward(ctx, x, x_lora, q, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling):
        M, r = x.shape[0], lora_a.shape[0]
        x_l = x if x_lora is None else x_lora
        p = _nf4(torch.cat([x, x_lora, lora_a] if x_lora is not None else [x, lora_a]), q)
        s = x_l @ lora_a.t()
        z = p[-(M + r):-r]                         # x_l·Wᵀ: the last M rows before A's
        norm = norm_from_products(weight_norm_sq, p[-r:], lora_a, lora_b, scaling)
        d = None if x_lora is None else p[:M].float() - z.float()   # x·Wᵀ − x_l·Wᵀ
        z = z.addmm_(s, lora_b.t(), alpha=scaling)  # + scaling·s·Bᵀ, in place
        g = magnitude.float() / norm
        y = z.float() * g
        if d is not None:
            y += d
        if bias is not None:
            y += bias.float()
        ctx.save_for_backward(x_l, lora_a, lora_b, magnitude, s, z, norm)
        ctx.q, ctx.scaling, ctx.separate = q, scaling, x_lora is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x_l, lora_a, lora_b, magnitude, s, z, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = magnitude.float() / norm
        dy = grad_y.float()
        dy_g = (dy * g).to(grad_y.dtype)
        t = dy_g @ lora_b                                   # [M, r]
        grad_x = grad_x_lora = None
        packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(ctx.q)

        def nf4_t(rows, fused):                             # rows·W (+ scaling·t·A), from the 4-bit bytes
            return nf4_matmul(rows.contiguous(), packed, absmax, quant_map, blocksize, ctx.q.shape[0], None, True,
                              *fused, ctx.scaling, nested_absmax, nested_quant_map, offset)
        if not ctx.separate:
            grad_x = nf4_t(dy_g, (t, lora_a)) if need[0] else None
        else:
            grad_x = nf4_t(grad_y, (None, None)) if need[0] else None
            if need[1]:
                grad_x_lora = nf4_t((dy * (g - 1)).to(grad_y.dtype), (t, lora_a))
        grad_a = ctx.scaling * (t.t() @ x_l) if need[4] else None
        grad_b = ctx.scaling * (dy_g.t() @ s) if need[5] else None
        grad_m = ((dy * z.float()).sum(0) / norm).to(magnitude.dtype) if need[6] else None
        grad_bias = grad_y.sum(0) if need[3] else None
        return grad_x, grad_x_lora, None, grad_bias, grad_a, grad_b, grad_m, None, None


def qdora_linear(x: torch.Tensor, q, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, weight_norm_sq: torch.Tensor,
                 dropout_p: float = 0.0) -> torch.Tensor:
    """DoRA over an NF4 base weight, with autograd (see :class:`QDoRALinearFunction`).

    x ``[M, in]`` contiguous; q: the :class:`~fastpeft.quant.NF4Weight` of W ``[out, in]``; lora_a
    ``[r, in]``, lora_b ``[out, r]``, magnitude ``[out]`` and bias in x's dtype; weight_norm_sq
    ``[out]`` float32, ``‖Wᵢ‖²`` of the dequantised weight. Returns ``[M, out]`` in x's dtype.
    """
    _check_entry("qdora_linear", x, dropout_p)
    N = q.shape[0]
    fake_weight = x.new_empty(()).expand(N, x.shape[-1])  # the checks read shapes only, never a weight
    check_dora_linear_args(x, fake_weight, bias, lora_a, lora_b, magnitude, op="qdora_linear")
    _check_norm_vector("qdora_linear", "weight_norm_sq", weight_norm_sq, N, x.device, "‖Wᵢ‖² of the dequantised weight")
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    return QDoRALinearFunction.apply(x, x_lora, q, bias, lora_a, lora_b, magnitude, weight_norm_sq, float(scaling))


__all__ = ["dora_linear", "dora_linear_fwd", "dora_linear_bwd", "dora_linear_fwd_reference",
           "dora_linear_bwd_reference", "check_dora_linear_args", "row_norms_sq", "norm_from_products",
           "qdora_linear", "QDoRALinearFunction"]
