"""A linear layer over a float weight: ``y = x·Wᵀ + bias``, for the layers a model keeps in full
precision (a 4-bit model's output layer, whose weight is read whole for every generated token).

Faces (one op, one place):
  reference   this file (``F.linear``: torch's own kernels)
  triton      ``fastpeft/kernels/dense_linear.py`` (fp32 sums over tiles of W)
  cpu         ``csrc/cpu/dense_linear.cpp`` (a GEMV that streams the weight once for few rows, AVX2;
              torch's matmul otherwise; ``fastpeft._C.dense_cpu_path`` names the path of a shape)

``dense_linear(x, weight, bias) -> y``
    x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` or None, one dtype (float32, float16 or bfloat16)
    and device; y ``[M, N]`` in that dtype. Differentiable in x, weight and bias (the backward is
    torch's matmuls: the fast faces are for inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry


def _check(x, weight, bias=None):
    op = "dense_linear"
    _registry.check_tensors(op, (("x", x), ("weight", weight), ("bias", bias)), optional=("bias",),
                            hint=" (cast the input to the layer's dtype)")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [tokens, in_features] at the op level; got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [out_features, in_features] = [N, {x.shape[1]}]; got "
                         f"{list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [out_features] = [{weight.shape[0]}]; got {list(bias.shape)}")
    # A copy of a weight the size of a vocabulary per call would cost more than the product.
    _registry.check_rows_contiguous(op, ("x", x), ("weight", weight))


def dense_linear_reference(x, weight, bias=None):
    return F.linear(x, weight, bias)


def _fake(x, weight, bias=None):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """dx = dy·W, dW = dyᵀ·x, db = Σ dy (torch's matmuls)."""
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_y @ weight if need[0] else None
    grad_w = grad_y.t() @ x if need[1] else None
    grad_b = grad_y.sum(0) if need[2] and ctx.has_bias else None
    return grad_x, grad_w, grad_b


dense_linear = _registry.define(
    "dense_linear", "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
    check=_check, fake=_fake, reference=dense_linear_reference,
    # On a GPU cuBLAS (the reference) first: the Triton face has not been timed on one.
    prefer={"cuda": ("torch",)},
    triton="dense_linear", cpp=("cpu",), setup_context=_setup, backward=_backward)
