"""Injecting LoRA into any ``nn.Module`` by rules, named adapters, and conversion from ``peft``.

Which modules get an adapter is decided by rules on module type (``nn.Linear``, transformers'
``Conv1D``) and name (PEFT's matching rules, see :class:`fastpeft.LoraConfig`), never by
per-model code. The model is changed in place and returned; its adapter configs live in
``model.fastpeft_config`` (``{adapter_name: LoraConfig}``) and the active adapter's name in
``model.fastpeft_active_adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, replace

import torch.nn as nn

from .config import LoraConfig
from .methods import as_config, forget_adapters, method_for
from .nn.linear4bit import Linear4bit
from .nn.lora import LoRALinear, is_conv1d
from .targeting import parent_of, replace_module

# Used when target_modules is None: the attention query/value projections under the names common
# transformers families give them (PEFT's per-model table reduces to these). Only names present
# in the model are used.
DEFAULT_TARGETS = ("q_proj", "v_proj", "c_attn", "query", "value", "query_key_value", "Wqkv", "qkv_proj", "q", "v")
# PEFT's default layer-container names for layers_to_transform.
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")
# The task heads PEFT trains fully for a task_type (its PeftModelFor<Task> classes add them to
# modules_to_save; names the model lacks are skipped).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """The config with its task_type's heads added to modules_to_save, as PEFT does (and saves)."""
    heads = TASK_HEADS.get(str(config.task_type).upper() if config.task_type else "", ())
    wanted = list(config.modules_to_save or [])
    missing = [h for h in heads if h not in wanted]
    return replace(config, modules_to_save=wanted + missing) if missing else config


class ModulesToSaveWrapper(nn.Module):
    """A module trained fully for an adapter (``modules_to_save``): the original stays frozen and
    each adapter trains its own copy, as in PEFT (same attribute names, same checkpoint keys)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        self._disabled = False
        for p in module.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    @property
    def active_module(self) -> nn.Module:
        if self._disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `lm_head.weight`: read it from the module that runs
            return getattr(self.active_module, name)


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    r: int
    lora_alpha: float


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith("." + p) for p in patterns)


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern or DEFAULT_LAYERS_PATTERNS
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        m = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if m:
            index = int(m.group(1))
            return index == wanted if isinstance(wanted, int) else index in wanted
    return False


def layer_features(module: nn.Module, config: LoraConfig) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a module LoRA can adapt. fan_in_fan_out
    follows the layer type, whatever the config says (PEFT warns and overrides it the same way):
    transformers' Conv1D stores its weight [in, out], nn.Linear [out, in]."""
    if isinstance(module, (LoRALinear, Linear4bit)):
        return module.in_features, module.out_features, getattr(module, "fan_in_fan_out", False)
    rows, cols = module.weight.shape
    return (rows, cols, True) if is_conv1d(module) else (cols, rows, False)


def _fan_in_fan_out_of_targets(targets, config: LoraConfig) -> LoraConfig:
    """The config with fan_in_fan_out set to what its target layers are, with PEFT's warning when
    the user's value disagrees (fan_in_fan_out=True on nn.Linear, False on Conv1D)."""
    used = {layer_features(t.module, config)[2] for t in targets}
    if len(used) == 1 and config.fan_in_fan_out not in used:
        value = used.pop()
        warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target modules are "
                      f"{'Conv1D' if value else 'torch.nn.Linear'}. Setting fan_in_fan_out to {value}.")
        config = replace(config, fan_in_fan_out=value)
    return config


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoRALinear, Linear4bit)) or is_conv1d(module)


