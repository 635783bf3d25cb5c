"""The whole bottleneck adapter block in one op: ``y = h + scaling·(act(x·Wdᵀ + bd)·Wuᵀ + bu)``.

x is what the block reads: h itself for a sequential adapter (Houlsby, Pfeiffer), the adapted
module's input for the parallel one (He et al. 2022). The up-projection's bias sits inside the
scaling, as in :class:`fastpeft.methods.bottleneck.AdapterBlock` (``h + scaling·up(act(down(x)))``).

Activations (``activation``, a string): ``relu``, ``gelu`` (exact, erf-based: ``nn.GELU()``'s
default), ``gelu_tanh`` (the tanh approximation, ``nn.GELU(approximate="tanh")``), ``silu``,
``tanh`` and ``identity``.

Faces (one op, one place):
  reference   this file (``adapter_block_*_reference``): PyTorch's unfused sequence, down-projection,
              activation, up-projection, scaling and residual add each a separate tensor
  cpu         this file (``adapter_block_*_cpu``): the same GEMMs with the scaling, the residual add
              and the biases folded into them (``addmm``'s alpha/beta, in-place activations), so no
              ``[M, out]`` temporary is made besides y. Not C++: a C++ kernel would call the very same
              ``at::addmm``/``at::mm`` (MKL does the GEMMs either way), so it is registered from
              Python as the op's CPU kernel.
  triton      ``fastpeft/kernels/adapter_block.py``: one kernel per row tile keeps the
              ``[rows, bottleneck]`` intermediate on chip and writes y once; the backward recomputes it.

Ops (2-D inputs; the public :func:`adapter_block` flattens leading dimensions):

``adapter_block_fwd(x, h, w_down, b_down, w_up, b_up, scaling, activation) -> y``
    x ``[M, K]``, h ``[M, N]``, w_down ``[R, K]``, b_down ``[R]`` or None, w_up ``[N, R]``,
    b_up ``[N]`` or None. y ``[M, N]``. R is the bottleneck width.
``adapter_block_bwd(grad_y, x, w_down, b_down, w_up, scaling, activation)``
``-> (grad_x, grad_w_down, grad_b_down, grad_w_up)``
    With ``z = x·Wdᵀ + bd`` and ``dz = scaling·(dy·Wu)⊙act'(z)``: grad_x = dz·Wd, grad_w_down = dzᵀ·x,
    grad_b_down = Σ_m dz (empty without b_down), grad_w_up = scaling·dyᵀ·act(z). The gradients of
    h (dy itself) and b_up (scaling·Σ_m dy) need no op: the forward op's derivative forms them.

All tensors share one dtype (float32, float16 or bfloat16) and one device; ``scaling`` is a float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..activations import ADAPTER_ACTIVATIONS
from . import _registry

ACTIVATIONS = ADAPTER_ACTIVATIONS  # in the order the kernels' runtime switch indexes them


def _shape(t):
    return list(t.shape)


def check_adapter_block_args(x, h, w_down, b_down, w_up, b_up, scaling, activation, op="adapter_block"):
    """Validate an adapter block call; raises TypeError/ValueError naming the problem."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"{op}: scaling must be a finite float, got {scaling!r}")
    _registry.check_tensors(op, (("x", x), ("h", h), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up),
                                 ("b_up", b_up)), optional=("h", "b_down", "b_up"),
                            hint=" (cast the adapter or the input)")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [tokens, in_features] at the op level; got shape {_shape(x)}")
    M, K = x.shape
    if K < 1:
        raise ValueError(f"{op}: x has no features (shape {_shape(x)}); in_features must be >= 1")
    if w_down.dim() != 2 or w_down.shape[1] != K:
        raise ValueError(f"{op}: w_down must be [bottleneck, in_features] = [R, {K}]; got {_shape(w_down)}")
    if w_down.shape[0] < 1:
        raise ValueError(f"{op}: the bottleneck width R must be >= 1; w_down has shape {_shape(w_down)}")
    R = w_down.shape[0]
    if w_up.dim() != 2 or w_up.shape[1] != R:
        raise ValueError(f"{op}: w_up must be [out_features, bottleneck] = [N, {R}]; got {_shape(w_up)}")
    N = w_up.shape[0]
    if N < 1:
        raise ValueError(f"{op}: w_up has no rows (shape {_shape(w_up)}); out_features must be >= 1")
    if b_down is not None and (b_down.dim() != 1 or b_down.shape[0] != R):
        raise ValueError(f"{op}: b_down must be [bottleneck] = [{R}]; got {_shape(b_down)}")
    if b_up is not None and (b_up.dim() != 1 or b_up.shape[0] != N):
        raise ValueError(f"{op}: b_up must be [out_features] = [{N}]; got {_shape(b_up)}")
    if h is not None and tuple(h.shape) != (M, N):
        raise ValueError(f"{op}: h (the residual) must be [tokens, out_features] = [{M}, {N}]; got {_shape(h)}")
    _registry.check_rows_contiguous(op, ("x", x), ("h", h))


