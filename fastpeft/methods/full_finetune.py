"""Full fine-tuning, the baseline every PEFT method is measured against, and the machinery of the
selective methods (BitFit, layer freezing): train a chosen subset of the model's own parameters.

A selective method changes no module: it sets ``requires_grad`` and names the parameters it trains.
Its checkpoint holds exactly those parameters under the model's own parameter names (the keys of
``model.state_dict()``), so ``model.load_state_dict(file, strict=False)`` reads it too. A tensor
shared by two names (tied embeddings) is held once, under its first name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..targeting import find_named_modules, own_modules
from .base import Method, MethodConfig, forget_adapters, register


def own_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of the model, each tensor once (tied weights under their first name)."""
    return dict(model.named_parameters())


def parameters_under(model: nn.Module, module_names) -> list[str]:
    """Names of the parameters inside the modules `module_names` (full module names), by tensor:
    a tied output layer yields the shared tensor under its first name."""
    name_of = {id(p): n for n, p in own_parameters(model).items()}
    names = []
    for module_name in module_names:
        for param in model.get_submodule(module_name).parameters():
            if name_of[id(param)] not in names:
                names.append(name_of[id(param)])
    return names


class SelectiveMethod(Method):
    """A method that trains some of the model's parameters as they are. Subclasses implement
    :meth:`trained_names` (which raises, changing nothing, when the config does not fit)."""

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """The trained weights are the model's own: nothing to fold; the adapter bookkeeping goes."""
        return forget_adapters(model)

    def trained_names(self, model: nn.Module, config) -> list[str]:
        raise NotImplementedError

    def apply(self, model: nn.Module, config, adapter_name: str) -> nn.Module:
        names = set(self.trained_names(model, config))
        for name, param in own_parameters(model).items():
            param.requires_grad_(name in names)
        return model

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        config = model.fastpeft_config[adapter_name]
        params = own_parameters(model)
        return {name: params[name] for name in self.trained_names(model, config)}

    def expected_shapes(self, model: nn.Module, config) -> dict[str, tuple[int, ...]]:
        params = own_parameters(model)
        return {name: tuple(params[name].shape) for name in self.trained_names(model, config)}


@dataclass
class FullFinetuneConfig(MethodConfig):
    """Every parameter of the model trains; the checkpoint is the whole model's parameters."""

    peft_type = "FULL_FINETUNE"


@register
class FullFinetune(SelectiveMethod):
    config_cls = FullFinetuneConfig

    def trained_names(self, model: nn.Module, config: FullFinetuneConfig) -> list[str]:
        return list(own_parameters(model))
