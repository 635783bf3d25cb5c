"""Which modules of a model a method touches, by rule, and putting modules into a model.

Every method finds its modules here, by module type and name (PEFT's matching rules), never by
per-model code: walking a model without descending into fastpeft's own wrappers, name matching,
layer indices, output layers, task heads, and the LoRA-style target search that (IA)3, DiffPruning
and the adapter pool share.

A module put into a model takes the training mode of the module it replaces, or of the module it
is attached to: a model in eval mode stays in eval mode, so an adapter's dropout or sampled gates
are off at inference however the adapter arrived (get_peft_model, load_adapter, an AdapterPool, a
quantised base). PEFT leaves its new layers in training mode; the README says so.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from typing import Iterator

import torch.nn as nn

from .config import LoraConfig
from .nn.linear4bit import Linear4bit
from .nn.lora import LoRALinear, is_conv1d
from .nn.modules_to_save import ModulesToSaveWrapper

# Used when target_modules is None: the attention query/value projections under the names common
# transformers families give them (PEFT's per-model table reduces to these). Only names present
# in the model are used.
DEFAULT_TARGETS = ("q_proj", "v_proj", "c_attn", "query", "value", "query_key_value", "Wqkv", "qkv_proj", "q", "v")
# PEFT's default layer-container names for layers_to_transform.
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")
# The task heads PEFT trains fully for a task_type (its PeftModelFor<Task> classes add them to
# modules_to_save; names the model lacks are skipped).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


# ---------------------------------------------------------------- putting modules into a model

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


# ---------------------------------------------------------------- walking and names

def own_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model, not descending into fastpeft's own wrappers (a LoRALinear's
    base layer or a ModulesToSaveWrapper's copies are not the model's modules to target)."""
    skip = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def name_matches(name: str, patterns) -> bool:
    """PEFT's target_modules rule: a string is a regex the whole name must match; a list holds
    exact names or suffixes after a dot (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith("." + p) for p in patterns)


def name_ends_with(name: str, patterns) -> bool:
    """PEFT's rule for modules_to_save and feedforward_modules: a string is a regex the whole name
    must match; a list holds plain suffixes, no dot needed (``"norm"`` matches ``"input_layernorm"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name.endswith(p) for p in patterns)


def pattern_value(patterns: dict, name: str, default):
    """The value of the first key of `patterns` (a regex) matching the end of `name` (PEFT's
    rank_pattern / alpha_pattern rule, ``(.*\\.)?(key)$``), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The index of the layer container `name` lies in (``"model.layers.3.mlp"`` -> 3), by PEFT's
    rule: the first ``<pattern>.<digits>`` component, the pattern one of `layers_pattern` (default
    :data:`DEFAULT_LAYERS_PATTERNS`); None when there is none. A name may start with the container
    (``"layers.0.q_proj"`` -> 0) or be the layer itself (``"h.2"`` -> 2)."""
    patterns = layers_pattern or DEFAULT_LAYERS_PATTERNS
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def find_named_modules(model: nn.Module, names, what: str) -> list[str]:
    """Full names of the modules `names` designate (exact names or name suffixes after a dot);
    a name matching nothing is an error naming the model's top-level modules."""
    found = []
    for wanted in names or []:
        matches = [n for n, _ in own_modules(model) if n and name_matches(n, [wanted])]
        if not matches:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"{what}: no module named {wanted!r} in {type(model).__name__} (its top-level modules: "
                             f"{children})")
        found += [m for m in matches if m not in found]
    return found


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer (``get_output_embeddings()``), wrapped or not."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out or getattr(m, "base_layer", None) is out}


# ---------------------------------------------------------------- LoRA-style targets

@dataclass(frozen=True)
class Target:
    """A module a LoRA-style config adapts, with its rank and alpha after rank/alpha patterns."""
    name: str
    module: nn.Module
    r: int
    lora_alpha: float


def adaptable(module: nn.Module) -> bool:
    """Whether LoRA-style methods can adapt `module` (a linear layer of a kind fastpeft knows)."""
    return isinstance(module, (nn.Linear, LoRALinear, Linear4bit)) or is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a module LoRA can adapt. fan_in_fan_out
    follows the layer type, whatever a config says (PEFT warns and overrides it the same way):
    transformers' Conv1D stores its weight [in, out], nn.Linear [out, in]."""
    if isinstance(module, (LoRALinear, Linear4bit)):
        return module.in_features, module.out_features, getattr(module, "fan_in_fan_out", False)
    rows, cols = module.weight.shape
    return (rows, cols, True) if is_conv1d(module) else (cols, rows, False)


