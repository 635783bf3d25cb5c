"""Batch metadata for mixed-adapter batches, built once per forward and shared by every layer.

Every token names an adapter slot (``-1``: the base model alone). SGMV kernels want tokens grouped
by adapter: :meth:`AdapterBatch.build` sorts token indices by slot once (one host sync, for the
validation and the grid size) and every LoRA layer of the model reuses the result in that forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class AdapterBatch:
    """Token → adapter-slot routing of one batch.

    adapter_ids:   ``[T]`` int32, the slot of each token, -1 for none.
    sorted_tokens: ``[T]`` int32, token indices ordered by slot (stable; -1 tokens first).
    seg_starts, seg_lens, seg_adapters: ``[U]`` int32, one segment per slot present in the batch
        (-1 excluded): where its tokens start in ``sorted_tokens``, how many, which slot.
    max_seg_len:   the longest segment (a Python int: it sizes kernel grids).
    segments:      the same segments as Python ``(start, length, slot)`` tuples, for host loops.
    per_sequence:  when the ids were given per sequence (``tokens_per_row``), the routing of one row
        per sequence: what a layer that sees one token of each sequence (BERT's pooler) takes.
    lease:         whatever keeps the routed slots' adapters in place while this batch is in use
        (an AdapterPool's slot lease): layers keep the batch as long as their backward needs it.
    """

    adapter_ids: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_adapters: torch.Tensor
    max_seg_len: int
    max_adapters: int
    segments: tuple = ()
    per_sequence: "AdapterBatch | None" = None
    lease: object = None

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.shape[0]

    @property
    def num_segments(self) -> int:
        return self.seg_adapters.shape[0]

    @classmethod
    def build(cls, adapter_ids: torch.Tensor, max_adapters: int, loaded: list[bool] | None = None,
              tokens_per_row: int | None = None, device: torch.device | None = None,
              per_sequence: bool = False) -> "AdapterBatch":
        """Validate ids and build the routing.

        Args:
            adapter_ids: int tensor, ``[T]`` (one id per token) or ``[B]`` with ``tokens_per_row``
                (one id per sequence, repeated over its tokens).
            max_adapters: the number of slots; ids must lie in ``[-1, max_adapters)``.
            loaded: optional per-slot flags; an id naming an empty slot is refused.
            device: where the kernels will run (default: the ids' device).
            per_sequence: with tokens_per_row, also build the routing of one row per sequence
                (for a model's layers that see one token of each: an AdapterPool asks for it).
        """
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"adapter_ids must be an int tensor, got {type(adapter_ids).__name__}")
        if adapter_ids.dtype not in INDEX_DTYPES:
            raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
        if adapter_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D ([tokens] or [batch]), got shape {list(adapter_ids.shape)}")
        ids = adapter_ids.detach().to("cpu", torch.int64)
        sequences = None
        if tokens_per_row is not None:
            if per_sequence and tokens_per_row != 1:
                sequences = cls.build(ids, max_adapters, loaded, device=device or adapter_ids.device)
            ids = ids.repeat_interleave(tokens_per_row)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= max_adapters:
                bad = lo if lo < -1 else hi
                raise ValueError(f"adapter id {bad} is out of range: ids must be -1 (base model) or a slot in "
                                 f"[0, {max_adapters})")
            if loaded is not None:
                used = torch.unique(ids[ids >= 0]).tolist()
                empty = [i for i in used if not loaded[i]]
                if empty:
                    raise ValueError(f"adapter id {empty[0]} points at an empty slot (no adapter loaded there)")
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids + 1, minlength=max_adapters + 1)  # [0] counts the -1 tokens
        starts = torch.cumsum(counts, 0) - counts
        present = torch.nonzero(counts[1:]).flatten()
        starts, lens = starts[1:][present], counts[1:][present]
        device = torch.device(device) if device is not None else adapter_ids.device
        as32 = dict(device=device, dtype=torch.int32)
        segments = tuple(zip(starts.tolist(), lens.tolist(), present.tolist()))
        return cls(ids.to(**as32), order.to(**as32), starts.to(**as32), lens.to(**as32), present.to(**as32),
                   int(lens.max()) if lens.numel() else 0, max_adapters, segments, sequences)

    def with_lease(self, lease) -> "AdapterBatch":
        """The same routing, held by `lease` (the per-sequence routing too)."""
        per_sequence = None if self.per_sequence is None else dataclasses.replace(self.per_sequence, lease=lease)
        return dataclasses.replace(self, lease=lease, per_sequence=per_sequence)

    def for_rows(self, rows: int) -> "AdapterBatch | None":
        """The routing of a layer input with `rows` rows: every token's, or one per sequence; None if neither."""
        if rows == self.num_tokens:
            return self
        if self.per_sequence is not None and rows == self.per_sequence.num_tokens:
            return self.per_sequence
        return None

    @property
    def routing(self) -> tuple:
        """The SGMV ops' routing arguments."""
        return self.sorted_tokens, self.seg_starts, self.seg_lens, self.seg_adapters, self.max_seg_len

    def prefers_segments(self) -> bool:
        """SGMV (a tiled GEMM per segment) once segments fill a 16-row MMA tile; BGMV below."""
        return self.max_seg_len >= 16
