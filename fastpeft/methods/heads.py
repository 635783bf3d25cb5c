"""Modules trained whole for the methods other than LoRA: PEFT's ``modules_to_save`` and a
task_type's heads, one implementation for (IA)3, prompt tuning, prefix tuning and the
bottleneck-style methods.

As in PEFT (and fastpeft's LoRA), the modules ``config.modules_to_save`` names, plus the heads of
its task_type (:data:`fastpeft.targeting.TASK_HEADS`: a sequence classifier's ``classifier`` /
``score``, which PEFT's ``PeftModelFor<Task>`` classes add), are each wrapped in a
:class:`~fastpeft.nn.ModulesToSaveWrapper`: the original is frozen, a copy is trained, and the
copy's tensors are saved with the adapter under ``<prefix><module>.<param>``. The prefix is the
method's: ``base_model.model.`` for tuner methods ((IA)3, and the bottleneck-style methods, which
follow LoRA's form), ``base_model.`` for PEFT's prompt-learning methods (whose ``PeftModel`` holds
the transformers model directly as ``base_model``). Inside ``disable_adapters`` the wrappers run
their original module, as PEFT's tuner methods do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..nn.modules_to_save import ModulesToSaveWrapper
from ..targeting import (find_modules_to_save, own_modules, refuse_targets_inside_modules_to_save, replace_module,
                         with_task_heads)


@dataclass(frozen=True)
class Heads:
    """What a config trains whole: its modules_to_save and its task_type (whose heads are added)."""
    modules_to_save: list[str] | None
    task_type: str | None


def heads_of(config, task_type: str | None = None) -> Heads:
    """modules_to_save with the task_type's heads added, as PEFT adds them. `task_type` overrides
    the config's (prompt learning infers it from the model when the config has none)."""
    return with_task_heads(Heads(getattr(config, "modules_to_save", None),
                                 task_type or getattr(config, "task_type", None)))


def find_heads(model: nn.Module, config, targets=(), task_type: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module `config` trains whole, by PEFT's rules; raises, changing
    nothing, when an entry matches nothing at all or a module to save holds one of the method's
    `targets` (anything with a ``.name``): a module is either adapted or trained whole."""
    found = find_modules_to_save(model, heads_of(config, task_type))
    refuse_targets_inside_modules_to_save(list(targets), found)
    return found


def wrap_heads(model: nn.Module, config, found: list[tuple[str, nn.Module]], adapter_name: str,
               task_type: str | None = None) -> None:
    """Wrap each module of `found` (from :func:`find_heads`, the model frozen since): its copy
    trains, the original stays frozen. The config records the full modules_to_save, as PEFT's does."""
    for name, module in found:
        replace_module(model, name, ModulesToSaveWrapper(module, adapter_name))
    if found:
        config.modules_to_save = heads_of(config, task_type).modules_to_save


def heads_state_dict(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The trained copies' live tensors under PEFT's keys ``<prefix><module>.<param>``."""
    state = {}
    for name, module in own_modules(model):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k, v in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                state[f"{prefix}{name}.{k}"] = v
    return state


def heads_shapes(model: nn.Module, config, prefix: str, targets=(), task_type: str | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """key -> shape of the modules `config` trains whole, as a checkpoint holds them (the model unchanged)."""
    shapes = {}
    for name, module in find_heads(model, config, targets, task_type):
        source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for k, v in source.state_dict().items():
            shapes[f"{prefix}{name}.{k}"] = tuple(v.shape)
    return shapes


@contextlib.contextmanager
def heads_off(model: nn.Module):
    """The wrappers run their original (frozen) module inside the block."""
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for w in wrappers:
            w.disabled = False
