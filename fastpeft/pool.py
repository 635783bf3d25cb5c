"""AdapterPool: one base model in memory serving many LoRA adapters in one batch.

The pool swaps the model's linear layers (chosen by rules, as ``get_peft_model`` does) for
:class:`~fastpeft.nn.MultiLoRALinear` layers with preallocated slots. ``pool.load`` writes a
PEFT-format LoRA or (IA)³ checkpoint into a free slot in place (no reallocation, no recompilation); calling
the model with ``adapter_names=[...]`` (one per sequence, None for the base model) or
``adapter_ids=`` builds the batch routing once and every layer shares it.

Thread safety: a slot is written while it is invisible (reserved, not yet named) and published
under the lock; ``unload`` hides the name at once, then waits until no forward pass that was
routed to the slot is still running before clearing it.
"""

from __future__ import annotations

import collections
import functools
import threading

import torch
import torch.nn as nn

from .checkpoint import PREFIX, CheckpointError, read_weights
from .config import LoraConfig, read_config
from .nn.multi_lora import MultiLoRALinear, pop_adapter_batch, push_adapter_batch
from .ops.adapter_batch import AdapterBatch
from .targeting import find_targets, pattern_value, replace_module


class _SlotLease:
    """The slots one forward pass routed to, counted in flight until nothing needs them: the forward
    done (no graph), or every layer's backward run (each drops the lease when its backward is done),
    or the graph freed. The adapter batch holds the lease; unload waits for the count."""

    def __init__(self, pool: "AdapterPool", slots: list[int]):
        self.pool, self.slots, self.thread = pool, slots, threading.get_ident()
        for slot in slots:  # the pool's lock is held by the caller
            pool._in_flight[slot] += 1
            pool._holders[slot][self.thread] += 1

    def __del__(self):
        with self.pool._lock:
            for slot in self.slots:
                self.pool._in_flight[slot] -= 1
                self.pool._holders[slot][self.thread] -= 1
            self.pool._lock.notify_all()


class _Generation:
    """One ``generate(adapter_names=...)`` call: the per-sequence slot ids, resolved once; the lease
    on their slots, held for the whole call; and the AdapterBatch of each input shape its forwards
    see, built by the first forward of that shape. The decode steps (one token per sequence, the
    same rows every step) share one batch: the routing, the check of the ids and the lease are
    paid once per generation, not once per token."""

    __slots__ = ("ids", "lease", "batches")

    def __init__(self, ids: torch.Tensor, lease: _SlotLease):
        self.ids, self.lease = ids, lease
        self.batches: dict[tuple, AdapterBatch] = {}  # (sequences, tokens per sequence, device) -> batch


