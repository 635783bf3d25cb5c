"""A layer's op plan (:class:`fastpeft.ops._registry.Plan`), kept while the layer holds what it was made with."""

from __future__ import annotations

import copy
import enum
from typing import Sequence

import torch
import torch.nn as nn

from .. import backends
from ..ops import Compare


class Read(enum.IntEnum):
    """How a held call's term reads its object from its source (the layer, or an object an earlier
    term checked); the numbers are the C++ side's (``fastpeft._C.HeldCall.READS``)."""
    TABLE = 0  # source.__dict__[table].get(key): a module's parameter, buffer or submodule
    INSTANCE = 1  # source.__dict__[key]: a module's plain attribute (missing: the test fails)
    NOWHERE = 2  # key in none of source's _parameters, _buffers, _modules, __dict__
    ATTRIBUTE = 3  # getattr(source, key): a class attribute or a property
    ITEM = 4  # source.get(key): a dict's entry


_TABLES = ("_parameters", "_buffers", "_modules")

# Where a layer keeps its HeldPlan: its instance dict's entry of this name.
PLAN_ATTRIBUTE = "_held_plan"

# The instance-dict entries a call of a layer reads before its held call: nn.Module.__call__'s four
# hook tables (torch's names: were they renamed, read-ahead would only miss them), then the plan.
# With the layer, its dict and the plan's tensors, what the held call before it prefetches
# (fastpeft._C.HeldCall's read-ahead).
_CALL_READS = ("_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_pre_hooks", PLAN_ATTRIBUTE)


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

    :meth:`call` is the layer's whole inference call on the plan, in one call: the test, the
    plan's own test of x, the reshape of a ``[..., in_features]`` x, the kernel. It runs in C++
    (``fastpeft._C.HeldCall``) where the extension is built, over the same terms as
    :class:`PyHeldCall` (the same call in Python, without it). Written in Python as source per
    layer, the call cost SmolLM2-135M's NF4 greedy generation 1.5 ms of each token (210 layer
    calls; 22.8-23.0 against 21.2-21.5 ms a token, 32 tokens, one thread, AMD EPYC Zen 4 capped
    at AVX2): a layer's Python objects are cold when the next token reaches it. So the C++ call
    also prefetches what the layer called after it last time reads (its dicts, the entries of
    ``_CALL_READS``, its tensors' objects and first bytes), before its own kernel and again after
    it: about 0.6 ms of a token there (csrc/held_call.cpp).
    """

    __slots__ = ("plan", "holds", "call")

    def __init__(self, plan, layer: nn.Module, paths: Sequence[tuple], in_features: int, out_features: int,
                 output: int | None = None):
        """paths: what the plan was made from, read from `layer` (see the class). output: the index
        of the layer's output among the op's outputs (None: the op has one)."""
        if plan.features != in_features:
            raise ValueError(f"a held plan's x has {plan.features} features, the layer {in_features}")
        self.plan = plan
        direct = plan.direct_call()
        kernel, rest, conditions = direct if direct is not None else (None, plan.rest, [])
        impl = held_call_class()(guard_terms(layer, paths), conditions, kernel, rest, plan.runner(), plan.dtype,
                                 plan.device, in_features, out_features, -1 if output is None else output,
                                 _CALL_READS)
        # holds(layer) -> bool: whether the layer holds what the plan was made from.
        # call(layer, x) -> the layer's output, or None where the plan does not take the call
        # (autocast, a subclass of Tensor, an x the plan's op would not take as it is, a layer
        # that no longer holds what the plan was made from): the layer's own path then. The
        # caller rules out torch.compile first (it cannot trace the C++ call).
        self.holds, self.call = impl.holds, impl.call

    def __reduce__(self):
        # A copy or a pickle of the layer holds no plan (it would hold the op itself, and the copy
        # other tensors): its first call makes one.
        return _no_plan, ()


def held_call_class() -> type:
    """``fastpeft._C.HeldCall`` where the extension is built, else :class:`PyHeldCall`."""
    return getattr(backends.extension(), "HeldCall", None) or PyHeldCall


class PyHeldCall:
    """``fastpeft._C.HeldCall`` in Python, for an extension that is not built: the same terms,
    read the same way (see :func:`guard_terms`). Its kernel is always the plan's runner, which
    tests x and the conditions of a direct call itself; `conditions`, `kernel` and `read_keys`
    (what to prefetch, which Python cannot) are the C++ side's."""

    def __init__(self, terms: list[tuple], conditions: list[tuple], kernel, rest: tuple, runner, dtype, device,
                 in_features: int, out_features: int, output: int, read_keys: tuple):
        self.terms, self.runner = terms, runner
        self.in_features, self.out_features, self.output = in_features, out_features, output

    def holds(self, layer) -> bool:
        for source, read, table, key, expected, compare, version in self.terms:
            obj = layer if source < 0 else self.terms[source][4]
            if read == Read.TABLE:
                value = obj.__dict__.get(table, {}).get(key)
            elif read == Read.INSTANCE:
                if key not in obj.__dict__:
                    return False
                value = obj.__dict__[key]
            elif read == Read.NOWHERE:
                entries = obj.__dict__
                if key in entries or any(key in entries.get(t, ()) for t in _TABLES):
                    return False
                continue
            elif read == Read.ATTRIBUTE:
                value = getattr(obj, key)
            else:
                value = obj.get(key)
            if compare == Compare.VERSION:
                if value is not expected or value._version != version:
                    return False
            elif value is not expected and (compare == Compare.IDENTITY or not value == expected):
                return False
        return True

    def call(self, layer, x):
        if type(x) is not torch.Tensor or not self.holds(layer) or torch._C._is_any_autocast_enabled():
            return None
        if x.dim() == 2:
            x2 = x
        elif x.dim() and x.shape[-1] == self.in_features:
            x2 = x.reshape(-1, self.in_features)
        else:
            return None
        out = self.runner(x2)
        if out is None:
            return None
        y = out if self.output < 0 else out[self.output]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


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


def guard_terms(layer: nn.Module, paths: Sequence[tuple]) -> list[tuple]:
    """The terms a held call checks, in order, that each path reads what it reads now:
    ``(source, read, table, key, expected, compare, version)``. source: -1 for the layer, else the
    index of the term whose expected object the key is read from; read: how (a module's table
    entry, its plain attribute, a name it must not hold, a class attribute or property, a dict's
    entry); compare: tensors by identity and version, modules, dicts and None by identity,
    anything else by equality with a copy of its value now (a list changed in place is seen)."""
    terms: list[tuple] = []
    known: dict[tuple, int] = {(): -1}  # path prefix -> the term that read its object
    values: dict[tuple, object] = {(): layer}
    for path in paths:
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            if prefix in known:
                continue
            parent, key = values[prefix[:-1]], prefix[-1]
            read, table, value = _read(parent, key)
            if read == Read.NOWHERE:
                compare, version = Compare.IDENTITY, 0
            elif isinstance(value, torch.Tensor):
                compare, version = Compare.VERSION, int(value._version)
            elif value is None or isinstance(value, (nn.Module, dict)):  # a dict: its entries are read below
                compare, version = Compare.IDENTITY, 0
            else:
                compare, version, value = Compare.EQUAL, 0, copy.copy(value)
            terms.append((known[prefix[:-1]], int(read), table, key, value, int(compare), version))
            # below a checked object, read it from the term: the object it must be
            known[prefix], values[prefix] = len(terms) - 1, value
    return terms


def _read(parent, key) -> tuple[Read, str | None, object]:
    """(how a term reads `key` from `parent`, the module table it reads, its value now)."""
    if isinstance(parent, nn.Module):
        for table in _TABLES:
            entries = parent.__dict__[table]
            if key in entries:
                return Read.TABLE, table, entries[key]
        if key in parent.__dict__:
            return Read.INSTANCE, None, parent.__dict__[key]
        if not hasattr(type(parent), key):  # held nowhere: it must stay so
            return Read.NOWHERE, None, None
        return Read.ATTRIBUTE, None, getattr(parent, key)  # a class's attribute or a property
    if isinstance(parent, dict):
        return Read.ITEM, None, parent.get(key)
    raise TypeError(f"a plan's path reads modules and dicts, not {type(parent).__name__}")


def _no_plan() -> None:
    return None