# ---------------------------------------------------------------- activations

def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(z)``, computed in float32 (returned in float32)."""
    z = z.float()
    if activation == "relu":
        return (z > 0).float()
    if activation == "gelu":      # Φ(z) + z·φ(z)
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if activation == "gelu_tanh":  # d/dz of 0.5·z·(1 + tanh(u)), u = √(2/π)·(z + 0.044715·z³)
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    return torch.ones_like(z)


# ---------------------------------------------------------------- the reference

def adapter_block_fwd_reference(x, h, w_down, b_down, w_up, b_up, scaling, activation):
    """The definition: the unfused module sequence, in the inputs' dtype."""
    return h + scaling * F.linear(activate(F.linear(x, w_down, b_down), activation), w_up, b_up)


def adapter_block_bwd_reference(grad_y, x, w_down, b_down, w_up, scaling, activation):
    z = F.linear(x, w_down, b_down)
    dz = (scaling * (grad_y @ w_up).float() * activation_grad(z, activation)).to(x.dtype)
    grad_b_down = dz.sum(0) if b_down is not None else x.new_empty(0)
    return dz @ w_down, dz.t() @ x, grad_b_down, scaling * (grad_y.t() @ activate(z, activation))


# ---------------------------------------------------------------- the CPU face: GEMMs with the epilogues folded in

def _activate_(z: torch.Tensor, activation: str) -> torch.Tensor:
    """In place where torch has an in-place form (z is a temporary here)."""
    if activation == "relu":
        return z.relu_()
    if activation == "silu":
        return F.silu(z, inplace=True)
    if activation == "tanh":
        return z.tanh_()
    return activate(z, activation)


def _down(x, w_down, b_down):
    return torch.addmm(b_down, x, w_down.t()) if b_down is not None else torch.mm(x, w_down.t())


def adapter_block_fwd_cpu(x, h, w_down, b_down, w_up, b_up, scaling, activation):
    a = _activate_(_down(x, w_down, b_down), activation)
    y = torch.addmm(h, a, w_up.t(), alpha=scaling)          # h + s·a·Wuᵀ: the GEMM accumulates onto h
    return y if b_up is None else y.add_(b_up, alpha=scaling)


def adapter_block_bwd_cpu(grad_y, x, w_down, b_down, w_up, scaling, activation):
    z = _down(x, w_down, b_down)
    a = activate(z, activation)
    dz = torch.mm(grad_y, w_up).mul_(activation_grad(z, activation).mul_(scaling).to(x.dtype))
    grad_b_down = dz.sum(0) if b_down is not None else x.new_empty(0)
    return torch.mm(dz, w_down), torch.mm(dz.t(), x), grad_b_down, torch.mm(grad_y.t(), a).mul_(scaling)


# ---------------------------------------------------------------- the registered ops

def _check_fwd(x, h, w_down, b_down, w_up, b_up, scaling, activation):
    if h is None:
        raise TypeError("adapter_block_fwd: h (the residual) must be a Tensor, got NoneType")
    check_adapter_block_args(x, h, w_down, b_down, w_up, b_up, scaling, activation, op="adapter_block_fwd")


def _fake_fwd(x, h, w_down, b_down, w_up, b_up, scaling, activation):
    return torch.empty_like(h)


def _check_bwd(grad_y, x, w_down, b_down, w_up, scaling, activation):
    op = "adapter_block_bwd"
    check_adapter_block_args(x, None, w_down, b_down, w_up, None, scaling, activation, op=op)
    _registry.check_tensors(op, (("x", x), ("grad_y", grad_y)))
    shape = (x.shape[0], w_up.shape[0])
    if tuple(grad_y.shape) != shape:
        raise ValueError(f"{op}: grad_y must be {list(shape)}; got {_shape(grad_y)}")
    _registry.check_rows_contiguous(op, ("grad_y", grad_y))


