"""SGMV: segmented gathered LoRA products for mixed-adapter prefill and training.

Tokens are grouped by adapter once per batch (:class:`AdapterBatch`); each segment of tokens
sharing a slot is one small GEMM against that slot's factors. Same math as BGMV
(``fastpeft/ops/bgmv.py``), a different work split: many tokens per adapter.

Faces: reference (this file: the per-row loop of BGMV's reference), Triton ``fastpeft/kernels/sgmv.py``,
C++ CPU ``csrc/cpu/sgmv.cpp``.

``sgmv_shrink(x, lora_a, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len) -> s``
``sgmv_expand(base, s, lora_b, scalings, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len) -> out``
    Shapes as in BGMV; the routing tensors are ``AdapterBatch``'s (int32). Tokens in no segment
    get s = 0 and out = base. Kernels mask token indices outside ``[0, T)`` and slots outside
    ``[0, S)``, so no routing can make them read out of bounds. max_seg_len bounds every segment's
    length (it sizes the GPU grid).
``sgmv_outer(a, b, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len, num_slots) -> out``
    a ``[T, P]``, b ``[T, Q]`` → out ``[num_slots, P, Q]`` with ``out[slot] = Σ a[t]ᵀ·b[t]`` over the
    tokens t of the segments naming slot (zero for a slot none names), accumulated in float32:
    the stacks' gradients (``dA[slot] = Σ ds[t]ᵀ·x[t]``, ``dB[slot] = scaling·Σ dy[t]ᵀ·s[t]``), one
    GEMM per segment, with no host read of the routing.

The shrink and expand ops declare their derivatives (through these three ops), so
``torch.ops.fastpeft.sgmv_*`` train as BGMV's do; :class:`fastpeft.nn.MultiLoRALinear` fuses the
same steps per layer.
"""

from __future__ import annotations

import torch

from . import _registry
from .bgmv import (bgmv_expand_reference, bgmv_shrink_reference, check_expand, check_index, check_shrink,
                   expand_stack_grads)

ROUTING = "Tensor sorted_tokens, Tensor seg_starts, Tensor seg_lens, Tensor seg_adapters, int max_seg_len"


def _check_routing(op, T, S, device, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len):
    check_index(op, "sorted_tokens", sorted_tokens, T, device)
    check_index(op, "seg_starts", seg_starts, None, device)
    U = seg_starts.shape[0]
    check_index(op, "seg_lens", seg_lens, U, device)
    check_index(op, "seg_adapters", seg_adapters, U, device)
    if not isinstance(max_seg_len, int) or isinstance(max_seg_len, bool) or max_seg_len < 0:
        raise ValueError(f"{op}: max_seg_len must be an int >= 0, got {max_seg_len!r}")
    # values only where they can be read without waiting for a device: real CPU tensors, not the
    # fake ones torch.compile traces with
    if device.type == "cpu" and not torch.compiler.is_compiling() and not any(
            isinstance(t, torch._subclasses.FakeTensor) for t in (sorted_tokens, seg_starts, seg_lens, seg_adapters)):
        _check_routing_values(op, T, S, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len)


def _check_routing_values(op, T, S, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len):
    """Every face refuses what the C++ face refuses (the reference ignored it): segments outside the
    tokens, slots outside the stack, token indices out of range, a max_seg_len below a segment's
    length; the messages name the first culprit. The segments (one per slot at most, in practice)
    are read as lists, the T token indices by one min/max: a few microseconds. On the CPU only: on
    a GPU reading the values would wait for the device at every layer, and the kernels mask
    out-of-range indices instead."""
    starts, lens, slots = seg_starts.tolist(), seg_lens.tolist(), seg_adapters.tolist()
    for u, (start, length) in enumerate(zip(starts, lens)):
        if start < 0 or length < 0 or start + length > T:
            raise ValueError(f"{op}: segment {u} [{start}, {start + length}) lies outside the {T} tokens")
    for u, slot in enumerate(slots):
        if not 0 <= slot < S:
            raise ValueError(f"{op}: segment {u} names slot {slot}, outside [0, {S})")
    longest = max(lens, default=0)
    if longest > max_seg_len:
        u = lens.index(longest)
        raise ValueError(f"{op}: segment {u} has {longest} tokens, more than max_seg_len = {max_seg_len}")
    if not T:
        return
    lo, hi = torch.aminmax(sorted_tokens)
    if int(lo) < 0 or int(hi) >= T:  # only entries some segment covers are read
        tokens = sorted_tokens.long()
        covered = torch.zeros(T, dtype=torch.bool)
        for start, length in zip(starts, lens):  # one per adapter, not per token
            covered[start:start + length] = True
        bad = ((tokens < 0) | (tokens >= T)) & covered
        if bad.any():
            raise ValueError(f"{op}: sorted_tokens holds {int(tokens[bad][0])}, which is not a token index")


def _check_sgmv_shrink(x, lora_a, *routing):
    check_shrink("sgmv_shrink", x, lora_a)
    _check_routing("sgmv_shrink", x.shape[0], lora_a.shape[0], x.device, *routing)


def _check_sgmv_expand(base, s, lora_b, scalings, *routing):
    check_expand("sgmv_expand", base, s, lora_b, scalings)
    _check_routing("sgmv_expand", base.shape[0], lora_b.shape[0], base.device, *routing)


