"""LoRA: named adapters injected into any ``nn.Module`` by rules, merging, and conversion from ``peft``.

Which modules get an adapter is decided by :func:`fastpeft.targeting.find_targets` (module type
and PEFT's name rules, see :class:`fastpeft.LoraConfig`), never by per-model code. The model is
changed in place; its adapter configs live in ``model.fastpeft_config`` (``{adapter_name:
LoraConfig}``) and the active adapter's name in ``model.fastpeft_active_adapter``. Unlike the
other methods a model may hold several LoRA adapters, one active at a time.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from ..config import LoraConfig
from ..nn.lora import DoRAMagnitude, LoRALinear
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..targeting import (adaptable, fan_in_fan_out_of_targets, find_modules_to_save, find_targets, layer_features,
                         own_modules, refuse_targets_inside_modules_to_save, replace_module, with_task_heads)
from .base import adapters_changed, adapters_of, as_config, forget_adapters, method_of


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def refuse_other_method(model: nn.Module, what: str) -> None:
    """LoRA's multi-adapter calls on a model whose one adapter is of another method: a clear
    error before anything changes."""
    method = method_of(model)
    if method is not None:
        raise TypeError(f"{what}: the model holds a {method.config_cls.__name__} adapter, which must be its only "
                        "one and cannot be removed in place (merge_and_unload, or start from the base model)")


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to the modules `config` targets (wrapping them on first use).
    The active adapter does not change, unless the model had none. `config` may be PEFT's."""
    config = as_config(config)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a fastpeft.LoraConfig, got {type(config).__name__}")
    refuse_other_method(model, "add_adapter")
    if adapter_name in adapters_of(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {sorted(adapters_of(model))}")
    targets, config = find_targets(model, with_task_heads(config))
    config = fan_in_fan_out_of_targets(targets, config)
    to_save = find_modules_to_save(model, config)  # every lookup done before any change
    refuse_targets_inside_modules_to_save(targets, to_save)
    for t in targets:
        if isinstance(t.module, LoRALinear):
            t.module.add_adapter(adapter_name, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
                                 config.init_lora_weights, config.use_dora)
        else:
            replace_module(model, t.name, LoRALinear(
                t.module, r=t.r, lora_alpha=t.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                fan_in_fan_out=layer_features(t.module)[2], adapter_name=adapter_name, use_dora=config.use_dora))
    for name, module in to_save:
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            replace_module(model, name, ModulesToSaveWrapper(module, adapter_name))
    if not hasattr(model, "fastpeft_config"):
        model.fastpeft_config = {}
    model.fastpeft_config[adapter_name] = config
    activate(model, getattr(model, "fastpeft_active_adapter", None) or adapter_name)
    return adapters_changed(model)


def activate(model: nn.Module, adapter_name: str) -> None:
    """Make LoRA adapter `adapter_name` the active (and only trainable) one."""
    model.fastpeft_active_adapter = adapter_name
    config = adapters_of(model)[adapter_name]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in model.named_modules():
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            module.active_adapter = adapter_name
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
            if module.uses_dora(adapter_name):
                module.lora_magnitude_vector[adapter_name].requires_grad_(True)
            if config.bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if config.bias == "all":  # every bias but a module to save's frozen original (PEFT trains its copy)
        for n, p in model.named_parameters():
            if n.endswith("bias") and ".original_module." not in n:
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove a LoRA adapter everywhere; layers left with no adapter go back to their base module."""
    configs = adapters_of(model)
    if adapter_name not in configs:
        raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    refuse_other_method(model, "delete_adapter")
    for name, module in list(own_modules(model)):
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            module.delete_adapter(adapter_name)
            if not module.adapter_names:
                replace_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]
            if not len(module.modules_to_save):
                replace_module(model, name, module.original_module)
    del configs[adapter_name]
    if model.fastpeft_active_adapter == adapter_name:
        model.fastpeft_active_adapter = None
        if configs:
            activate(model, next(iter(configs)))
    adapters_changed(model)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes as its base model (merged adapters are unmerged first)."""
    wrappers = [m for _, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    with contextlib.ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapter())
        for w in wrappers:
            w.disabled = True
        stack.callback(lambda: [setattr(w, "disabled", False) for w in wrappers])
        yield model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and put the plain modules back (in place).
    Modules in modules_to_save keep the active adapter's trained copy."""
    active = getattr(model, "fastpeft_active_adapter", None)
    for name, module in list(own_modules(model)):
        if isinstance(module, LoRALinear):
            module.unmerge()
            if active in module.lora_A:
                module.merge([active])
            replace_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            replace_module(model, name, module.active_module)
    return forget_adapters(model)


# ---------------------------------------------------------------- from the peft package

def from_peft(peft_model: nn.Module) -> nn.Module:
    """The model inside a ``peft.PeftModel`` (LoRA or DoRA), with every PEFT LoRA layer replaced by a
    fastpeft ``LoRALinear`` that shares its base layer and adapter tensors (no copies; DoRA's
    magnitude vectors too), and PEFT's modules_to_save wrappers by fastpeft's. Returns the inner
    model; outputs are unchanged."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper as PeftModulesToSave
    except ImportError as e:
        raise ImportError(f"from_peft needs the peft package ({e})") from None
    inner = getattr(peft_model, "base_model", peft_model)
    model = getattr(inner, "model", inner)
    configs = {name: LoraConfig.from_dict(c.to_dict()) for name, c in peft_model.peft_config.items()}
    active = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else peft_model.active_adapter[0]
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if not adaptable(base) or isinstance(base, LoRALinear):
                raise TypeError(f"{name}: PEFT LoRA on a {type(base).__name__} is not supported by fastpeft")
            layer = LoRALinear(base, adapter_name=None, fan_in_fan_out=module.fan_in_fan_out)
            layer.lora_A, layer.lora_B = module.lora_A, module.lora_B  # the same modules: tensors shared
            for adapter, dora in module.lora_magnitude_vector.items():  # PEFT's DoraLinearLayer: its `weight`, shared
                layer.lora_magnitude_vector[adapter] = DoRAMagnitude(dora.weight)
            for adapter in module.lora_A:
                dropout = module.lora_dropout[adapter]
                layer.r[adapter] = module.r[adapter]
                layer.lora_alpha[adapter] = module.lora_alpha[adapter]
                layer.scaling[adapter] = module.scaling[adapter]
                layer.lora_dropout[adapter] = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
            layer.active_adapter = active
            layer.merged_adapters = list(module.merged_adapters)
            for adapter in layer.merged_adapters:
                if layer.uses_dora(adapter):  # the norms PEFT merged with, which its unmerge divides out
                    norm = getattr(module, "_caches", {}).get(f"{adapter}-weight_norm")
                    if norm is None:
                        raise TypeError(f"{name}: PEFT's merged DoRA adapter {adapter!r} kept no weight norm to "
                                        "unmerge with; unmerge it in PEFT before converting")
                    layer.merged_dora_norms[adapter] = norm.detach().float()
            layer.disabled = bool(module.disable_adapters)
            replace_module(model, name, layer)
        elif isinstance(module, PeftModulesToSave):
            replace_module(model, name, ModulesToSaveWrapper.around(
                module.original_module, module.modules_to_save, active, disabled=bool(module.disable_adapters)))
    model.fastpeft_config = configs
    model.fastpeft_active_adapter = active
    return adapters_changed(model)
