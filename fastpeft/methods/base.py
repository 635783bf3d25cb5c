"""The method contract: a config class and a :class:`Method` that applies it, and the registry of methods.

Every PEFT method but LoRA is one module in :mod:`fastpeft.methods` defining

* a config dataclass deriving from :class:`MethodConfig`, with a ``peft_type`` class attribute
  (PEFT's string where PEFT has the method, so ``adapter_config.json`` files are interchangeable);
* a :class:`Method` subclass, decorated with :func:`register`, that applies the config to a model
  and names the tensors its checkpoint holds.

A model holds at most one adapter of such a method (``model.fastpeft_config == {name: config}``).
LoRA (:mod:`fastpeft.methods.lora`) holds several named adapters per model and has calls of its
own (add, switch, delete, merge). Methods register themselves on import; this file imports none.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..config import LoraConfig, read_config, write_config


@dataclasses.dataclass(kw_only=True)
class MethodConfig:
    """Base of a method's config dataclass: ``adapter_config.json`` reading and writing.

    Subclasses are ``@dataclass`` classes with a ``peft_type: ClassVar[str]``; their fields are
    what ``to_dict`` writes, and ``from_dict`` ignores keys it does not know but refuses another
    ``peft_type``. PEFT's bookkeeping fields every config has (keyword-only here) never change
    what an adapter computes.
    """

    peft_type: ClassVar[str] = ""
    auto_mapping: dict | None = None
    peft_version: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if d.get("peft_type") != cls.peft_type:
            raise ValueError(f"adapter config: peft_type {d.get('peft_type')!r} is not {cls.peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str) -> str:
        return write_config(self.to_dict(), directory)

    def check_peft_type(self, expected: str) -> None:
        """For configs of PEFT's methods, whose peft_type is a field as in PEFT (PEFT fills it in;
        passing it is allowed): it must name this method."""
        if self.peft_type is None:
            self.peft_type = expected
        elif str(getattr(self.peft_type, "value", self.peft_type)) != expected:
            raise ValueError(f"{type(self).__name__}: peft_type must be {expected!r}, got {self.peft_type!r}")
        self.peft_type = expected
        task_type = getattr(self, "task_type", None)
        if task_type is not None:  # peft.TaskType.CAUSAL_LM -> "CAUSAL_LM"
            self.task_type = str(getattr(task_type, "value", task_type))

    def save_pretrained(self, directory: str) -> str:
        """Write ``adapter_config.json`` into `directory` (made if needed), as PEFT's configs do."""
        os.makedirs(directory, exist_ok=True)
        return self.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str):
        return cls.from_dict(read_config(directory))


class Method:
    """How one PEFT method changes a model. Subclasses set ``config_cls`` and implement the three
    methods below; ``fastpeft.get_peft_model`` calls ``apply``, checkpoints use the other two."""

    config_cls: ClassVar[type]

    def apply(self, model: nn.Module, config, adapter_name: str) -> nn.Module:
        """Change `model` in place (inject modules, hooks), freeze everything but what the method
        trains, and return the model. Raise, changing nothing, when the config does not fit."""
        raise NotImplementedError

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The live tensors (parameters or buffers, not copies) a checkpoint of the adapter holds,
        under the keys written to ``adapter_model.safetensors`` (PEFT's keys where PEFT has the method)."""
        raise NotImplementedError

    def expected_shapes(self, model: nn.Module, config) -> dict[str, tuple[int, ...]]:
        """key -> shape that a checkpoint of `config` must hold for `model` (the model unchanged)."""
        raise NotImplementedError

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the model's own weights and remove what the method added. A method
        whose adapter is not a weight delta (prompts, hooks, blocks) refuses rather than pretend."""
        raise TypeError(f"merge_and_unload: a {self.config_cls.__name__} adapter is not a weight delta; it cannot be "
                        "merged into the base weights (save it with fastpeft.save_adapter instead)")

    def disabled(self, model: nn.Module):
        """A context manager in which the model computes as its base model; methods that cannot
        switch off refuse (a silent no-op would return adapted outputs as the base model's)."""
        raise TypeError(f"disable_adapters: fastpeft cannot switch a {self.config_cls.__name__} adapter off; load the "
                        "base model separately to compare")


METHODS: dict[str, Method] = {}


# Called with a model whenever fastpeft adds or removes its adapters. The layers above methods hook
# in here (checkpoint.py makes ``model.save_pretrained`` write the adapters in PEFT's format)
# without methods importing them.
ADAPTERS_CHANGED: list[Callable[[nn.Module], None]] = []


def adapters_changed(model: nn.Module) -> nn.Module:
    """Tell the ADAPTERS_CHANGED hooks that `model`'s adapters changed; returns the model."""
    for hook in ADAPTERS_CHANGED:
        hook(model)
    return model


def forget_adapters(model: nn.Module) -> nn.Module:
    """Remove fastpeft's adapter records from a model (after merging: it is a plain model again)."""
    for attr in ("fastpeft_config", "fastpeft_active_adapter"):
        if hasattr(model, attr):
            delattr(model, attr)
    return adapters_changed(model)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` the method for ``cls.config_cls.peft_type``."""
    peft_type = cls.config_cls.peft_type
    if not peft_type or peft_type == "LORA":
        raise ValueError(f"{cls.__name__}: config_cls needs its own peft_type")
    METHODS[peft_type] = cls()
    return cls


def method_for(config) -> Method:
    method = METHODS.get(getattr(config, "peft_type", None))
    if method is None or not isinstance(config, method.config_cls):
        raise TypeError(f"{type(config).__name__} is not a fastpeft adapter config (expected LoraConfig or one of "
                        f"{sorted(m.config_cls.__name__ for m in METHODS.values())})")
    return method


def as_config(config):
    """`config` itself, or a ``peft`` config (``peft.LoraConfig``, ``peft.IA3Config``...) read as the
    fastpeft config of the same method, field for field (what its ``adapter_config.json`` would say)."""
    if not type(config).__module__.startswith("peft."):
        return config
    import json

    def plain(value):  # PEFT's enums are str subclasses, its target sets become sorted lists
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return config_from_dict(json.loads(json.dumps(config.to_dict(), default=plain)))


def config_from_dict(d: dict[str, Any]):
    """The config object an ``adapter_config.json`` describes, by its ``peft_type``."""
    peft_type = d.get("peft_type")
    if peft_type == "LORA":
        return LoraConfig.from_dict(d)
    if peft_type not in METHODS:
        raise ValueError(f"adapter config: peft_type {peft_type!r} is not supported "
                         f"(fastpeft has LORA, {', '.join(sorted(METHODS))})")
    return METHODS[peft_type].config_cls.from_dict(d)


def load_config(directory: str):
    """The config of the adapter saved in `directory`, whatever its method."""
    return config_from_dict(read_config(directory))


def adapters_of(model: nn.Module) -> dict:
    """{adapter_name: config} of the adapters fastpeft put into `model` (empty for a plain model)."""
    return getattr(model, "fastpeft_config", {})


def method_of(model: nn.Module) -> Method | None:
    """The Method of the model's adapter when it is not LoRA (such a model holds that one adapter),
    else None."""
    configs = [c for c in adapters_of(model).values() if not isinstance(c, LoraConfig)]
    return method_for(configs[0]) if configs else None