def fan_in_fan_out_of_targets(targets: list[Target], config: LoraConfig) -> LoraConfig:
    """The config with fan_in_fan_out set to what its target layers are, with PEFT's warning when
    the user's value disagrees (fan_in_fan_out=True on nn.Linear, False on Conv1D)."""
    used = {layer_features(t.module)[2] for t in targets}
    if len(used) == 1 and config.fan_in_fan_out not in used:
        value = used.pop()
        warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target modules are "
                      f"{'Conv1D' if value else 'torch.nn.Linear'}. Setting fan_in_fan_out to {value}.")
        config = replace(config, fan_in_fan_out=value)
    return config


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """target_modules as PEFT would read them: "all-linear" becomes the set of linear-layer names
    (the output layer excluded); None becomes the DEFAULT_TARGETS present in the model."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT reads it in any case
        output = output_layer_names(model)
        return sorted({n.rsplit(".", 1)[-1] for n, m in own_modules(model) if n and adaptable(m) and n not in output})
    if targets is None:
        present = {n.rsplit(".", 1)[-1] for n, m in own_modules(model) if n and adaptable(m)}
        found = [t for t in DEFAULT_TARGETS if t in present]
        if not found:
            raise ValueError("LoraConfig.target_modules is None and none of the usual attention projections "
                             f"{list(DEFAULT_TARGETS)} is in the model; name the modules to adapt")
        return found
    return targets


def in_wanted_layers(name: str, config: LoraConfig) -> bool:
    """Whether module `name` lies in a layer config.layers_to_transform names (all do when unset)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def in_modules_to_save(name: str, config: LoraConfig) -> bool:
    """Whether module `name` is, or lies inside, a module to save, by PEFT's rule for keeping adapters
    out of them (each entry a regex for a whole name component)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or [])


def find_targets(model: nn.Module, config: LoraConfig) -> tuple[list[Target], LoraConfig]:
    """The modules `config` adapts, and the config with target_modules resolved. Raises (changing
    nothing) when a match is not a linear layer or nothing matches."""
    config = replace(config, target_modules=resolve_target_modules(model, config))
    found = []
    for name, module in own_modules(model):
        if not name or not name_matches(name, config.target_modules):
            continue
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if in_modules_to_save(name, config):  # a module trained fully gets no adapter (PEFT's rule)
            continue
        if not isinstance(config.target_modules, str) and not in_wanted_layers(name, config):
            continue
        if not adaptable(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; fastpeft adapts nn.Linear, "
                            "transformers' Conv1D and fastpeft's Linear4bit only (narrow target_modules)")
        found.append(Target(name, module, pattern_value(config.rank_pattern, name, config.r),
                            pattern_value(config.alpha_pattern, name, config.lora_alpha)))
    if not found:
        names = [n for n, m in own_modules(model) if n and adaptable(m)][:6]
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of the model "
                         f"(linear layers are named like {names})")
    return found, config


# ---------------------------------------------------------------- modules trained whole

def task_heads(config) -> tuple[str, ...]:
    """The task heads PEFT trains fully for the config's task_type (none for other task types)."""
    task_type = getattr(config, "task_type", None)
    return TASK_HEADS.get(str(task_type).upper() if task_type else "", ())


# PEFT's task types of the transformers head classes, by the class name's ending (rule-driven: any
# model family whose classes follow transformers' naming is covered).
TASK_TYPES_BY_HEAD = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                      ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type_of(model: nn.Module) -> str | None:
    """The PEFT task_type a model's head implies (what PEFT's checkpoints record and its loaders
    need to put a prompt in front): a classifier's class name, else for a model that generates
    SEQ_2_SEQ_LM (encoder-decoder) or CAUSAL_LM; None for a bare encoder."""
    name = type(model).__name__
    for ending, task_type in TASK_TYPES_BY_HEAD:
        if name.endswith(ending):
            return task_type
    if not callable(getattr(model, "generate", None)):
        return None
    return "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """The config with its task_type's heads added to modules_to_save, as PEFT does (and saves)."""
    wanted = list(config.modules_to_save or [])
    missing = [h for h in task_heads(config) if h not in wanted]
    return replace(config, modules_to_save=wanted + missing) if missing else config


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config.modules_to_save` names, by PEFT's rule: every module whose full name ends
    with an entry (``"norm"`` is each ``*norm``), the outermost where they nest. An entry that
    matches nothing is skipped with a warning (PEFT skips it silently; a task_type's heads the model
    lacks are skipped quietly); none matching anything is an error."""
    wanted = list(config.modules_to_save or [])
    if not wanted:
        return []
    found, taken = [], set()
    for name, module in own_modules(model):
        if not name or any(name.startswith(outer + ".") for outer in taken):
            continue
        if name_ends_with(name, wanted):
            found.append((name, module))
            taken.add(name)
    if not found:
        raise ValueError(f"modules_to_save: no module of the model is named {wanted} (or ends so)")
    heads = task_heads(config)
    unmatched = [w for w in wanted if w not in heads and not any(n.endswith(w) for n in taken)]
    if unmatched:
        warnings.warn(f"modules_to_save: no module of the model ends with {unmatched}; skipped")
    return found


def refuse_targets_inside_modules_to_save(targets: list[Target], to_save) -> None:
    """A module both adapted and saved whole (a modules_to_save suffix such as "proj" names q_proj,
    which target_modules adapts): PEFT refuses it too (a TypeError from its wrapper)."""
    for name, _ in to_save:
        clash = next((t.name for t in targets if t.name == name or t.name.startswith(name + ".")), None)
        if clash is not None:
            raise ValueError(f"modules_to_save names {name!r}, which holds {clash!r}, a target of target_modules: a "
                             "module is either adapted or trained whole (narrow modules_to_save or target_modules)")
