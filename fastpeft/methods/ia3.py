"""(IA)³: learned vectors that rescale the attention keys and values and the feed-forward
intermediate activation (Liu et al., 2022), in PEFT's form.

A targeted layer's output is scaled elementwise (``y * l``, l ``[out, 1]``: the key and value
projections), or, for a feed-forward layer, its input (``layer(x * l)``, l ``[1, in]``: the input of
the down projection is the intermediate activation). A fused query/key/value projection (GPT-2's
``c_attn``) is scaled whole, as PEFT does. Vectors start at ones: the model computes as its base.
Checkpoints are PEFT's: ``base_model.model.<module>.ia3_l``, and modules trained whole
(``modules_to_save``, a task_type's head) under ``base_model.model.<module>.<param>``;
:class:`fastpeft.AdapterPool` loads checkpoints of vectors alone to serve many (IA)³ and LoRA
adapters in one batch.
"""

from __future__ import annotations

import contextlib

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..config import PREFIX, LoraConfig
from ..nn.lora import is_conv1d
from ..targeting import find_targets, layer_features, name_ends_with, name_matches, own_modules, replace_module
from .base import Method, MethodConfig, register
from .heads import find_heads, heads_of, heads_off, heads_shapes, heads_state_dict, wrap_heads

# Used when target_modules is None: the key and value projections (or a fused qkv projection) and
# the feed-forward down projection under the names transformers families give them; only names
# present in the model are used. For Llama (k_proj, v_proj, down_proj) and GPT-2 (c_attn,
# mlp.c_proj) this is PEFT's per-model table.
DEFAULT_TARGETS = ("k_proj", "v_proj", "key", "value", "k", "v", "c_attn", "query_key_value", "Wqkv", "qkv_proj")
# Used when feedforward_modules is None: the down projections among the targets.
DEFAULT_FEEDFORWARD = ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo", "output.dense")


def _as_list(value):
    return sorted(value) if isinstance(value, (set, tuple, list)) else value


@dataclass
class IA3Config(MethodConfig):
    """(IA)³ settings; fields mean what they mean in ``peft.IA3Config``.

    target_modules: the layers to rescale: a regex (``re.fullmatch`` on the full name), a list of
        names or name suffixes, or "all-linear"; None: the key/value and down projections found by
        name (:data:`DEFAULT_TARGETS`, :data:`DEFAULT_FEEDFORWARD`). Resolved in place by
        ``get_peft_model`` (as PEFT does), so the saved config names what was adapted.
    exclude_modules: never adapted (same rules).
    feedforward_modules: which targets scale their input rather than their output: a regex, or a
        list whose entries match name endings (PEFT's rule); must be a subset of target_modules
        when both are lists. None: the targets matching :data:`DEFAULT_FEEDFORWARD`.
    init_ia3_weights: True starts the vectors at ones (False: N(0, 1), for tests).
    modules_to_save: modules trained whole (a trainable copy each, saved with the adapter under
        ``base_model.model.<module>.<param>``); task_type SEQ_CLS / TOKEN_CLS / QUESTION_ANS adds
        the task's head, as PEFT does (see :mod:`fastpeft.methods.heads`). No target lies in them.
    fan_in_fan_out: recorded as PEFT records it (True when the targets are transformers' Conv1D).
    """

    peft_type: str = field(default="IA3", kw_only=True)  # a field, as in PEFT: passing it is allowed
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        self.check_peft_type("IA3")
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.feedforward_modules = _as_list(self.feedforward_modules)
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) or all(isinstance(v, str) for v in value)):
                raise ValueError(f"IA3Config: {name} must be a regex string or a list of names, got {value!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("IA3Config: target_modules is an empty list; name the layers to adapt (or None)")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"IA3Config: feedforward_modules {extra} are not in target_modules "
                                 f"{self.target_modules} (they must be a subset)")


