"""Where a method changes a model: a module's parent, and putting a module into a model.

A module put into a model takes the training mode of the module it replaces, or of the module it
is attached to: a model in eval mode stays in eval mode, so an adapter's dropout or sampled gates
are off at inference however the adapter arrived (get_peft_model, load_adapter, an AdapterPool, a
quantised base). PEFT leaves its new layers in training mode; the README says so.
"""

from __future__ import annotations

import torch.nn as nn


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding submodule `name`, its attribute name there)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where submodule `name` is, in the training mode of the module it replaces; returns `new`."""
    parent, child = parent_of(model, name)
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)
    return new


def attach_module(host: nn.Module, attribute: str, new: nn.Module) -> nn.Module:
    """Add `new` to `host` as `attribute`, in `host`'s training mode; returns `new`."""
    new.train(host.training)
    host.add_module(attribute, new)
    return new
