"""MultiLoRALinear: one base linear layer serving many LoRA adapters in one batch."""

from __future__ import annotations

import contextlib
import threading

import math

import torch
import torch.nn as nn

from ..ops.adapter_batch import AdapterBatch
from ..ops.bgmv import bgmv_expand, bgmv_shrink, expand_stack_grads, row_scales
from ..ops.sgmv import sgmv_expand, sgmv_outer, sgmv_shrink
from .lora import LoRALinear, is_conv1d

_current = threading.local()  # .stack: the AdapterBatches of the forwards running on this thread, innermost last


def push_adapter_batch(batch: AdapterBatch | None) -> None:
    """Route every MultiLoRALinear called without adapter_ids by `batch` (on this thread) until the
    matching :func:`pop_adapter_batch`. For hooks that open and close a model's forward; elsewhere
    use :func:`use_adapter_batch`."""
    _current.__dict__.setdefault("stack", []).append(batch)


def pop_adapter_batch() -> AdapterBatch | None:
    """End the innermost :func:`push_adapter_batch`; returns its batch."""
    return _current.stack.pop()


@contextlib.contextmanager
def use_adapter_batch(batch: AdapterBatch):
    """Every MultiLoRALinear called without adapter_ids inside the block routes by `batch`: the
    metadata is built once per forward and shared by every layer (per thread)."""
    push_adapter_batch(batch)
    try:
        yield batch
    finally:
        pop_adapter_batch()


def current_adapter_batch() -> AdapterBatch | None:
    stack = getattr(_current, "stack", None)
    return stack[-1] if stack else None


def _shrink(x, stack, segments: bool, adapter_ids, routing):
    if segments:
        return sgmv_shrink(x, stack, *routing)
    return bgmv_shrink(x, stack, adapter_ids)


def _expand(base, s, stack, scalings, segments: bool, adapter_ids, routing):
    if segments:
        return sgmv_expand(base, s, stack, scalings, *routing)
    return bgmv_expand(base, s, stack, scalings, adapter_ids)


class MultiLoRAFunction(torch.autograd.Function):
    """out = y_base + scaling[slot]·B[slot]·A[slot]·x per token, with gradients for every slot
    present in the batch (absent slots get exactly zero). The routing comes as tensors (an
    AdapterBatch's: adapter_ids and the SGMV routing tuple); nothing here reads it on the host, so
    torch.compile traces forward and backward whole, and a GPU never waits for the host.

    lease: an AdapterPool's slot lease (or None), kept until this layer's backward has run."""

    @staticmethod
    def forward(ctx, x, y_base, lora_a, lora_b, scalings, adapter_ids, routing, segments, lease):
        s = _shrink(x, lora_a, segments, adapter_ids, routing)
        ctx.save_for_backward(x, s, lora_a, lora_b, scalings, adapter_ids, *routing[:4])
        ctx.max_seg_len, ctx.segments = routing[4], segments
        if lease is not None:
            ctx.lease = lease  # keeps the slots it routes to in place
        return _expand(y_base, s, lora_b, scalings, segments, adapter_ids, routing)

    @staticmethod
    def backward(ctx, grad_out):
        x, s, lora_a, lora_b, scalings, adapter_ids, *routing = ctx.saved_tensors
        routing = (*routing, ctx.max_seg_len)
        need = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        segments, S = ctx.segments, lora_a.shape[0]
        # ds[t] = scaling[slot]·B[slot]ᵀ·dout[t]: a shrink by the transposed B stack, rows scaled.
        ds = _shrink(grad_out, lora_b.transpose(1, 2), segments, adapter_ids, routing) \
            * row_scales(scalings, adapter_ids, grad_out.dtype, checked=True)[:, None]
        grad_x = grad_a = grad_b = None
        if need[0]:  # dx[t] = A[slot]ᵀ·ds[t]: an expand by the transposed A stack
            ones = torch.ones_like(scalings)
            grad_x = _expand(torch.zeros_like(x), ds, lora_a.transpose(1, 2), ones, segments, adapter_ids, routing)
        # dA[slot] = Σ ds[t]ᵀ·x[t] and dB[slot] = scaling·Σ dout[t]ᵀ·s[t]: one GEMM per adapter's
        # segment, in sgmv_outer (the routing is read on the device, by the kernel)
        if need[2]:
            grad_a = sgmv_outer(ds, x, *routing, S)
        if need[3]:
            grad_b, _ = expand_stack_grads(grad_out, s, lora_b, scalings, True, False,
                                           lambda a, b: sgmv_outer(a, b, *routing, S))
        if hasattr(ctx, "lease"):
            ctx.lease = None  # read the slots for the last time: an unload waiting for them may go on
        return grad_x, grad_out, grad_a, grad_b, None, None, None, None, None


