"""Adapter configs, with PEFT's field names, meanings and ``adapter_config.json`` format."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's checkpoint keys: base_model.model.<module>.<tensor>
BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT LoraConfig fields of features fastpeft does not implement: each is accepted at its neutral
# value (None, False, empty) and refused, naming it, at any other, so a recipe or checkpoint using
# one never loads into something that computes otherwise.
UNSUPPORTED_LORA_FEATURES = ("lora_bias", "use_qalora", "layer_replication", "target_parameters",
                             "trainable_token_indices", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                             "megatron_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                             "velora_config", "monteclora_config", "kasa_config", "ensure_weight_tying")
# PEFT LoraConfig fields that never change what an adapter computes (bookkeeping, runtime options).
BOOKKEEPING_FIELDS = ("auto_mapping", "peft_version", "revision", "megatron_core", "qalora_group_size",
                      "runtime_config")


@dataclass
class LoraConfig:
    """LoRA settings; every field means what it means in ``peft.LoraConfig``.

    target_modules: a string is a regex that must match a module's full name
        (``re.fullmatch``); a list matches exact names or name suffixes after a dot
        (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``); ``"all-linear"`` is every
        ``nn.Linear``/``Conv1D`` but the output layer. None: the model's usual attention
        projections are looked up by name (see ``fastpeft.targeting.DEFAULT_TARGETS``).
    exclude_modules: the same matching rules; matches are never adapted.
    rank_pattern / alpha_pattern: ``{regex: r}`` / ``{regex: alpha}`` overrides, a key matching
        the end of a module name (PEFT's ``(.*\\.)?(key)$``).
    layers_to_transform / layers_pattern: adapt only these layer indices (list targets only).
    bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
    modules_to_save: modules (name suffixes) trained fully and saved with the adapter.
    task_type: PEFT's; "SEQ_CLS", "TOKEN_CLS" and "QUESTION_ANS" also train their task heads.
    use_dora: DoRA (weight-decomposed LoRA): each adapted layer also learns a magnitude per output
        row, ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row`` (saved as PEFT saves it).
    Every other ``peft.LoraConfig`` field is accepted too: bookkeeping ones (``revision``,
    ``auto_mapping``...) as given; those of features fastpeft does not implement (``lora_bias``,
    ``loftq_config``...; :data:`UNSUPPORTED_LORA_FEATURES`) only at their neutral value.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_lora_weights: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str | None = field(default="LORA", kw_only=True)  # as in PEFT, a field it fills in
    # bookkeeping (PEFT's defaults)
    auto_mapping: dict | None = None
    peft_version: str | None = None
    revision: str | None = None
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16
    runtime_config: Any = None  # runtime-only in PEFT (ephemeral GPU offload): never saved
    use_dora: bool = False
    # features fastpeft does not implement, at their neutral values (PEFT's defaults)
    lora_bias: bool = False
    use_qalora: bool = False
    layer_replication: list | None = None
    target_parameters: list | None = None
    trainable_token_indices: list | dict | None = None
    alora_invocation_tokens: list | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    megatron_config: dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    velora_config: Any = None
    monteclora_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self):
        if str(getattr(self.peft_type, "value", self.peft_type)) not in ("None", "LORA"):
            raise ValueError(f"LoraConfig: peft_type must be 'LORA', got {self.peft_type!r}")
        self.peft_type = "LORA"
        if self.task_type is not None:  # peft.TaskType.SEQ_CLS -> "SEQ_CLS" (str() would give its enum name)
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        for name in UNSUPPORTED_LORA_FEATURES:
            value = getattr(self, name)
            if value not in (None, False, [], {}):
                raise ValueError(f"LoraConfig: {name}={value!r} is a PEFT feature fastpeft does not support")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        for name in ("lora_alpha", "lora_dropout"):  # a bad value found here, before any model changes
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LoraConfig: {name} must be a finite number, got {value!r}")
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if name == "modules_to_save" and isinstance(value, str):
                raise ValueError(f"LoraConfig: modules_to_save must be a list of module names, got {value!r}")
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"LoraConfig: {name} must be a string or a list of strings, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig: bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig: init_lora_weights {self.init_lora_weights!r} is not supported "
                             "(True, False or 'gaussian')")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"LoraConfig: {name} must be a dict of regex -> value, got {type(pattern).__name__}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be an integer >= 1, got {r!r}")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ValueError(f"LoraConfig: alpha_pattern[{key!r}] must be a finite number, got {alpha!r}")
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or isinstance(
                layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"LoraConfig: layers_to_transform must be an integer or a list of integers, "
                             f"got {layers!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            self.target_modules = "all-linear"  # PEFT reads the shorthand in any case
        # PEFT's rules: a regex target_modules names layers itself; layers_pattern needs indices
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("LoraConfig: `layers_to_transform` cannot be used when `target_modules` is a str")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("LoraConfig: `layers_pattern` cannot be used when `target_modules` is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: when `layers_pattern` is specified, `layers_to_transform` must also be")
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's keys, readable by ``peft.PeftConfig``."""
        d = dataclasses.asdict(self)
        del d["runtime_config"]  # PEFT does not save it either
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """From PEFT's or our ``adapter_config.json``; fields fastpeft does not implement must be at
        their neutral values (LoRA bias, other init schemes... are refused, never ignored)."""
        peft_type = d.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"adapter config: peft_type {peft_type!r} is not supported here (expected 'LORA')")
        for key in UNSUPPORTED_LORA_FEATURES:
            if d.get(key) not in (None, False, [], {}):
                raise ValueError(f"adapter config: {key}={d[key]!r} is a PEFT feature fastpeft does not support")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None or k in ("target_modules",)}
        for k in ("rank_pattern", "alpha_pattern"):
            kwargs[k] = kwargs.get(k) or {}
        if kwargs.get("init_lora_weights") not in (True, False, "gaussian"):
            kwargs["init_lora_weights"] = True  # how PEFT initialised does not matter: weights are loaded
        return cls(**kwargs)

    def save(self, directory: str) -> str:
        return write_config(self.to_dict(), directory)

    @classmethod
    def load(cls, directory: str) -> "LoraConfig":
        return cls.from_dict(read_config(directory))

    def save_pretrained(self, directory: str) -> str:
        """Write ``adapter_config.json`` into `directory` (made if needed), as PEFT's configs do."""
        os.makedirs(directory, exist_ok=True)
        return self.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str) -> "LoraConfig":
        return cls.load(directory)


def write_config(d: dict[str, Any], directory: str) -> str:
    """Write ``adapter_config.json`` (sorted keys, as PEFT's are stable to diff); its path."""
    path = os.path.join(directory, CONFIG_NAME)
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def read_config(directory: str) -> dict[str, Any]:
    """The JSON object of ``<directory>/adapter_config.json``, or a clear error."""
    if os.path.isfile(directory):
        raise NotADirectoryError(f"{directory} is a file; pass the adapter's directory (the folder holding "
                                 f"{CONFIG_NAME} and its weights)")
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return d