def _own_modules(model: nn.Module):
    """(name, module) of the model, not descending into fastpeft's own wrappers."""
    skip = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def _output_layer_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {n for n, m in model.named_modules() if out is not None and (m is out or getattr(m, "base_layer", None) is out)}


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """target_modules as PEFT would read them: "all-linear" becomes the set of linear-layer names
    (the output layer excluded); None becomes the DEFAULT_TARGETS present in the model."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT reads it in any case
        output = _output_layer_names(model)
        return sorted({n.rsplit(".", 1)[-1] for n, m in _own_modules(model) if n and _adaptable(m) and n not in output})
    if targets is None:
        present = {n.rsplit(".", 1)[-1] for n, m in _own_modules(model) if n and _adaptable(m)}
        found = [t for t in DEFAULT_TARGETS if t in present]
        if not found:
            raise ValueError("LoraConfig.target_modules is None and none of the usual attention projections "
                             f"{list(DEFAULT_TARGETS)} is in the model; name the modules to adapt")
        return found
    return targets


def find_targets(model: nn.Module, config: LoraConfig) -> tuple[list[_Target], LoraConfig]:
    """The modules `config` adapts, and the config with target_modules resolved. Raises (changing
    nothing) when a match is not a linear layer or nothing matches."""
    config = replace(config, target_modules=resolve_target_modules(model, config))
    found = []
    for name, module in _own_modules(model):
        if not name or not _matches(name, config.target_modules):
            continue
        if config.exclude_modules and _matches(name, config.exclude_modules):
            continue
        if _in_modules_to_save(name, config):  # a module trained fully gets no adapter (PEFT's rule)
            continue
        if not isinstance(config.target_modules, str) and not _layer_index_ok(name, config):
            continue
        if not _adaptable(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; fastpeft adapts nn.Linear, "
                            "transformers' Conv1D and fastpeft's Linear4bit only (narrow target_modules)")
        found.append(_Target(name, module, _pattern_value(config.rank_pattern, name, config.r),
                             _pattern_value(config.alpha_pattern, name, config.lora_alpha)))
    if not found:
        names = [n for n, m in _own_modules(model) if n and _adaptable(m)][:6]
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of the model "
                         f"(linear layers are named like {names})")
    return found, config


def refuse_targets_inside_modules_to_save(targets, to_save) -> None:
    """A module both adapted and saved whole (a modules_to_save suffix such as "proj" names q_proj,
    which target_modules adapts): PEFT refuses it too (a TypeError from its wrapper)."""
    for name, _ in to_save:
        clash = next((t.name for t in targets if t.name == name or t.name.startswith(name + ".")), None)
        if clash is not None:
            raise ValueError(f"modules_to_save names {name!r}, which holds {clash!r}, a target of target_modules: a "
                             "module is either adapted or trained whole (narrow modules_to_save or target_modules)")


def _in_modules_to_save(name: str, config: LoraConfig) -> bool:
    """Whether module `name` is, or lies inside, a module to save, by PEFT's rule for keeping adapters
    out of them (each entry a regex for a whole name component)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or [])


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config.modules_to_save` names, by PEFT's rule: every module whose full name ends
    with an entry (``"norm"`` is each ``*norm``), the outermost where they nest. An entry that
    matches nothing is skipped with a warning (PEFT skips it silently; a task_type's heads the model
    lacks are skipped quietly); none matching anything is an error."""
    wanted = list(config.modules_to_save or [])
    if not wanted:
        return []
    found, taken = [], set()
    for name, module in _own_modules(model):
        if not name or any(name.startswith(outer + ".") for outer in taken):
            continue
        if any(name.endswith(w) for w in wanted):
            found.append((name, module))
            taken.add(name)
    if not found:
        raise ValueError(f"modules_to_save: no module of the model is named {wanted} (or ends so)")
    heads = TASK_HEADS.get(str(config.task_type).upper() if config.task_type else "", ())
    unmatched = [w for w in wanted if w not in heads and not any(n.endswith(w) for n in taken)]
    if unmatched:
        warnings.warn(f"modules_to_save: no module of the model ends with {unmatched}; skipped")
    return found


# ---------------------------------------------------------------- public API

def adapters_of(model: nn.Module) -> dict[str, LoraConfig]:
    return getattr(model, "fastpeft_config", {})


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to the modules `config` targets (wrapping them on first use).
    The active adapter does not change, unless the model had none. `config` may be PEFT's."""
    config = as_config(config)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a fastpeft.LoraConfig, got {type(config).__name__}")
    _refuse_method_model(model, "add_adapter")
    if adapter_name in adapters_of(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {sorted(adapters_of(model))}")
    targets, config = find_targets(model, with_task_heads(config))
    config = _fan_in_fan_out_of_targets(targets, config)
    to_save = find_modules_to_save(model, config)  # every lookup done before any change
    refuse_targets_inside_modules_to_save(targets, to_save)
    for t in targets:
        if isinstance(t.module, LoRALinear):
            t.module.add_adapter(adapter_name, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
                                 config.init_lora_weights)
        else:
            replace_module(model, t.name, LoRALinear(
                t.module, r=t.r, lora_alpha=t.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                fan_in_fan_out=layer_features(t.module, config)[2], adapter_name=adapter_name))
    for name, module in to_save:
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            replace_module(model, name, ModulesToSaveWrapper(module, adapter_name))
    if not hasattr(model, "fastpeft_config"):
        model.fastpeft_config = {}
    model.fastpeft_config[adapter_name] = config
    set_adapter(model, getattr(model, "fastpeft_active_adapter", None) or adapter_name)
    return model


def get_peft_model(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Apply a PEFT method to `model`, in place, and return it.

    LoRA (:class:`LoraConfig`): replace the layers `config` targets with fastpeft LoRA layers;
    freeze everything but the adapter (and the biases / modules_to_save it names); make it the
    active adapter. Any other config (see :mod:`fastpeft.methods`): its method applies it; such a
    model holds that one adapter. A ``peft`` config (``peft.LoraConfig``...) is read as fastpeft's.
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
        return model
    add_adapter(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active (and only trainable) adapter. A model with an adapter of
    another method than LoRA has that one adapter, always active: naming it changes nothing."""
    configs = adapters_of(model)
    if adapter_name not in configs:
        raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    if _method_of(model) is not None:
        return
    model.fastpeft_active_adapter = adapter_name
    config = configs[adapter_name]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in model.named_modules():
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            module.active_adapter = adapter_name
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
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
    _refuse_method_model(model, "delete_adapter")
    for name, module in list(_own_modules(model)):
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
            set_adapter(model, next(iter(configs)))


def _method_of(model: nn.Module):
    """The Method of the model's adapter when it is not LoRA, else None."""
    configs = [c for c in adapters_of(model).values() if not isinstance(c, LoraConfig)]
    return method_for(configs[0]) if configs else None


def _refuse_method_model(model: nn.Module, what: str) -> None:
    """LoRA's multi-adapter calls on a model whose one adapter is of another method: a clear
    error before anything changes."""
    method = _method_of(model)
    if method is not None:
        raise TypeError(f"{what}: the model holds a {method.config_cls.__name__} adapter, which must be its only "
                        "one and cannot be removed in place (merge_and_unload, or start from the base model)")


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes as its base model (merged adapters are unmerged first).
    A method that cannot switch off (see :meth:`fastpeft.methods.Method.disabled`) raises instead."""
    method = _method_of(model)
    if method is not None:
        with method.disabled(model):
            yield model
        return
    wrappers = [m for _, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    with contextlib.ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapter())
        for w in wrappers:
            w._disabled = True
        stack.callback(lambda: [setattr(w, "_disabled", False) for w in wrappers])
        yield model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and put the plain modules back (in place).
    Modules in modules_to_save keep the active adapter's trained copy. Other methods: their
    :meth:`~fastpeft.methods.Method.merge_and_unload` (DiffPruning folds its sparse delta; methods
    that train the model's own weights just detach; prompt, prefix, IA3 and adapter blocks refuse)."""
    method = _method_of(model)
    if method is not None:
        return method.merge_and_unload(model)
    active = getattr(model, "fastpeft_active_adapter", None)
    for name, module in list(_own_modules(model)):
        if isinstance(module, LoRALinear):
            module.unmerge()
            if active in module.lora_A:
                module.merge([active])
            replace_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            replace_module(model, name, module.active_module)
    return forget_adapters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared tensor counts once, and a 4-bit weight counts its
    weights (as PEFT counts bitsandbytes' packed ones): a QLoRA model is mostly frozen 4-bit weights."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and id(m.q) not in seen:
            seen.add(id(m.q))
            total += m.q.numel
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")


# ---------------------------------------------------------------- from the peft package

def from_peft(peft_model: nn.Module) -> nn.Module:
    """The model inside a ``peft.PeftModel`` (LoRA), with every PEFT LoRA layer replaced by a
    fastpeft ``LoRALinear`` that shares its base layer and adapter tensors (no copies), and PEFT's
    modules_to_save wrappers by fastpeft's. Returns the inner model; outputs are unchanged."""
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
            if not _adaptable(base) or isinstance(base, LoRALinear):
                raise TypeError(f"{name}: PEFT LoRA on a {type(base).__name__} is not supported by fastpeft")
            layer = LoRALinear(base, adapter_name=None, fan_in_fan_out=module.fan_in_fan_out)
            layer.lora_A, layer.lora_B = module.lora_A, module.lora_B  # the same modules: tensors shared
            for adapter in module.lora_A:
                dropout = module.lora_dropout[adapter]
                layer.r[adapter] = module.r[adapter]
                layer.lora_alpha[adapter] = module.lora_alpha[adapter]
                layer.scaling[adapter] = module.scaling[adapter]
                layer.lora_dropout[adapter] = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
            layer.active_adapter = active
            layer.merged_adapters = list(module.merged_adapters)
            layer._disabled = bool(module.disable_adapters)
            replace_module(model, name, layer)
        elif isinstance(module, PeftModulesToSave):
            wrapper = ModulesToSaveWrapper.__new__(ModulesToSaveWrapper)
            nn.Module.__init__(wrapper)
            wrapper.original_module = module.original_module
            wrapper.modules_to_save = module.modules_to_save
            wrapper.active_adapter = active
            wrapper._disabled = bool(module.disable_adapters)
            replace_module(model, name, wrapper)
    model.fastpeft_config = configs
    model.fastpeft_active_adapter = active
    return model
