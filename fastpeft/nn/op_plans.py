"""A layer's op plan (:class:`fastpeft.ops._registry.Plan`), kept while the layer holds what it was made with."""

from __future__ import annotations

from typing import Sequence

import torch


class HeldPlan:
    """A :class:`~fastpeft.ops._registry.Plan` and its key: the tensors it holds (by identity and version
    counter, never by address: freed memory is reused) and any other value the layer made it
    from (an adapter's name, its scaling). A layer computes its key's parts from what it holds
    now at every call and runs the plan only when they are the same (:attr:`holds`); otherwise it
    makes a new one (or takes its full path). So a weight replaced (``load_state_dict(assign=True)``,
    a merge into a 4-bit base, FSDP putting a shard in place), converted (``.to()``, ``resize_``,
    ``set_``: these bump the version), another adapter made active or a scaling changed can never
    run against a stale plan; new values written into the same tensors (an optimiser step,
    ``copy_``) are read by the plan itself at each call. Layers also drop their plan where they see
    a change (``_apply``, state-dict loads). A write through ``tensor.data`` is invisible to the key,
    as to autograd; the faces' own checks refuse what it would make inconsistent."""

    __slots__ = ("plan", "holds")

    def __init__(self, plan, tensors: Sequence[torch.Tensor | None], values: tuple = ()):
        self.plan = plan
        # holds(tensors, values) -> bool: whether the plan was made with these very tensors
        # (unchanged since) and values; the layer passes its tensors in the same order every call.
        self.holds = _key_check(tuple(tensors), values)

    def __reduce__(self):
        # A copy or a pickle of the layer holds no plan (it would hold the op itself, and the copy
        # other tensors): its first call makes one.
        return _no_plan, ()


def _key_check(tensors: tuple, values: tuple):
    """``holds(now, now_values)``, written out for these tensors: ``now[i] is t_i and
    t_i._version == v_i`` for each (``now[i] is None`` where the layer held None), and the values
    equal. Written out, it costs 0.3 us a call for four tensors; map() over them cost 0.6 and a
    loop 1.4 (AMD EPYC Zen 4, under load)."""
    names: dict = {"held_values": values}
    terms = ["now_values == held_values"]
    for i, t in enumerate(tensors):
        if t is None:
            terms.append(f"now[{i}] is None")
        else:
            names[f"t{i}"] = t
            terms.append(f"now[{i}] is t{i} and t{i}._version == {int(t._version)}")
    exec(f"def holds(now, now_values=()):\n    return {' and '.join(terms)}\n", names)
    return names["holds"]


def _no_plan() -> None:
    return None
