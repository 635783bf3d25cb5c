"""A layer's op plan (:class:`fastpeft.ops._registry.Plan`), kept while the layer holds what it was made with."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn


class HeldPlan:
    """A :class:`~fastpeft.ops._registry.Plan` a layer made over what it holds, and the test that it
    still holds it.

    The layer names what the plan was made from as paths of keys from itself: ``("base_layer",
    "weight")`` is its base layer's weight parameter, ``("scaling", name)`` an entry of its scaling
    dict, ``("active_adapter",)`` an attribute. :meth:`holds` reads every path again, as the layer
    holds it now, and compares: tensors by identity and version counter (never by address: freed
    memory is reused), modules by identity, anything else by equality with its value when the
    plan was made. So a weight replaced (``load_state_dict(assign=True)``, a merge into a 4-bit
    base, FSDP or accelerate putting another tensor in the module's dict), converted (``.to()``,
    ``resize_``, ``set_``: these bump the version), another adapter made active or a scaling
    changed can never run against a stale plan. New values written into the same tensors in
    place bump the version too, and the layer makes a new plan. A write through ``tensor.data`` is
    invisible to the test, as to autograd; the faces' own checks refuse what it would make
    inconsistent. Layers also drop their plan where they see a change (``_apply``, state-dict
    loads).

    :meth:`call` is the layer's whole inference call on the plan, in one frame: the test, the
    plan's own test of x (:meth:`Plan.runner`), the reshape of a ``[..., in_features]`` x.
    """

    __slots__ = ("plan", "holds", "call")

    def __init__(self, plan, layer: nn.Module, paths: Sequence[tuple], in_features: int, out_features: int,
                 output: int | None = None):
        """paths: what the plan was made from, read from `layer` (see the class). output: the index
        of the layer's output among the op's outputs (None: the op has one)."""
        self.plan = plan
        terms, names = _guard_terms(layer, paths)
        names.update(Tensor=torch.Tensor, compiling=torch.compiler.is_compiling,
                     autocast=torch._C._is_any_autocast_enabled, run_if_fits=plan.runner())
        y = "out" if output is None else f"out[{output}]"
        # Written out for these paths, read through the layer's dicts (a missing attribute's getattr
        # costs 1 us, a dict's get 0.03): a LoRA layer's thirteen paths cost about 1.4 us a call, as
        # the tuple of its tensors the layer built and compared before did (1.2 us, fewer values;
        # AMD EPYC Zen 4, one thread, CPU time under load).
        source = f"""
def holds(layer):
    return {" and ".join(terms)}

def call(layer, x):
    if compiling() or type(x) is not Tensor or autocast() or not ({" and ".join(terms)}):
        return None
    if x.dim() == 2:
        out = run_if_fits(x)
        return None if out is None else {y}
    if x.dim() and x.shape[-1] == {in_features}:
        out = run_if_fits(x.reshape(-1, {in_features}))
        if out is not None:
            return {y}.reshape(*x.shape[:-1], {out_features})
    return None
"""
        exec(source, names)
        # holds(layer) -> bool: whether the layer holds what the plan was made from.
        # call(layer, x) -> the layer's output, or None where the plan does not take the call
        # (torch.compile, autocast, a subclass of Tensor, an x the plan's op would not take as it
        # is, a layer that no longer holds what the plan was made from): the layer's own path then.
        self.holds, self.call = names["holds"], names["call"]

    def __reduce__(self):
        # A copy or a pickle of the layer holds no plan (it would hold the op itself, and the copy
        # other tensors): its first call makes one.
        return _no_plan, ()


def call_on_new_plan(layer: nn.Module, held: HeldPlan | None, x):
    """A layer's output for a call its held plan (`held`, or none) did not take, on a plan made now
    with x (``layer.new_held_plan(x)``) when the call is one a plan can take and `held` no longer
    holds; None where the layer's own full path must run (training with grad mode on, autocast,
    torch.compile, a plan that holds but did not take this x, a layer no plan applies to)."""
    # torch.compile first: a traced tensor's version counter cannot be read (holds() would break the graph)
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor or layer.training and torch.is_grad_enabled()
            or torch._C._is_any_autocast_enabled() or held is not None and held.holds(layer)):
        return None
    held = layer.new_held_plan(x)
    return None if held is None else held.call(layer, x)


def _guard_terms(layer: nn.Module, paths: Sequence[tuple]) -> tuple[list[str], dict]:
    """The conditions, as Python source over ``layer``, that each path reads what it reads now, and
    the objects they compare with (by name)."""
    terms: list[str] = []
    names: dict = {}
    known: dict[tuple, str] = {(): "layer"}  # path prefix -> the source that gives its object
    values: dict[tuple, object] = {(): layer}
    for path in paths:
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            if prefix in known:
                continue
            parent, key = values[prefix[:-1]], prefix[-1]
            read, value = _read(known[prefix[:-1]], parent, key)
            name = f"v{len(names)}"
            if isinstance(value, torch.Tensor):
                names[name] = value
                terms.append(f"{read} is {name} and {name}._version == {int(value._version)}")
            elif value is None or isinstance(value, (nn.Module, dict)):  # a dict: its entries are read below
                names[name] = value
                terms.append(f"{read} is {name}")
            else:
                names[name] = copy.copy(value)  # a list changed in place is seen
                terms.append(f"{read} == {name}")
            # below a checked object, read it from its name: the object it must be
            known[prefix], values[prefix] = name, value
    return terms, names


def _read(source: str, parent, key) -> tuple[str, object]:
    """(source reading `key` from `parent` given by `source`, as the parent holds it now; its value now)."""
    if isinstance(parent, nn.Module):
        for table in ("_parameters", "_buffers", "_modules"):
            entries = parent.__dict__[table]
            if key in entries:
                return f"{source}.{table}.get({key!r})", entries[key]
        if key in parent.__dict__:
            return f"{source}.{key}", parent.__dict__[key]
        if not hasattr(type(parent), key):  # held nowhere: it must stay so (getattr's AttributeError costs 1 us)
            absent = " and ".join(f"{key!r} not in {source}.{table}" for table in (
                "_parameters", "_buffers", "_modules", "__dict__"))
            return f"(None if {absent} else False)", None
        return f"{source}.{key}", getattr(parent, key)  # a class's attribute or a property
    if isinstance(parent, dict):
        return f"{source}.get({key!r})", parent.get(key)
    raise TypeError(f"a plan's path reads modules and dicts, not {type(parent).__name__}")


def _no_plan() -> None:
    return None