class IA3Linear(nn.Module):
    """A linear layer (``nn.Linear``, transformers' ``Conv1D``, fastpeft's ``Linear4bit``) whose
    output (``ia3_l`` ``[out, 1]``) or, if `is_feedforward`, input (``ia3_l`` ``[1, in]``) is
    rescaled elementwise. Inputs ``[..., in]`` of any float dtype; the vector is cast to it."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, in_features: int, out_features: int,
                 init_ones: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = in_features, out_features
        q = getattr(base_layer, "q", None)  # fastpeft's Linear4bit: the vector in the weight's original dtype
        weight = getattr(base_layer, "weight", None)
        if q is not None:
            factory = dict(device=q.packed.device, dtype=q.dtype)
        elif isinstance(weight, torch.Tensor):
            factory = dict(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        else:
            factory = {}
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory) if init_ones else torch.randn(shape, **factory))
        self.disabled = False  # True inside fastpeft.disable_adapters: the base layer alone

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return y * scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, is_feedforward={self.is_feedforward}"


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    is_feedforward: bool
    in_features: int
    out_features: int


def _resolve(model: nn.Module, config: IA3Config) -> tuple[list[_Target], dict[str, Any]]:
    """The layers `config` adapts and the config fields as resolved for this model; raises (changing
    nothing) when a target is not a linear layer or nothing matches."""
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("the model already has (IA)3 layers")
    targets = config.target_modules
    if targets is None:
        names = [n for n, _ in own_modules(model) if n]
        targets = [t for t in DEFAULT_TARGETS + DEFAULT_FEEDFORWARD if any(name_matches(n, [t]) for n in names)]
        if not any(t in DEFAULT_TARGETS for t in targets):
            raise ValueError("IA3Config.target_modules is None and none of the usual key/value projections "
                             f"{list(DEFAULT_TARGETS)} is in the model; name the modules to adapt")
    found, lora_view = find_targets(model, LoraConfig(r=1, target_modules=targets, exclude_modules=config.exclude_modules,
                                                      modules_to_save=heads_of(config).modules_to_save))
    if isinstance(targets, list):  # stricter than PEFT: a misspelt name is an error, not a silent no-op
        names = [n for n, _ in own_modules(model) if n]
        for wanted in targets:
            if not any(name_matches(n, [wanted]) for n in names):
                raise ValueError(f"IA3Config: target_modules entry {wanted!r} matches no module of the model")
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = sorted({f for f in DEFAULT_FEEDFORWARD if any(name_ends_with(t.name, [f]) for t in found)})
    result = []
    for t in found:
        in_features, out_features, _ = layer_features(t.module)
        result.append(_Target(t.name, t.module, name_ends_with(t.name, feedforward), in_features, out_features))
    resolved = dict(target_modules=lora_view.target_modules, feedforward_modules=feedforward,
                    fan_in_fan_out=config.fan_in_fan_out or any(is_conv1d(t.module) for t in found))
    return result, resolved


@register
class IA3(Method):
    config_cls = IA3Config

    @contextlib.contextmanager
    def disabled(self, model: nn.Module):
        layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
        for layer in layers:
            layer.disabled = True
        try:
            with heads_off(model):
                yield model
        finally:
            for layer in layers:
                layer.disabled = False

    def apply(self, model: nn.Module, config: IA3Config, adapter_name: str) -> nn.Module:
        targets, resolved = _resolve(model, config)
        heads = find_heads(model, config, targets)
        for p in model.parameters():
            p.requires_grad_(False)
        for t in targets:
            replace_module(model, t.name, IA3Linear(t.module, t.is_feedforward, t.in_features, t.out_features,
                                                    config.init_ia3_weights))
        wrap_heads(model, config, heads, adapter_name)
        for name, value in resolved.items():
            setattr(config, name, value)
        return model

    def state_dict(self, model, adapter_name):
        vectors = {f"{PREFIX}{name}.ia3_l": m.ia3_l for name, m in model.named_modules() if isinstance(m, IA3Linear)}
        return {**vectors, **heads_state_dict(model, adapter_name, PREFIX)}

    def expected_shapes(self, model, config):
        targets, _ = _resolve(model, config)
        vectors = {f"{PREFIX}{t.name}.ia3_l": (1, t.in_features) if t.is_feedforward else (t.out_features, 1)
                   for t in targets}
        return {**vectors, **heads_shapes(model, config, PREFIX, targets)}
