"""Fused LoRA linear: ``y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

Faces (one op, one place):
  reference   this file (``lora_linear_fwd_reference`` / ``lora_linear_bwd_reference``)
  triton      ``fastpeft/kernels/lora_linear.py``
  cpu         ``csrc/cpu/lora_linear.cpp``
  cuda        ``csrc/cuda/lora_linear.cu``

Two registered ops carry the work, both on 2-D inputs (the public function flattens leading dims):

``lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, x_lora) -> (y, s)``
    x ``[M, K]``, weight ``[N, K]`` (frozen), bias ``[N]`` or None, lora_a ``[r, K]``,
    lora_b ``[N, r]``, x_lora ``[M, K]`` (x after dropout) or None meaning x itself.
    Returns y ``[M, N]`` and s = x_lora·Aᵀ ``[M, r]`` (kept for the backward; not differentiable,
    as the outputs aten's ops save for their backward are not).

``lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, s, scaling, x_lora) -> (grad_x, grad_x_lora, grad_a, grad_b)``
    With x_lora None: grad_x = dy·W + scaling·(dy·B)·A in one fused GEMM and grad_x_lora is empty.
    With x_lora given (dropout on): grad_x = dy·W and grad_x_lora = scaling·(dy·B)·A; autograd then
    takes grad_x_lora back through the dropout mask that ``F.dropout`` stored, so it is never wrong.
    grad_a = scaling·(dy·B)ᵀ·x_lora ``[r, K]``, grad_b = scaling·dyᵀ·s ``[N, r]``. No grad for W.

All tensors share one dtype (float32, float16 or bfloat16) and one device; ``scaling`` is a float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry


def _shape(t):
    return list(t.shape)


def check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora=None, op="lora_linear"):
    """Validate a LoRA linear call; raises TypeError/ValueError naming the problem."""
    _registry.check_tensors(op, (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b),
                                 ("bias", bias), ("x_lora", x_lora)),
                            optional=("bias", "x_lora"), hint=" (cast the adapter or the input)")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [tokens, in_features] at the op level; got shape {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features]; got {_shape(weight)}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"{op}: x has {K} features but weight is {_shape(weight)} (expected [out_features, {K}])")
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(f"{op}: lora_a must be [r, in_features] = [r, {K}]; got {_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"{op}: LoRA rank r must be >= 1; lora_a has shape {_shape(lora_a)} (r = 0)")
    if lora_b.dim() != 2 or lora_b.shape[0] != N or lora_b.shape[1] != r:
        raise ValueError(f"{op}: lora_b must be [out_features, r] = [{N}, {r}]; got {_shape(lora_b)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"{op}: bias must be [out_features] = [{N}]; got {_shape(bias)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"{op}: x_lora must have x's shape {_shape(x)}; got {_shape(x_lora)}")
    _registry.check_rows_contiguous(op, ("x", x), ("x_lora", x_lora))


# ---------------------------------------------------------------- forward

def _check_fwd(x, weight, bias, lora_a, lora_b, scaling, x_lora=None):
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora, op="lora_linear_fwd")


def _fake_fwd(x, weight, bias, lora_a, lora_b, scaling, x_lora=None):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


def lora_linear_fwd_reference(x, weight, bias, lora_a, lora_b, scaling, x_lora=None):
    """The definition: PEFT's unfused sequence, in the inputs' dtype."""
    s = F.linear(x if x_lora is None else x_lora, lora_a)
    y = F.linear(x, weight, bias) + scaling * F.linear(s, lora_b)
    return y, s


# Up to this many rows the CUDA face's GEMV (csrc/cuda/lora_linear.cu: kMaxGemvRows) goes first on
# a GPU. Measured (H200, bf16, K = N = 4096, r = 16, benchmarks/results/2026-12-04-h200-device-check-1):
# M = 1 CUDA 0.132 ms a call against Triton 0.512; M = 16 CUDA 0.131 against Triton 0.261.
CUDA_GEMV_FIRST_ROWS = 16


def fwd_face_order_cuda(device, x, weight, bias, lora_a, *rest):
    """The forward's faces on a CUDA device, best first, for these arguments."""
    M = x.shape[0]
    if M <= CUDA_GEMV_FIRST_ROWS:
        return ("cuda", "triton", "torch")
    # Above: the Triton face (fused-shrink kernel, or shrink + fused GEMM) or the CUDA face's cuBLAS
    # composition (the delta as the GEMM's C operand), whichever the Triton face's cost rule
    # (fastpeft/kernels/lora_linear.py: fwd_estimates, its efficiencies MMA_EFFICIENCY) puts first.
    # fp32 (another MMA peak) and a loop-traced symbolic shape keep Triton first.
    dims = (M, weight.shape[0], x.shape[1], lora_a.shape[0])
    if x.dtype == torch.float32 or not all(type(d) is int for d in dims) or \
            not lora_linear_fwd.has_face("triton", "cuda"):
        return ("triton", "cuda", "torch")
    from ..kernels.lora_linear import fastest_fwd_face  # loaded with the Triton face (has_face above)
    return ("triton", "cuda", "torch") if fastest_fwd_face(*dims, x.dtype, device) == "triton" else \
        ("cuda", "triton", "torch")