def _fake_bwd(grad_y, x, w_down, b_down, w_up, scaling, activation):
    return (torch.empty_like(x), torch.empty_like(w_down),
            x.new_empty(0) if b_down is None else torch.empty_like(b_down), torch.empty_like(w_up))


def _setup_fwd(ctx, inputs, output):
    x, _, w_down, b_down, w_up, _, scaling, activation = inputs
    ctx.save_for_backward(x, w_down, b_down, w_up)
    ctx.scaling, ctx.activation = scaling, activation


def _backward_fwd(ctx, grad_y):
    """Through the backward op: gradients for x, h, both weights and both biases. Nothing of the
    block's intermediate is saved: the backward recomputes it from x."""
    x, w_down, b_down, w_up = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x = grad_w_down = grad_b_down = grad_w_up = None
    if need[0] or need[2] or need[3] or need[4]:
        grad_x, grad_w_down, grad_b_down, grad_w_up = adapter_block_bwd(grad_y, x, w_down, b_down, w_up,
                                                                        ctx.scaling, ctx.activation)
    grad_b_up = grad_y.sum(0).mul_(ctx.scaling) if need[5] else None
    return (grad_x if need[0] else None, grad_y if need[1] else None, grad_w_down if need[2] else None,
            grad_b_down if need[3] else None, grad_w_up if need[4] else None, grad_b_up, None, None)


# No CUDA C++ face: on the GPU the Triton kernels are the fused path. The CPU face is the folded
# torch composition above (see the module docstring for why not C++).
adapter_block_fwd = _registry.define(
    "adapter_block_fwd",
    "(Tensor x, Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, float scaling, str activation)"
    " -> Tensor",
    check=_check_fwd, fake=_fake_fwd, reference=adapter_block_fwd_reference, triton="adapter_block",
    cpu_kernel=adapter_block_fwd_cpu, setup_context=_setup_fwd, backward=_backward_fwd)

adapter_block_bwd = _registry.define(
    "adapter_block_bwd",
    "(Tensor grad_y, Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, float scaling, str activation)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    check=_check_bwd, fake=_fake_bwd, reference=adapter_block_bwd_reference, triton="adapter_block",
    cpu_kernel=adapter_block_bwd_cpu)


# ---------------------------------------------------------------- public entry

def adapter_block(x: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                  w_up: torch.Tensor, b_up: torch.Tensor | None, scaling: float = 1.0,
                  activation: str = "relu") -> torch.Tensor:
    """``h + scaling·(act(x·Wdᵀ + bd)·Wuᵀ + bu)`` on the fastest face available, with autograd.

    Args:
        x: ``[..., in_features]``, what the block reads (pass h itself for a sequential adapter).
        h: ``[..., out_features]``, the residual, with x's leading dimensions.
        w_down: ``[bottleneck, in_features]``; b_down: ``[bottleneck]`` or None.
        w_up: ``[out_features, bottleneck]``; b_up: ``[out_features]`` or None (scaled with the rest).
        scaling: factor on what the block adds.
        activation: ``relu``, ``gelu`` (exact erf), ``gelu_tanh``, ``silu``, ``tanh`` or ``identity``.
    All tensors float32, float16 or bfloat16 (one dtype), x and h contiguous in their last dimension.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    if not torch.compiler.is_compiling():  # compiled: the op's fake kernel checks instead
        for name, t in (("x", x), ("h", h)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"adapter_block: {name} must be a Tensor, got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"adapter_block: {name} must have at least one dimension")
        if x.shape[:-1] != h.shape[:-1]:
            raise ValueError(f"adapter_block: x {_shape(x)} and h {_shape(h)} must have the same leading dimensions")
        _registry.check_rows_contiguous("adapter_block", ("x", x), ("h", h))
    lead = h.shape[:-1]
    x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    # autograd, where an input needs it: the op's derivative
    y = adapter_block_fwd(x2, h2, w_down, b_down, w_up, b_up, float(scaling), activation)
    return y.reshape(*lead, h.shape[-1])


__all__ = ["adapter_block", "adapter_block_fwd", "adapter_block_bwd", "adapter_block_fwd_reference",
           "adapter_block_bwd_reference", "check_adapter_block_args", "ACTIVATIONS"]