class MultiLoRALinear(nn.Module):
    """A linear layer with up to `max_adapters` LoRA adapters (ranks up to `max_rank`) in stacked,
    preallocated storage; each token (or sequence) of a batch picks its own.

    ``lora_a`` is ``[max_adapters, max_rank, in]`` and ``lora_b`` ``[max_adapters, out, max_rank]``
    (an adapter of lower rank is zero-padded); ``scalings`` is ``[max_adapters]`` float32. Loading
    an adapter writes its slot in place: nothing is reallocated, nothing recompiled.

    ``forward(x, adapter_ids)``: x ``[..., in]``; adapter_ids int ``[tokens]`` (one per row of x
    flattened) or ``[batch]`` (one per sequence of x ``[batch, seq, in]``), -1 for the base model
    alone. Without adapter_ids the batch of :func:`use_adapter_batch` is used.
    """

    def __init__(self, base_layer: nn.Module, max_adapters: int, max_rank: int, fan_in_fan_out: bool | None = None):
        super().__init__()
        if isinstance(base_layer, LoRALinear) and base_layer.lora_magnitude_vector:
            raise TypeError("MultiLoRALinear: the base layer holds DoRA adapters "
                            f"{sorted(base_layer.lora_magnitude_vector)}; a pool's LoRA slots cannot serve DoRA "
                            "(each adapter rescales its output rows by its own weight norm): merge them first "
                            "(merge_and_unload) or use the LoRALinear alone")
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"MultiLoRALinear: base layer {type(base_layer).__name__} has no 2-D weight")
        for name, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MultiLoRALinear: {name} must be an integer >= 1, got {v!r}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer) if fan_in_fan_out is None else fan_in_fan_out
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.fan_in_fan_out else \
            (weight.shape[1], weight.shape[0])
        self.max_adapters, self.max_rank = max_adapters, max_rank
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_a = nn.Parameter(torch.zeros(max_adapters, max_rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(max_adapters, self.out_features, max_rank, **factory))
        self.register_buffer("scalings", torch.zeros(max_adapters, device=weight.device, dtype=torch.float32))
        # (IA)³ vectors per slot, gathered per token; the extra last row (ones) serves id -1.
        self.register_buffer("ia3_in", torch.ones(max_adapters + 1, self.in_features, **factory))
        self.register_buffer("ia3_out", torch.ones(max_adapters + 1, self.out_features, **factory))
        self.ranks = [0] * max_adapters
        self.ia3_slots: set[int] = set()
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def loaded(self) -> list[bool]:
        return [r > 0 or i in self.ia3_slots for i, r in enumerate(self.ranks)]

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool):
            raise TypeError(f"MultiLoRALinear: slot must be an int in [0, {self.max_adapters}), got {slot!r}")
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"MultiLoRALinear: slot {slot!r} is out of range [0, {self.max_adapters})")

    def _stacks(self, unused: bool):
        """(lora_a, lora_b, scalings) to write into. A slot no graph uses (an AdapterPool's free or
        drained slot) is written through ``.data``, which leaves the stacks' version alone, so a graph
        over other slots keeps its backward; any other write is seen by autograd, which then refuses
        the backward of a graph it would change."""
        return (self.lora_a.data, self.lora_b.data, self.scalings.data) if unused else \
            (self.lora_a, self.lora_b, self.scalings)

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    unused: bool = False) -> None:
        """Write one adapter (A ``[r, in]``, B ``[out, r]``, r <= max_rank) into `slot`, in place.
        unused=True: the caller guarantees no graph uses `slot` (see :meth:`_stacks`)."""
        self._check_slot(slot)
        r = lora_a.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"MultiLoRALinear: adapter rank {r} exceeds max_rank {self.max_rank}" if r > self.max_rank
                             else "MultiLoRALinear: adapter rank must be >= 1")
        if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
            raise ValueError(f"MultiLoRALinear: expected lora_a [r, {self.in_features}] and lora_b "
                             f"[{self.out_features}, r]; got {list(lora_a.shape)} and {list(lora_b.shape)}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"MultiLoRALinear: scaling must be a finite number, got {scaling!r}")
        stack_a, stack_b, scalings = self._stacks(unused)
        stack_a[slot].zero_()
        stack_b[slot].zero_()
        stack_a[slot, :r].copy_(lora_a)
        stack_b[slot, :, :r].copy_(lora_b)
        scalings[slot] = float(scaling)
        self.ranks[slot] = r

    @torch.no_grad()
    def set_ia3(self, slot: int, vector: torch.Tensor, feedforward: bool, unused: bool = False) -> None:
        """Write an (IA)³ vector into `slot`: it scales this layer's input (feed-forward layers,
        ``[in]``) or its output (``[out]``), as PEFT's IA3 does."""
        self._check_slot(slot)
        table, size = (self.ia3_in, self.in_features) if feedforward else (self.ia3_out, self.out_features)
        if vector.numel() != size:
            raise ValueError(f"MultiLoRALinear: (IA)3 vector has {vector.numel()} entries; this layer's "
                             f"{'input' if feedforward else 'output'} has {size}")
        table[slot].copy_(vector.flatten())
        self.ia3_slots.add(slot)

    @torch.no_grad()
    def clear_adapter(self, slot: int, unused: bool = False) -> None:
        self._check_slot(slot)
        stack_a, stack_b, scalings = self._stacks(unused)
        stack_a[slot].zero_()
        stack_b[slot].zero_()
        scalings[slot] = 0.0
        self.ia3_in[slot].fill_(1.0)
        self.ia3_out[slot].fill_(1.0)
        self.ranks[slot] = 0
        self.ia3_slots.discard(slot)

    def batch_for(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> AdapterBatch:
        tokens = x.numel() // x.shape[-1]
        n = adapter_ids.shape[0] if isinstance(adapter_ids, torch.Tensor) and adapter_ids.dim() == 1 else None
        per_row = None
        if n is not None and n != tokens:
            if x.dim() < 3 or x.shape[0] != n:
                raise ValueError(f"MultiLoRALinear: adapter_ids has {n} entries; expected one per token ({tokens}) "
                                 f"or one per sequence ({x.shape[0] if x.dim() >= 3 else 'x is not [batch, seq, in]'})")
            per_row = tokens // n
        return AdapterBatch.build(adapter_ids, self.max_adapters, self.loaded, tokens_per_row=per_row, device=x.device)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"MultiLoRALinear: x must be [..., in_features = {self.in_features}]; got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        batch = self.batch_for(x, adapter_ids) if adapter_ids is not None else current_adapter_batch()
        if batch is None:
            raise ValueError("MultiLoRALinear: no adapter_ids given and no adapter batch is active "
                             "(use fastpeft.nn.use_adapter_batch or pass adapter_ids)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        routed = batch.for_rows(x2.shape[0])  # every token, or one per sequence (a pooler's first token)
        if routed is None:
            sequences = f" or {batch.per_sequence.num_tokens} sequences" if batch.per_sequence is not None else ""
            raise ValueError(f"MultiLoRALinear: the active adapter batch routes {batch.num_tokens} tokens{sequences} "
                             f"but x has {x2.shape[0]} rows")
        batch = routed
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = None
        if self.ia3_slots:  # (IA)³ in the pool: per-token vectors, gathered (id -1 -> the row of ones)
            ids = batch.adapter_ids.long()
            rows = torch.where(ids >= 0, ids, self.max_adapters)
            x2 = x2 * self.ia3_in[rows]
        y = self.base_layer(x2)
        if rows is not None:
            y = y * self.ia3_out[rows]
        segments = batch.prefers_segments()
        if not (torch.is_grad_enabled() and (x2.requires_grad or y.requires_grad or self.lora_a.requires_grad
                                             or self.lora_b.requires_grad)):
            # inference: no autograd node to build (nor a lease to keep: nothing runs later); BGMV
            # reads the ids alone, so a decode batch never builds SGMV's routing
            routing = batch.routing if segments else None
            s = _shrink(x2, self.lora_a, segments, batch.adapter_ids, routing)
            out = _expand(y, s, self.lora_b, self.scalings, segments, batch.adapter_ids, routing)
            return out.reshape(*lead, self.out_features)
        # An AdapterPool's lease rides on the graph in eager mode only: under torch.compile an object
        # made per forward would be a new guard each time (the pool does not compile its hooks).
        lease = None if torch.compiler.is_compiling() else batch.lease
        routing = batch.routing  # the stacks' gradients sum per segment (sgmv_outer), whatever the forward took
        out = MultiLoRAFunction.apply(x2, y, self.lora_a, self.lora_b, self.scalings, batch.adapter_ids, routing,
                                      segments, lease)
        return out.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not touch the scalings: the kernels read them as float32, and bf16 would
        # round an alpha / r such as 1/3. They follow the module's device only.
        scalings = self.scalings
        super()._apply(fn, recurse)
        device = self.lora_a.device
        # Materialising a meta module (to_empty): nothing to copy, only storage to make.
        self.scalings = torch.empty_like(scalings, device=device) if scalings.is_meta else scalings.to(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}, loaded={sum(self.loaded)}")