class AdapterPool:
    """Up to `max_adapters` LoRA adapters of rank up to `max_rank` on `model` (changed in place).

    Args:
        model: any ``nn.Module`` (a transformers model: its input_ids ``[batch, seq]`` sets the
            tokens per sequence).
        target_modules: the layers that can hold adapters (PEFT's matching rules; default
            "all-linear"). A checkpoint touching another layer is refused.
    """

    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int, target_modules="all-linear"):
        targets, _ = find_targets(model, LoraConfig(r=1, target_modules=target_modules))
        self.model = model
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.layers: dict[str, MultiLoRALinear] = {}
        for t in targets:
            self.layers[t.name] = replace_module(model, t.name, MultiLoRALinear(t.module, max_adapters, max_rank))
        for p in model.parameters():
            p.requires_grad_(False)
        self._slots: dict[str, int] = {}
        self._free = list(range(max_adapters))
        self._in_flight = [0] * max_adapters
        self._holders = [collections.Counter() for _ in range(max_adapters)]  # slot -> thread -> leases
        self._lock = threading.Condition()
        self._generation = threading.local()  # .current: the _Generation of a generate() running on a thread
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._exit, with_kwargs=True, always_call=True)
        self._route_generate(model)

    # ------------------------------------------------------------ adapters

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def slot_of(self, name: str) -> int:
        with self._lock:
            if name not in self._slots:
                raise KeyError(f"no adapter named {name!r} in the pool; loaded: {sorted(self._slots)}")
            return self._slots[name]

    def _plan_ia3(self, directory: str):
        """(write, layer, args) for every layer a PEFT (IA)³ checkpoint scales."""
        state = read_weights(directory)
        plan = []
        for key, vector in sorted(state.items()):
            if not (key.startswith(PREFIX) and key.endswith(".ia3_l")):
                raise CheckpointError(f"checkpoint key {key!r} is not an (IA)3 vector")
            module = key[len(PREFIX):-len(".ia3_l")]
            if module not in self.layers:
                raise CheckpointError(f"checkpoint scales {module!r}, which this pool does not hold")
            layer = self.layers[module]
            feedforward = vector.shape[0] == 1  # PEFT stores [1, in] for feed-forward layers, [out, 1] otherwise
            size = layer.in_features if feedforward else layer.out_features
            if vector.numel() != size:
                raise CheckpointError(f"checkpoint key {key!r} has shape {list(vector.shape)}; the layer expects "
                                      f"{[1, size] if feedforward else [size, 1]}")
            plan.append((layer.set_ia3, (vector.to(layer.ia3_in.dtype), feedforward)))
        if not plan:
            raise CheckpointError(f"checkpoint in {directory} holds no (IA)3 vectors")
        return plan

    def _plan(self, directory: str):
        """(write, args) for every layer the checkpoint adapts; raises before any write."""
        try:
            raw = read_config(directory)
            if raw.get("peft_type") == "IA3":
                return self._plan_ia3(directory)
            config = LoraConfig.from_dict(raw)
        except (ValueError, OSError, TypeError) as e:  # a missing file or folder, bad JSON, a bad field
            raise CheckpointError(str(e)) from None
        if config.use_dora:
            raise CheckpointError(f"{directory} is a DoRA adapter (use_dora: true): adapter pools hold LoRA factors "
                                  "only; a DoRA adapter rescales each output row by its own weight norm, which the "
                                  "pool's shared batches do not compute. Load it with fastpeft.load_adapter instead")
        if config.modules_to_save or config.bias != "none":
            raise CheckpointError("adapter pools hold LoRA factors only: modules_to_save and trained biases "
                                  f"are not supported (adapter_config.json of {directory})")
        state = read_weights(directory)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if key.startswith(PREFIX) and key.endswith(suffix):
                    pairs.setdefault(key[len(PREFIX):-len(suffix)], {})[part] = tensor
                    break
            else:
                raise CheckpointError(f"checkpoint key {key!r} is not a LoRA factor (pools hold LoRA factors only)")
        plan = []
        for module in sorted(pairs):
            if module not in self.layers:
                raise CheckpointError(f"checkpoint adapts {module!r}, which this pool does not hold "
                                      f"(pool layers are like {sorted(self.layers)[:3]})")
            a, b = pairs[module].get("lora_A"), pairs[module].get("lora_B")
            if a is None or b is None:
                raise CheckpointError(f"checkpoint has only one of lora_A/lora_B for {module!r}")
            layer = self.layers[module]
            r = a.shape[0]
            if r > self.max_rank:
                raise CheckpointError(f"checkpoint rank {r} for {module!r} exceeds the pool's max_rank {self.max_rank}")
            if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
                raise CheckpointError(f"checkpoint factors for {module!r} have shapes {list(a.shape)} and "
                                      f"{list(b.shape)}; the layer expects [r, {layer.in_features}] and "
                                      f"[{layer.out_features}, r]")
            alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
            scaling = alpha / (r ** 0.5 if config.use_rslora else r)
            plan.append((layer.set_adapter, (a.to(layer.lora_a.dtype), b.to(layer.lora_b.dtype), scaling)))
        if not plan:
            raise CheckpointError(f"checkpoint in {directory} holds no LoRA factors")
        return plan

    def load(self, name: str, directory: str) -> int:
        """Load a PEFT-format LoRA or (IA)³ checkpoint into a free slot; returns the slot."""
        plan = self._plan(directory)  # every check first: a refused checkpoint changes nothing
        with self._lock:
            if name in self._slots:
                raise ValueError(f"an adapter named {name!r} is already loaded (slot {self._slots[name]})")
            if not self._free:
                raise RuntimeError(f"the adapter pool is full ({self.max_adapters} adapters); unload one first")
            slot = self._free.pop(0)  # reserved: not routable until published below
        try:
            for layer in self.layers.values():
                layer.clear_adapter(slot, unused=True)  # layers the checkpoint does not adapt act as the base
            for write, args in plan:
                write(slot, *args, unused=True)  # a reserved slot: no graph uses it
        except BaseException:
            with self._lock:
                self._free.insert(0, slot)
            raise
        with self._lock:
            self._slots[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Remove an adapter; waits for the passes routed to it to finish (a training step's until its
        backward has run). Refused when only this thread holds it: the wait could never end."""
        with self._lock:
            if name not in self._slots:
                raise KeyError(f"no adapter named {name!r} in the pool; loaded: {sorted(self._slots)}")
            slot = self._slots[name]
            holders = +self._holders[slot]
            if holders and set(holders) == {threading.get_ident()}:
                raise RuntimeError(f"unload({name!r}): a forward pass of this thread still holds it (a graph whose "
                                   "backward has not run: run it, or drop its outputs); unloading would wait forever")
            del self._slots[name]
            self._lock.wait_for(lambda: self._in_flight[slot] == 0)
        for layer in self.layers.values():
            layer.clear_adapter(slot, unused=True)
        with self._lock:
            self._free.append(slot)

    # ------------------------------------------------------------ routing

    def _tokens_per_sequence(self, args, kwargs) -> tuple[int, int, torch.device]:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("AdapterPool: call the model with input_ids [batch, seq] (or inputs_embeds) to route "
                             "adapters per sequence")
        return x.shape[0], x.shape[1], x.device

    def _route_generate(self, model: nn.Module) -> None:
        """``model.generate(..., adapter_names=[...])`` (or ``adapter_ids``), as PEFT's: the names are
        resolved to slots once, held for the whole generation (an unload waits), and every forward
        inside routes by them, the KV-cached steps and the rows generate adds per sequence (beams,
        num_return_sequences) included; the routing of each input shape is built once per generation
        (see :class:`_Generation`). generate does not take the keywords itself, so the pool wraps
        the model's generate (any model that has one)."""
        original = getattr(model, "generate", None)
        if not callable(original):
            return
        pool = self

        @functools.wraps(original)
        def generate(*args, adapter_names=None, adapter_ids=None, **kwargs):
            if adapter_names is None and adapter_ids is None:
                return original(*args, **kwargs)
            previous = getattr(pool._generation, "current", None)
            pool._generation.current = _Generation(*pool._sequence_ids(adapter_names, adapter_ids))
            try:
                return original(*args, **kwargs)
            finally:
                pool._generation.current = previous  # with its batches, the lease goes: the slots may unload

        model.generate = generate

    def _sequence_ids(self, names, ids) -> tuple[torch.Tensor, "_SlotLease"]:
        """Per-sequence slot ids of adapter_names or adapter_ids, and a lease on their slots."""
        if names is not None and ids is not None:
            raise ValueError("pass adapter_names or adapter_ids, not both")
        with self._lock:
            if names is not None:
                unknown = [n for n in names if n is not None and n not in self._slots]
                if unknown:
                    raise KeyError(f"no adapter named {unknown[0]!r} in the pool; loaded: {sorted(self._slots)}")
                ids = torch.tensor([-1 if n is None else self._slots[n] for n in names], dtype=torch.int64)
            ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
            used = sorted({int(i) for i in ids.tolist() if 0 <= i < self.max_adapters})
            return ids, _SlotLease(self, used)

    def _enter(self, module, args, kwargs):
        # No routing pushed yet: if routing fails below, the always-called exit hook pops exactly this.
        push_adapter_batch(None)
        names = kwargs.pop("adapter_names", None)
        ids = kwargs.pop("adapter_ids", None)
        if names is not None and ids is not None:
            raise ValueError("pass adapter_names or adapter_ids, not both")
        batch_size, seq, device = self._tokens_per_sequence(args, kwargs)
        generation = getattr(self._generation, "current", None)
        if names is None and ids is None and generation is not None:  # a forward inside generate(adapter_names=)
            batch = self._generation_batch(generation, batch_size, seq, device)
            pop_adapter_batch()
            push_adapter_batch(batch)
            return args, kwargs
        with self._lock:
            if names is not None:
                if len(names) != batch_size:
                    raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size} sequences")
                unknown = [n for n in names if n is not None and n not in self._slots]
                if unknown:
                    raise KeyError(f"no adapter named {unknown[0]!r} in the pool; loaded: {sorted(self._slots)}")
                ids = torch.tensor([-1 if n is None else self._slots[n] for n in names], dtype=torch.int64)
            elif ids is None:
                ids = torch.full((batch_size,), -1, dtype=torch.int64)
            loaded = self._loaded()
            per_token = isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.shape[0] == batch_size * seq \
                and batch_size * seq != batch_size
            batch = AdapterBatch.build(ids, self.max_adapters, loaded, tokens_per_row=None if per_token else seq,
                                       device=device, per_sequence=not per_token)
            # the slots routed to, read from the ids on the host (the routing is on the model's device)
            batch = batch.with_lease(_SlotLease(self, sorted({int(i) for i in ids.tolist() if i >= 0})))
        pop_adapter_batch()
        push_adapter_batch(batch)
        return args, kwargs

    def _generation_batch(self, generation: _Generation, batch_size: int, seq: int, device) -> AdapterBatch:
        """The batch of a forward inside a generation: built by the first forward of its shape, held
        by the generation's lease (its slots cannot be unloaded before the generation ends, so the
        check of the ids against the loaded slots made then still holds)."""
        key = (batch_size, seq, device)
        batch = generation.batches.get(key)
        if batch is None:
            per_sequence = generation.ids
            if batch_size % per_sequence.numel():
                raise ValueError(f"generate: adapter_names has {per_sequence.numel()} entries for a batch of "
                                 f"{batch_size} sequences")
            ids = per_sequence.repeat_interleave(batch_size // per_sequence.numel())  # beams, num_return_sequences
            with self._lock:
                batch = AdapterBatch.build(ids, self.max_adapters, self._loaded(), tokens_per_row=seq, device=device,
                                           per_sequence=True)
            batch = generation.batches[key] = batch.with_lease(generation.lease)
        return batch

    def _loaded(self) -> list[bool]:
        """Per-slot flags of the published adapters (the pool's lock held)."""
        loaded = [False] * self.max_adapters
        for slot in self._slots.values():
            loaded[slot] = True
        return loaded

    def _exit(self, module, args, kwargs, output):
        # The lease goes with the last reference to the batch: here, or when a graph that kept it is freed.
        pop_adapter_batch()
        return output

