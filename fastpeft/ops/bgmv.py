"""BGMV: per-row gathered LoRA products for mixed-adapter decode (one adapter lookup per token).

Faces: reference (this file: a per-row loop), Triton ``fastpeft/kernels/bgmv.py``, C++ CPU
``csrc/cpu/bgmv.cpp``, CUDA ``csrc/cuda/bgmv.cu``.

``bgmv_shrink(x, lora_a, adapter_ids) -> s``
    x ``[T, K]``, lora_a ``[S, R, K]`` (S slots, max rank R; a slot of lower rank is zero-padded),
    adapter_ids ``[T]`` int32 → s ``[T, R]`` with ``s[t] = lora_a[id[t]] · x[t]``, 0 where id is -1.
``bgmv_expand(base, s, lora_b, scalings, adapter_ids) -> out``
    base ``[T, N]``, s ``[T, R]``, lora_b ``[S, N, R]``, scalings ``[S]`` float32 →
    ``out[t] = base[t] + scalings[id]·lora_b[id]·s[t]`` (``base[t]`` where id is -1).

x, s, base, lora_a and lora_b share one dtype (float32, float16, bfloat16) and device. Kernels
treat an id outside ``[0, S)`` as -1, so no input can make them read out of bounds; the public
entry points refuse such ids with a clear error first (see :class:`AdapterBatch`).

Both ops declare their derivatives: dx and ds are BGMV products by the transposed stacks, the
stacks' gradients sum outer products per slot (``sgmv_outer``, over the ids' routing built on
their device), so ``torch.ops.fastpeft.bgmv_*`` called directly train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry
from .adapter_batch import route


def _shape(t):
    return list(t.shape)


def _check_dims(op, *named):
    for name, t, dims in named:
        if t.dim() != dims:
            raise ValueError(f"{op}: {name} must be {dims}-D; got shape {_shape(t)}")


def _check_exact(op, name, t, dtype, device, dims):
    """A tensor of a fixed dtype (an index or a scale), on the lead tensor's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    _check_dims(op, (name, t, dims))
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {device}; all tensors must be on "
                         "one device")


def check_index(op, name, t, length, device):
    _check_exact(op, name, t, torch.int32, device, dims=1)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries, expected {length}")


def check_shrink(op, x, lora_a):
    _registry.check_tensors(op, (("x", x), ("lora_a", lora_a)))
    _check_dims(op, ("x", x, 2), ("lora_a", lora_a, 3))
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: lora_a must be [slots, max_rank, {x.shape[1]}]; got {_shape(lora_a)}")
    _registry.check_rows_contiguous(op, ("x", x))


def check_expand(op, base, s, lora_b, scalings):
    _registry.check_tensors(op, (("base", base), ("s", s), ("lora_b", lora_b)))
    _check_dims(op, ("base", base, 2), ("s", s, 2), ("lora_b", lora_b, 3))
    _check_exact(op, "scalings", scalings, torch.float32, base.device, dims=1)
    T, N = base.shape
    S, R = lora_b.shape[0], s.shape[1]
    if s.shape[0] != T:
        raise ValueError(f"{op}: s must be [{T}, max_rank]; got {_shape(s)}")
    if lora_b.shape[1] != N or lora_b.shape[2] != R:
        raise ValueError(f"{op}: lora_b must be [slots, {N}, {R}]; got {_shape(lora_b)}")
    if scalings.shape[0] != S:
        raise ValueError(f"{op}: scalings must have one entry per slot ({S}); got {scalings.shape[0]}")


def _check_bgmv_shrink(x, lora_a, adapter_ids):
    check_shrink("bgmv_shrink", x, lora_a)
    check_index("bgmv_shrink", "adapter_ids", adapter_ids, x.shape[0], x.device)


def _check_bgmv_expand(base, s, lora_b, scalings, adapter_ids):
    check_expand("bgmv_expand", base, s, lora_b, scalings)
    check_index("bgmv_expand", "adapter_ids", adapter_ids, base.shape[0], base.device)


def bgmv_shrink_reference(x, lora_a, adapter_ids):
    """The definition: one row at a time."""
    s = x.new_zeros(x.shape[0], lora_a.shape[1])
    for t, slot in enumerate(adapter_ids.tolist()):
        if 0 <= slot < lora_a.shape[0]:
            s[t] = F.linear(x[t], lora_a[slot])
    return s


def bgmv_expand_reference(base, s, lora_b, scalings, adapter_ids):
    out = base.clone()
    for t, slot in enumerate(adapter_ids.tolist()):
        if 0 <= slot < lora_b.shape[0]:
            out[t] = base[t] + scalings[slot].to(base.dtype) * F.linear(s[t], lora_b[slot])
    return out


