"""PEFT methods, each a config class plus a :class:`~fastpeft.methods.base.Method` that applies it,
and the calls that act on whatever method a model holds.

``get_peft_model``, ``set_adapter``, ``disable_adapters`` and ``merge_and_unload`` dispatch on the
config's ``peft_type``: LoRA (:mod:`.lora`, several named adapters per model) or one of the
registered methods (one adapter per model). ``save_adapter`` / ``load_adapter`` live in
:mod:`fastpeft.checkpoint`.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from ..config import LoraConfig
from ..nn.linear4bit import Linear4bit
from .base import (ADAPTERS_CHANGED, METHODS, Method, MethodConfig, adapters_changed, adapters_of, as_config,
                   config_from_dict, forget_adapters, load_config, method_for, method_of, register)
from .lora import add_adapter, delete_adapter, from_peft, lora_layers
from . import lora
# Each method module registers itself on import (add new modules here).
from . import (bitfit, bottleneck, compacter, diff_pruning, full_finetune, ia3, layer_freezing,  # noqa: F401
               prefix_tuning, prompt_tuning)


def get_peft_model(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Apply a PEFT method to `model`, in place, and return it.

    LoRA (:class:`LoraConfig`): replace the layers `config` targets with fastpeft LoRA layers;
    freeze everything but the adapter (and the biases / modules_to_save it names); make it the
    active adapter. Any other config: its method applies it; such a model holds that one adapter.
    A ``peft`` config (``peft.LoraConfig``...) is read as fastpeft's.
    """
    config = as_config(config)
    if not isinstance(config, LoraConfig):
        method = method_for(config)
        if adapters_of(model):
            raise ValueError(f"the model already has adapters {sorted(adapters_of(model))}; a {type(config).__name__} "
                             "adapter must be the model's only one")
        model = method.apply(model, config, adapter_name)
        model.fastpeft_config = {adapter_name: config}
        model.fastpeft_active_adapter = adapter_name
        return adapters_changed(model)
    add_adapter(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active (and only trainable) adapter. A model with an adapter of
    another method than LoRA has that one adapter, always active: naming it changes nothing."""
    configs = adapters_of(model)
    if adapter_name not in configs:
        raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    if method_of(model) is None:
        lora.activate(model, adapter_name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes as its base model (merged adapters are unmerged first).
    A method that cannot switch off (see :meth:`Method.disabled`) raises instead."""
    method = method_of(model)
    with (method.disabled(model) if method is not None else lora.disabled(model)):
        yield model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and put the plain modules back (in place).
    LoRA: modules in modules_to_save keep the active adapter's trained copy. Other methods: their
    :meth:`Method.merge_and_unload` (DiffPruning folds its sparse delta; methods that train the
    model's own weights just detach; prompt, prefix, IA3 and adapter blocks refuse)."""
    method = method_of(model)
    return method.merge_and_unload(model) if method is not None else lora.merge_and_unload(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared tensor counts once, and a 4-bit weight counts its
    weights, not its packed bytes (as PEFT counts bitsandbytes' packed ones): a QLoRA model is mostly
    frozen 4-bit weights."""
    weights_4bit = {id(m.weight): m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit)}
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = weights_4bit.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")


__all__ = ["Method", "MethodConfig", "METHODS", "ADAPTERS_CHANGED", "adapters_changed", "register", "method_for",
           "method_of", "adapters_of", "as_config", "config_from_dict", "load_config", "forget_adapters",
           "get_peft_model", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "merge_and_unload",
           "from_peft", "lora_layers", "count_parameters", "print_trainable_parameters"]
