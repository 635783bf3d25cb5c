"""Layer freezing: train only the top k transformer layers (those nearest the output) and/or
named modules; everything else stays frozen.

The layer stack is found by rule: the ``nn.ModuleList`` whose name ends in one of PEFT's
layer-container names (``fastpeft.targeting.DEFAULT_LAYERS_PATTERNS``: ``layers``, ``h``,
``block``...), or the one ``layers_pattern`` names. The checkpoint holds the trained tensors under
the model's own parameter names (see :mod:`fastpeft.methods.full_finetune`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..targeting import DEFAULT_LAYERS_PATTERNS, find_named_modules, name_matches, own_modules
from .base import MethodConfig, register
from .full_finetune import SelectiveMethod, parameters_under


@dataclass
class LayerFreezingConfig(MethodConfig):
    """num_trainable_layers: how many of the top layers train (0: none, only modules_to_train).
    modules_to_train: modules (names or name suffixes) trained beside them, e.g. ``["norm", "lm_head"]``.
    layers_pattern: the layer container's name or last name component, when the model has several
        (an encoder-decoder's ``"decoder.block"``) or an unusual one."""

    peft_type = "LAYER_FREEZING"
    num_trainable_layers: int = 1
    modules_to_train: list[str] | None = None
    layers_pattern: str | None = None

    def __post_init__(self):
        k = self.num_trainable_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"LayerFreezingConfig: num_trainable_layers must be an integer >= 0, got {k!r}")
        if k == 0 and not self.modules_to_train:
            raise ValueError("LayerFreezingConfig: nothing would train (num_trainable_layers=0 and no "
                             "modules_to_train)")


def layer_stack(model: nn.Module, layers_pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """(name, container) of the model's stack of transformer layers."""
    def fits(name: str) -> bool:
        if layers_pattern is not None:
            return name_matches(name, [layers_pattern])
        return name.rpartition(".")[2] in DEFAULT_LAYERS_PATTERNS

    stacks = [(n, m) for n, m in own_modules(model) if n and isinstance(m, nn.ModuleList) and fits(n)]
    if not stacks:
        lists = [n for n, m in own_modules(model) if isinstance(m, nn.ModuleList)]
        wanted = repr(layers_pattern) if layers_pattern else f"one of {list(DEFAULT_LAYERS_PATTERNS)}"
        raise ValueError(f"layer freezing: {type(model).__name__} has no nn.ModuleList named {wanted} "
                         f"(its ModuleLists: {lists}); set layers_pattern")
    if len(stacks) > 1:
        raise ValueError(f"layer freezing: {type(model).__name__} has several layer stacks {[n for n, _ in stacks]}; "
                         "set layers_pattern to the one to train")
    return stacks[0]


@register
class LayerFreezing(SelectiveMethod):
    config_cls = LayerFreezingConfig

    def trained_names(self, model: nn.Module, config: LayerFreezingConfig) -> list[str]:
        k = config.num_trainable_layers
        modules = []
        if k:
            name, stack = layer_stack(model, config.layers_pattern)
            if k > len(stack):
                raise ValueError(f"LayerFreezingConfig: num_trainable_layers={k} but {name} holds {len(stack)} layers")
            modules = [f"{name}.{i}" for i in range(len(stack) - k, len(stack))]
        modules += find_named_modules(model, config.modules_to_train, "LayerFreezingConfig.modules_to_train")
        return parameters_under(model, modules)