# ---------------------------------------------------------------- derivatives

def expand_stack_grads(grad_out, s, lora_b, scalings, need_b, need_scalings, outer):
    """(dB, dscalings) of ``out[t] = base[t] + scalings[slot]·B[slot]·s[t]`` from
    ``G = outer(grad_out, s)`` (``G[slot] = Σ dy[t]ᵀ·s[t]``): dB = scalings·G, and
    dscalings[slot] = ⟨G[slot], B[slot]⟩ (float32, as the scalings are)."""
    g = outer(grad_out, s).float()
    grad_b = (g * scalings[:, None, None]).to(lora_b.dtype) if need_b else None
    grad_scalings = (g * lora_b.float()).sum((1, 2)) if need_scalings else None
    return grad_b, grad_scalings



def _outer(a, b, adapter_ids, num_slots):
    """Σ a[t]ᵀ·b[t] per slot: sgmv_outer over the ids' routing. fastpeft/ops/sgmv.py declares it and
    imports this file, so the op is taken from the registry rather than imported."""
    return _registry.get("sgmv_outer")(a, b, *route(adapter_ids, num_slots), adapter_ids.shape[0], num_slots)


def row_scales(scalings, adapter_ids, dtype, checked=False):
    """``scalings[id]`` per token, 0 where id names no slot: ``[T]`` in `dtype`. checked=True: the
    ids are known to lie in ``[-1, S)`` (an AdapterBatch's)."""
    ids = adapter_ids.long()
    valid = ids >= 0 if checked else (ids >= 0) & (ids < scalings.shape[0])
    return torch.where(valid, scalings[ids.clamp(0, scalings.shape[0] - 1)], 0.0).to(dtype)


def _setup_shrink(ctx, inputs, output):
    x, lora_a, adapter_ids = inputs
    ctx.save_for_backward(x, lora_a, adapter_ids)


def _backward_shrink(ctx, grad_s):
    """s[t] = A[id]·x[t]: dx[t] = A[id]ᵀ·ds[t] (an expand by Aᵀ), dA[slot] = Σ ds[t]ᵀ·x[t]."""
    x, lora_a, adapter_ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_s = grad_s.contiguous()
    grad_x = grad_a = None
    if need[0]:
        ones = torch.ones(lora_a.shape[0], dtype=torch.float32, device=x.device)
        grad_x = bgmv_expand(torch.zeros_like(x), grad_s, lora_a.transpose(1, 2), ones, adapter_ids)
    if need[1]:
        grad_a = _outer(grad_s, x, adapter_ids, lora_a.shape[0])
    return grad_x, grad_a, None


def _setup_expand(ctx, inputs, output):
    _, s, lora_b, scalings, adapter_ids = inputs
    ctx.save_for_backward(s, lora_b, scalings, adapter_ids)


def _backward_expand(ctx, grad_out):
    """dbase = dy; ds[t] = scalings[id]·B[id]ᵀ·dy[t] (a shrink by Bᵀ, rows scaled); dB and
    dscalings from the per-slot sums of dy[t]ᵀ·s[t]."""
    s, lora_b, scalings, adapter_ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_out = grad_out.contiguous()
    grad_s = None
    if need[1]:
        grad_s = bgmv_shrink(grad_out, lora_b.transpose(1, 2), adapter_ids) \
            * row_scales(scalings, adapter_ids, grad_out.dtype)[:, None]
    grad_b, grad_scalings = expand_stack_grads(
        grad_out, s, lora_b, scalings, need[2], need[3],
        lambda a, b: _outer(a, b, adapter_ids, lora_b.shape[0])) if need[2] or need[3] else (None, None)
    return grad_out if need[0] else None, grad_s, grad_b, grad_scalings, None


# The default preference serves: the C++ faces first on either device (on the GPU the shrink a
# warp per output slice with 16-byte loads, the expand a thread per output feature), then Triton.
bgmv_shrink = _registry.define(
    "bgmv_shrink", "(Tensor x, Tensor lora_a, Tensor adapter_ids) -> Tensor",
    check=_check_bgmv_shrink, fake=lambda x, a, ids: x.new_empty(x.shape[0], a.shape[1]),
    reference=bgmv_shrink_reference, triton="bgmv", cpp=("cpu", "cuda"),
    setup_context=_setup_shrink, backward=_backward_shrink)

bgmv_expand = _registry.define(
    "bgmv_expand", "(Tensor base, Tensor s, Tensor lora_b, Tensor scalings, Tensor adapter_ids) -> Tensor",
    check=_check_bgmv_expand, fake=lambda base, *rest: torch.empty_like(base),
    reference=bgmv_expand_reference, triton="bgmv", cpp=("cpu", "cuda"),
    setup_context=_setup_expand, backward=_backward_expand)
