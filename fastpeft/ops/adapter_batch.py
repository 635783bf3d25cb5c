"""Batch metadata for mixed-adapter batches, built once per forward and shared by every layer.

Every token names an adapter slot (``-1``: the base model alone). SGMV kernels want tokens grouped
by adapter: the first layer that takes SGMV has the batch sort token indices by slot, on the device
the kernels run on, and every other LoRA layer of the model reuses the result in that forward.
BGMV (decode batches, :meth:`AdapterBatch.prefers_segments` False) needs the per-token ids alone,
so an inference forward of a decode batch builds no routing at all.

Nothing here waits for a device: the routing (:func:`route`) is a stable sort and a count per
slot, with one segment per slot (empty for a slot the batch does not use), so its shapes depend on
the number of tokens and slots alone. torch.compile traces it without a graph break, and on a GPU
no step of a forward waits for a copy back to the host. Ids given on the host are checked there,
with messages naming the id (no device is involved); ids already on a device, or under
torch.compile, are checked on the device (``torch._assert_async``: a bad id fails the next call
that waits for the device; the kernels never read outside the stacks meanwhile).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INDEX_DTYPES = (torch.int32, torch.int64)

# Below this many tokens BGMV (one gathered product per token) serves; from it SGMV (a tiled GEMM
# per adapter's segment). Decided by the token count alone, which every layer knows without
# reading the ids: decode batches take BGMV, prefill and training SGMV. SEGMENT_MIN_TOKENS holds
# for ids on the CPU; on a GPU, SEGMENT_MIN_TOKENS_GPU.
SEGMENT_MIN_TOKENS = 16
# From the static model's estimates (`fastpeft bench --static --routes`, both routes' launches
# summed, launch cost left out; not a measurement) at the multi_lora bench's layer, K = N = 4096,
# rank 16, bf16, T tokens over U adapters: BGMV's faster face against SGMV, sm_90 (H200):
#   T = 8:  U = 1 0.17 against 0.98 us, U = 8 0.67 against 0.74;
#   T = 16: U = 1 0.34 / 1.12, U = 8 0.58 / 0.77, U = 16 1.07 / 1.17;
#   T = 32: U = 1 0.68 / 1.13, U = 8 0.69 / 0.84, U = 32 2.13 / 2.51;
#   T = 64: U = 1 1.32 / 1.16, U = 8 1.31 / 0.87, U = 64 4.61 / 4.54 (SGMV ahead).
# sm_80 (A100) agrees: BGMV ahead or level to T = 32 (T = 32, U = 32: 5.10 / 5.80), SGMV at 64
# (U = 1 2.23 / 1.50, U = 64 11.41 / 10.18). So a GPU takes SGMV from 64 tokens, until a GPU
# measures the tokens between 32 and 64.
SEGMENT_MIN_TOKENS_GPU = 64


def segment_min_tokens(device: torch.device) -> int:
    """The token count from which a batch whose ids are on `device` takes SGMV."""
    return SEGMENT_MIN_TOKENS if device.type == "cpu" else SEGMENT_MIN_TOKENS_GPU


def route(adapter_ids: torch.Tensor, num_slots: int, checked: bool = False) -> tuple[torch.Tensor, ...]:
    """SGMV's routing of per-token slot ids, computed where the ids are, without a host read.

    adapter_ids: int ``[T]``; an id outside ``[0, num_slots)`` counts as -1 (no adapter), as the
    kernels treat it (checked=True: the caller vouches that every id is in ``[-1, num_slots)``).
    Returns int32 ``(sorted_tokens [T], seg_starts [S], seg_lens [S], seg_adapters [S])``: token
    indices stably sorted by slot (-1 first), then one segment per slot s = 0..S-1
    (``seg_adapters`` is ``arange(S)``), of length 0 where no token uses s. Any segment is at most
    T long: T bounds ``max_seg_len``. A sort and a binary search of the sorted ids for every slot's
    first position: fixed shapes, unlike bincount's or nonzero's.
    """
    ids = adapter_ids
    if not checked:  # in the ids' own dtype: nothing wraps into range
        ids = torch.where((ids >= 0) & (ids < num_slots), ids, -1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    keys, order = torch.sort(ids, stable=True)
    slots = torch.arange(num_slots + 1, dtype=torch.int32, device=ids.device)
    edges = torch.searchsorted(keys, slots, out_int32=True)  # where slot s's tokens start; s = S: the end
    return order.to(torch.int32), edges[:-1], edges[1:] - edges[:-1], slots[:-1]


@dataclass(frozen=True)
class AdapterBatch:
    """Token → adapter-slot routing of one batch, all on the kernels' device.

    adapter_ids:   ``[T]`` int32, the slot of each token, -1 for none. All BGMV needs.
    sorted_tokens: ``[T]`` int32, token indices ordered by slot (stable; -1 tokens first).
    seg_starts, seg_lens, seg_adapters: ``[S]`` int32, one segment per slot (``max_adapters`` of
        them, in slot order; empty for a slot no token uses): where its tokens start in
        ``sorted_tokens``, how many, which slot.
        These four (SGMV's routing, :attr:`routing`) are built on first use, once per batch: a
        decode batch served by BGMV in inference never builds them (a sort, a search and five
        small tensors per forward saved).
    max_seg_len:   a bound on any segment's length (it sizes kernel grids): the number of tokens,
        known without reading the ids.
    per_sequence:  when the ids were given per sequence (``tokens_per_row``), the routing of one row
        per sequence: what a layer that sees one token of each sequence (BERT's pooler) takes.
    lease:         whatever keeps the routed slots' adapters in place while this batch is in use
        (an AdapterPool's slot lease): layers keep the batch as long as their backward needs it.
    """

    adapter_ids: torch.Tensor
    max_seg_len: int
    max_adapters: int
    per_sequence: "AdapterBatch | None" = None
    lease: object = None
    # SGMV's routing once built (a list of at most one tuple: torch.compile traces a list's creation
    # and its append, not a helper class's), shared with the copies with_lease makes
    routing_cache: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.shape[0]

    @property
    def num_segments(self) -> int:
        return self.max_adapters

    @classmethod
    def build(cls, adapter_ids: torch.Tensor, max_adapters: int, loaded: list[bool] | None = None,
              tokens_per_row: int | None = None, device: torch.device | None = None,
              per_sequence: bool = False) -> "AdapterBatch":
        """Validate ids and put them on `device` (the SGMV routing follows on first use).

        Args:
            adapter_ids: int tensor, ``[T]`` (one id per token) or ``[B]`` with ``tokens_per_row``
                (one id per sequence, repeated over its tokens).
            max_adapters: the number of slots; ids must lie in ``[-1, max_adapters)``.
            loaded: optional per-slot flags; an id naming an empty slot is refused.
            device: where the kernels will run (default: the ids' device). Ids on the host are
                checked there and copied once (without waiting); the routing is built on `device`.
            per_sequence: with tokens_per_row, also build the routing of one row per sequence
                (for a model's layers that see one token of each: an AdapterPool asks for it).
        """
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"adapter_ids must be an int tensor, got {type(adapter_ids).__name__}")
        if adapter_ids.dtype not in INDEX_DTYPES:
            raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
        if adapter_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D ([tokens] or [batch]), got shape {list(adapter_ids.shape)}")
        device = torch.device(device) if device is not None else adapter_ids.device
        ids = adapter_ids.detach()
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():
            check_ids(ids, max_adapters, loaded)
        else:
            ids = ids.to(device, non_blocking=True)
            assert_ids(ids, max_adapters, loaded)
        ids = ids.to(device, torch.int32, non_blocking=True)  # checked in their own dtype: nothing wraps
        sequences = None
        if tokens_per_row is not None:
            if per_sequence and tokens_per_row != 1:
                sequences = cls.from_ids(ids, max_adapters)
            if tokens_per_row != 1:  # a decode step's one token per sequence: the ids as they are
                ids = ids.repeat_interleave(tokens_per_row)
        return cls.from_ids(ids, max_adapters, per_sequence=sequences)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, max_adapters: int, per_sequence: "AdapterBatch | None" = None
                 ) -> "AdapterBatch":
        """The batch of checked int32 ids, where they are (no check, no copy; routing on first use)."""
        return cls(ids, max_seg_len=ids.shape[0], max_adapters=max_adapters, per_sequence=per_sequence)

    def with_lease(self, lease) -> "AdapterBatch":
        """The same routing, held by `lease` (the per-sequence routing too); the routing, built or
        not, stays shared with this batch."""
        per_sequence = None if self.per_sequence is None else dataclasses.replace(self.per_sequence, lease=lease)
        return dataclasses.replace(self, lease=lease, per_sequence=per_sequence,
                                   routing_cache=self.routing_cache)

    def for_rows(self, rows: int) -> "AdapterBatch | None":
        """The routing of a layer input with `rows` rows: every token's, or one per sequence; None if neither."""
        if rows == self.num_tokens:
            return self
        if self.per_sequence is not None and rows == self.per_sequence.num_tokens:
            return self.per_sequence
        return None

    @property
    def routing_built(self) -> bool:
        """Whether a layer has asked for :attr:`routing` yet (once built it is kept)."""
        return bool(self.routing_cache)

    @property
    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted_tokens, seg_starts, seg_lens, seg_adapters), built by :func:`route` on the ids'
        device the first time any layer asks, then shared."""
        cache = self.routing_cache
        if not cache:
            cache.append(route(self.adapter_ids, self.max_adapters, checked=True))
        return cache[0]

    @property
    def sorted_tokens(self) -> torch.Tensor:
        return self.segments[0]

    @property
    def seg_starts(self) -> torch.Tensor:
        return self.segments[1]

    @property
    def seg_lens(self) -> torch.Tensor:
        return self.segments[2]

    @property
    def seg_adapters(self) -> torch.Tensor:
        return self.segments[3]

    @property
    def routing(self) -> tuple:
        """The SGMV ops' routing arguments (built on first use)."""
        return (*self.segments, self.max_seg_len)

    def prefers_segments(self) -> bool:
        """SGMV (a tiled GEMM per adapter's segment) from :func:`segment_min_tokens` tokens of the
        ids' device (16 on the CPU, 64 on a GPU); BGMV below."""
        return self.num_tokens >= segment_min_tokens(self.adapter_ids.device)


def check_ids(ids: torch.Tensor, max_adapters: int, loaded: list[bool] | None = None) -> None:
    """Refuse, naming the id, an id outside ``[-1, max_adapters)`` or one naming an empty slot
    (``loaded[slot]`` False). For ids on the host: the distinct ids read once."""
    if not ids.numel():
        return
    used = torch.unique(ids).tolist()  # sorted
    if used[0] < -1 or used[-1] >= max_adapters:
        raise ValueError(f"adapter id {used[0] if used[0] < -1 else used[-1]} is out of range: ids must be -1 (base "
                         f"model) or a slot in [0, {max_adapters})")
    if loaded is not None:
        empty = [i for i in used if i >= 0 and not loaded[i]]
        if empty:
            raise ValueError(f"adapter id {empty[0]} points at an empty slot (no adapter loaded there)")


def assert_ids(ids: torch.Tensor, max_adapters: int, loaded: list[bool] | None = None) -> None:
    """:func:`check_ids` on the ids' device, without waiting for it (``torch._assert_async``)."""
    torch._assert_async(((ids >= -1) & (ids < max_adapters)).all(),
                        f"adapter id out of range: ids must be -1 (base model) or a slot in [0, {max_adapters})")
    if loaded is not None:
        full = torch.tensor(loaded, dtype=torch.bool).to(ids.device, non_blocking=True)
        torch._assert_async(((ids < 0) | full[ids.clamp(0, max_adapters - 1)]).all(),
                            "an adapter id points at an empty slot (no adapter loaded there)")