# The forward's derivative: the backward op below, declared once here for every way the op is called.

def _setup_fwd(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, scaling, x_lora = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], x_lora)
    ctx.mark_non_differentiable(output[1])  # s is kept for the backward, as aten's saved outputs are
    ctx.scaling = scaling


def _backward_fwd(ctx, grad_y, _):
    """Through the backward op; W (and bias) get gradients only if they require them."""
    x, weight, lora_a, lora_b, s, x_lora = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x, grad_x_lora, grad_a, grad_b = lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, s, ctx.scaling, x_lora)
    grad_w = grad_y.t() @ x if need[1] else None           # only when W is not frozen
    grad_bias = grad_y.sum(0) if need[2] else None
    return (grad_x if need[0] else None, grad_w, grad_bias, grad_a if need[3] else None,
            grad_b if need[4] else None, None, grad_x_lora if x_lora is not None and need[6] else None)


lora_linear_fwd = _registry.define(
    "lora_linear_fwd",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, Tensor? x_lora=None)"
    " -> (Tensor, Tensor)",
    check=_check_fwd, fake=_fake_fwd, reference=lora_linear_fwd_reference, choose={"cuda": fwd_face_order_cuda},
    triton="lora_linear", cpp=("cpu", "cuda"), setup_context=_setup_fwd, backward=_backward_fwd)


# ---------------------------------------------------------------- backward

def _check_bwd(grad_y, x, weight, lora_a, lora_b, s, scaling, x_lora=None):
    op = "lora_linear_bwd"
    check_lora_linear_args(x, weight, None, lora_a, lora_b, x_lora, op=op)
    _registry.check_tensors(op, (("x", x), ("grad_y", grad_y), ("s", s)))
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    for n, t, shape in (("grad_y", grad_y, (M, N)), ("s", s, (M, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {n} must be {list(shape)}; got {_shape(t)}")
    _registry.check_rows_contiguous(op, ("grad_y", grad_y), ("s", s))


def _fake_bwd(grad_y, x, weight, lora_a, lora_b, s, scaling, x_lora=None):
    grad_x_lora = x.new_empty(0) if x_lora is None else torch.empty_like(x)
    return torch.empty_like(x), grad_x_lora, torch.empty_like(lora_a), torch.empty_like(lora_b)


def lora_linear_bwd_reference(grad_y, x, weight, lora_a, lora_b, s, scaling, x_lora=None):
    t = grad_y @ lora_b                       # [M, r]
    grad_lora_in = scaling * (t @ lora_a)     # [M, K]: what reaches x through the LoRA branch
    grad_x = grad_y @ weight
    if x_lora is None:
        grad_x = grad_x + grad_lora_in
        grad_x_lora = x.new_empty(0)
    else:
        grad_x_lora = grad_lora_in
    grad_a = scaling * (t.t() @ (x if x_lora is None else x_lora))
    grad_b = scaling * (grad_y.t() @ s)
    return grad_x, grad_x_lora, grad_a, grad_b


lora_linear_bwd = _registry.define(
    "lora_linear_bwd",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor s, float scaling, Tensor? x_lora=None)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    check=_check_bwd, fake=_fake_bwd, reference=lora_linear_bwd_reference,
    # cuBLAS (the C++ face) first on the GPU: measured on an H200 (bf16, 4096³, r = 16; benchmarks/
    # results/2026-12-04-h200-device-check-1), a training step with the CUDA backward 0.919 ms,
    # with the Triton one (its fused dx GEMM at 0.37 of the MMA peak) 1.302 ms
    triton="lora_linear", cpp=("cpu", "cuda"))


# ---------------------------------------------------------------- public entry

def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ`` on the fastest face available, with autograd.

    Args:
        x: ``[..., in_features]``, contiguous in its last dimension; float32, float16 or bfloat16.
        weight: ``[out_features, in_features]`` base weight (any strides; usually frozen).
        bias: ``[out_features]`` or None.
        lora_a: ``[r, in_features]``; lora_b: ``[out_features, r]``; r >= 1.
        scaling: the LoRA scale (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA branch's input; applied only when > 0.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    if not torch.compiler.is_compiling():  # compiled: the op's fake kernel checks instead
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"lora_linear: x must be a Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("lora_linear: x must have at least one dimension")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"lora_linear: dropout_p must be in [0, 1); got {dropout_p}")
        _registry.check_rows_contiguous("lora_linear", ("x", x))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_lora = F.dropout(x2, dropout_p, training=True) if dropout_p > 0 else None
    # The op builds an autograd node (its declared derivative) only when an input needs a gradient.
    y = lora_linear_fwd(x2, weight, bias, lora_a, lora_b, float(scaling), x_lora)[0]
    return y.reshape(*lead, weight.shape[0])


__all__ = ["lora_linear", "lora_linear_fwd", "lora_linear_bwd", "lora_linear_fwd_reference",
           "lora_linear_bwd_reference", "check_lora_linear_args"]
