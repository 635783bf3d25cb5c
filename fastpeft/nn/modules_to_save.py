"""ModulesToSaveWrapper: a module trained fully for each adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy

import torch.nn as nn


class ModulesToSaveWrapper(nn.Module):
    """A module trained fully for an adapter (``modules_to_save``): the original stays frozen and
    each adapter trains its own copy, as in PEFT (same attribute names, same checkpoint keys).

    ``disabled``: when True the original module runs, whatever adapter is active.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        self.disabled = False
        for p in module.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name)

    @classmethod
    def around(cls, original: nn.Module, copies: nn.ModuleDict, active_adapter: str | None,
               disabled: bool = False) -> "ModulesToSaveWrapper":
        """A wrapper over existing modules (no copies made): PEFT's wrapper's parts, taken over."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.original_module = original
        wrapper.modules_to_save = copies
        wrapper.active_adapter = active_adapter
        wrapper.disabled = disabled
        return wrapper

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `lm_head.weight`: read it from the module that runs
            return getattr(self.active_module, name)