def _check_sgmv_outer(a, b, *routing_and_slots):
    op = "sgmv_outer"
    *routing, num_slots = routing_and_slots
    _registry.check_tensors(op, (("a", a), ("b", b)))
    for name, t in (("a", a), ("b", b)):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [tokens, features]; got shape {list(t.shape)}")
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"{op}: a and b must have one row per token; got {list(a.shape)} and {list(b.shape)}")
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"{op}: num_slots must be an int >= 1, got {num_slots!r}")
    _check_routing(op, a.shape[0], num_slots, a.device, *routing)


def token_slots(T, num_slots, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len):
    """Per-token slot ids (-1 where no segment covers the token), from the routing tensors."""
    ids = torch.full((T,), -1, dtype=torch.int32)
    tokens = sorted_tokens.tolist()
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_adapters.tolist()):
        for t in tokens[start:start + length]:
            if 0 <= t < T and 0 <= slot < num_slots:
                ids[t] = slot
    return ids


def sgmv_shrink_reference(x, lora_a, *routing):
    return bgmv_shrink_reference(x, lora_a, token_slots(x.shape[0], lora_a.shape[0], *routing))


def sgmv_expand_reference(base, s, lora_b, scalings, *routing):
    return bgmv_expand_reference(base, s, lora_b, scalings, token_slots(base.shape[0], lora_b.shape[0], *routing))


def sgmv_outer_reference(a, b, sorted_tokens, seg_starts, seg_lens, seg_adapters, max_seg_len, num_slots):
    """The definition: one token's outer product at a time, summed in float32."""
    out = torch.zeros(num_slots, a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    T = a.shape[0]
    tokens = sorted_tokens.tolist()
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_adapters.tolist()):
        if not 0 <= slot < num_slots:
            continue
        for t in tokens[max(start, 0):start + length]:
            if 0 <= t < T:
                out[slot] += torch.outer(a[t].float(), b[t].float())
    return out.to(a.dtype)


# ---------------------------------------------------------------- derivatives
# dS and dB need no host read: shrinks and expands by the transposed stacks, and sgmv_outer.

def _setup_shrink(ctx, inputs, output):
    x, lora_a, *routing = inputs
    ctx.save_for_backward(x, lora_a, *routing[:4])
    ctx.max_seg_len = routing[4]


def _backward_shrink(ctx, grad_s):
    """s[t] = A[slot]·x[t]: dx[t] = A[slot]ᵀ·ds[t] (an expand by Aᵀ), dA[slot] = Σ ds[t]ᵀ·x[t]."""
    x, lora_a, *routing = ctx.saved_tensors
    routing = (*routing, ctx.max_seg_len)
    need = ctx.needs_input_grad
    grad_s = grad_s.contiguous()
    grad_x = grad_a = None
    if need[0]:
        ones = torch.ones(lora_a.shape[0], dtype=torch.float32, device=x.device)
        grad_x = sgmv_expand(torch.zeros_like(x), grad_s, lora_a.transpose(1, 2), ones, *routing)
    if need[1]:
        grad_a = sgmv_outer(grad_s, x, *routing, lora_a.shape[0])
    return grad_x, grad_a, None, None, None, None, None


def _setup_expand(ctx, inputs, output):
    _, s, lora_b, scalings, *routing = inputs
    ctx.save_for_backward(s, lora_b, scalings, *routing[:4])
    ctx.max_seg_len = routing[4]


def _backward_expand(ctx, grad_out):
    """dbase = dy; ds[t] = scalings[slot]·B[slot]ᵀ·dy[t] (a shrink by the scaled Bᵀ: the routing
    names slots per segment, not per token); dB and dscalings from sgmv_outer(dy, s)."""
    s, lora_b, scalings, *routing = ctx.saved_tensors
    routing = (*routing, ctx.max_seg_len)
    need = ctx.needs_input_grad
    grad_out = grad_out.contiguous()
    grad_s = None
    if need[1]:
        scaled = (lora_b.float() * scalings[:, None, None]).to(lora_b.dtype)
        grad_s = sgmv_shrink(grad_out, scaled.transpose(1, 2), *routing)
    grad_b, grad_scalings = expand_stack_grads(
        grad_out, s, lora_b, scalings, need[2], need[3],
        lambda a, b: sgmv_outer(a, b, *routing, lora_b.shape[0])) if need[2] or need[3] else (None, None)
    return (grad_out if need[0] else None, grad_s, grad_b, grad_scalings, None, None, None, None, None)


# No CUDA C++ face: on the GPU the Triton kernels serve.
sgmv_shrink = _registry.define(
    "sgmv_shrink", f"(Tensor x, Tensor lora_a, {ROUTING}) -> Tensor",
    check=_check_sgmv_shrink, fake=lambda x, a, *routing: x.new_empty(x.shape[0], a.shape[1]),
    reference=sgmv_shrink_reference, triton="sgmv", cpp=("cpu",),
    setup_context=_setup_shrink, backward=_backward_shrink)

sgmv_expand = _registry.define(
    "sgmv_expand", f"(Tensor base, Tensor s, Tensor lora_b, Tensor scalings, {ROUTING}) -> Tensor",
    check=_check_sgmv_expand, fake=lambda base, *rest: torch.empty_like(base),
    reference=sgmv_expand_reference, triton="sgmv", cpp=("cpu",),
    setup_context=_setup_expand, backward=_backward_expand)

sgmv_outer = _registry.define(
    "sgmv_outer", f"(Tensor a, Tensor b, {ROUTING}, int num_slots) -> Tensor",
    check=_check_sgmv_outer,
    fake=lambda a, b, *rest: a.new_empty(rest[-1], a.shape[1], b.shape[1]),
    reference=sgmv_outer_reference, triton="sgmv", cpp=("cpu",))
