"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, AdapterBias) and AdapterDrop.

An adapter block maps a module's output h (sequential) or input x (parallel) through
``up(act(down(·)))`` and adds it to h: ``h + scaling·up(act(down(h or x)))``. Where blocks go is
decided by rules, never per model: two kinds of insertion point, found by module-name patterns,

* ``attn``: the attention block's output. Defaults match transformers' Llama/Qwen (``self_attn``),
  GPT-2 (``attn``) and BERT (``attention.output.dense``: after the dense projection, before the
  residual LayerNorm, where Houlsby put it);
* ``ffn``: the feed-forward block's output. Defaults: ``mlp`` (Llama, GPT-2) and BERT's
  ``layer.N.output.dense``.

Layouts: ``houlsby`` (attn and ffn), ``pfeiffer`` (ffn only), ``parallel`` (He et al. 2022: beside
the ffn module, fed its input, with a ``scaling``); ``positions`` overrides which points a layout
uses. ``adapter_bias=True`` makes each block AdapterBias (Fu et al. 2022): ``h + α(x)·v``, a per-token
scalar ``α = Linear(in, 1)`` times a learned vector v.

Blocks are children of the module they adapt (``<module>.fastpeft_adapter``) and run from a forward
hook, so the base model's structure and its own parameter names stay as they were; the base is
frozen. AdapterDrop (Rücklé et al. 2021) skips the blocks of the lowest ``adapter_drop`` layers, at
inference and in training; with ``adapter_drop_random`` each training forward draws how many
(0..adapter_drop) to skip. :func:`set_adapter_drop` changes it on a live model.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ..config import PREFIX
from ..nn.dtypes import autocast_enabled
from ..nn.linear4bit import Linear4bit
from ..ops.adapter_block import adapter_block
from ..targeting import attach_module, layer_index, name_matches, own_modules
from .base import Method, MethodConfig, register
from .heads import find_heads, heads_shapes, heads_state_dict, wrap_heads

ADAPTER_ATTR = "fastpeft_adapter"     # the block's attribute on the module it adapts
DROP_ATTR = "fastpeft_adapter_drop"   # the AdapterDrop state on the root model

# Regexes (full match on the module's dotted name) for the two insertion points.
DEFAULT_ATTN_MODULES = r".*\.(self_attn|attn|attention\.output\.dense)"
DEFAULT_FFN_MODULES = r".*\.(mlp|layer\.\d+\.output\.dense)"
LAYOUTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}
# non_linearity -> (the module it is, the activation of fastpeft.ops.adapter_block computing it);
# nn.GELU() is the exact, erf form, the op's "gelu".
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "relu": (nn.ReLU, "relu"), "gelu": (nn.GELU, "gelu"), "silu": (nn.SiLU, "silu"), "swish": (nn.SiLU, "silu"),
    "tanh": (nn.Tanh, "tanh"), "identity": (nn.Identity, "identity"),
}
INITS = ("identity", "near_identity")


@dataclass
class AdapterLayoutConfig:
    """Fields every bottleneck-style adapter config shares (placement, size, init, AdapterDrop).

    Attributes:
        layout: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"`` (see the module docstring).
        reduction_factor: bottleneck width = adapted features // reduction_factor (at least 1).
        bottleneck_size: the width itself, overriding reduction_factor.
        non_linearity: ``relu``, ``gelu``, ``silu``/``swish``, ``tanh`` or ``identity``.
        init_weights: ``"identity"`` (up-projection zero: the model starts exactly as the base) or
            ``"near_identity"`` (Houlsby: every weight ~ N(0, init_std²), biases zero).
        scaling: factor on what each block adds (He et al.'s s for the parallel adapter).
        positions: the insertion points used, a subset of ``["attn", "ffn"]``; None: the layout's.
        attn_modules, ffn_modules: which modules are those points; a regex (full match on the
            dotted name) or a list of names/name suffixes; None: the defaults above.
        layers_pattern: name(s) of the layer container, for layer indices (AdapterDrop); None:
            ``layers``, ``h``, ``block``, ``blocks``, ``layer``.
        adapter_drop: skip the blocks of layers ``0 .. adapter_drop-1`` (training and inference).
        adapter_drop_random: in training, each forward skips a random 0..adapter_drop lowest layers.
        modules_to_save: modules trained whole (a trainable copy each, saved with the adapter under
            ``base_model.model.<module>.<param>``, LoRA's form); task_type SEQ_CLS / TOKEN_CLS /
            QUESTION_ANS adds the task's head, as PEFT does for its methods. No block lies in them.
    """

    layout: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    init_weights: str = "identity"
    init_std: float = 1e-3
    scaling: float = 1.0
    positions: list[str] | None = None
    attn_modules: str | list[str] | None = None
    ffn_modules: str | list[str] | None = None
    layers_pattern: str | list[str] | None = None
    adapter_drop: int = 0
    adapter_drop_random: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    layouts: ClassVar[tuple[str, ...]] = tuple(LAYOUTS)

    def __post_init__(self):
        self.validate()  # a bad config fails where it is written, as every other config does

    def validate(self) -> None:
        name = type(self).__name__
        if self.layout not in self.layouts:
            raise ValueError(f"{name}: layout must be one of {list(self.layouts)}, got {self.layout!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"{name}: non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.init_weights not in INITS:
            raise ValueError(f"{name}: init_weights must be one of {list(INITS)}, got {self.init_weights!r}")
        if not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 0):
            raise ValueError(f"{name}: reduction_factor must be > 0, got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and not (isinstance(self.bottleneck_size, int) and self.bottleneck_size > 0):
            raise ValueError(f"{name}: bottleneck_size must be a positive int, got {self.bottleneck_size!r}")
        if self.positions is not None and (not self.positions or set(self.positions) - {"attn", "ffn"}):
            raise ValueError(f"{name}: positions must be a non-empty subset of ['attn', 'ffn'], got {self.positions!r}")
        if not (isinstance(self.adapter_drop, int) and self.adapter_drop >= 0):
            raise ValueError(f"{name}: adapter_drop must be an int >= 0, got {self.adapter_drop!r}")

    @property
    def parallel(self) -> bool:
        return self.layout == "parallel"

    def point_kinds(self) -> tuple[str, ...]:
        return tuple(self.positions) if self.positions is not None else LAYOUTS[self.layout]

    def width(self, features: int) -> int:
        return self.bottleneck_size or max(1, int(features // self.reduction_factor))


# ---------------------------------------------------------------- blocks

class AdapterBlock(nn.Module):
    """``residual + scaling·up(act(down(x)))``; x ``[..., in_features]``, residual ``[..., out_features]``.

    ``down`` and ``up`` are ``nn.Linear`` here, and the whole block runs as one fused op
    (:func:`fastpeft.ops.adapter_block`); in Compacter they are :class:`fastpeft.nn.PHMLinear` and
    the block runs as the module sequence."""

    def __init__(self, down: nn.Module, up: nn.Module, non_linearity: str, scaling: float):
        super().__init__()
        self.down, self.act, self.up = down, ACTIVATIONS[non_linearity][0](), up
        self.scaling = scaling
        self.non_linearity = non_linearity

    def _fusable(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Plain linear projections in one dtype, no autocast: the fused op takes the whole block."""
        return (type(self.down) is nn.Linear and type(self.up) is nn.Linear
                and x.dtype == residual.dtype == self.down.weight.dtype == self.up.weight.dtype
                and not autocast_enabled(x.device.type)
                and x.stride(-1) == 1 and residual.stride(-1) == 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self._fusable(x, residual):
            return adapter_block(x, residual, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                 self.scaling, ACTIVATIONS[self.non_linearity][1])
        delta = self.up(self.act(self.down(x)))
        return residual + (delta if self.scaling == 1.0 else self.scaling * delta)


class AdapterBiasBlock(nn.Module):
    """AdapterBias: ``residual + scaling·α(x)·v``, α ``= Linear(in_features, 1)`` a per-token scalar,
    v ``[out_features]`` one learned shift (zero at identity init)."""

    def __init__(self, in_features: int, out_features: int, scaling: float, device=None, dtype=None):
        super().__init__()
        self.alpha = nn.Linear(in_features, 1, device=device, dtype=dtype)
        self.vector = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.scaling = scaling

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.scaling * self.alpha(x) * self.vector


# ---------------------------------------------------------------- insertion points

@dataclass(frozen=True)
class InsertionPoint:
    name: str                  # dotted module name
    module: nn.Module
    kind: str                  # "attn" or "ffn"
    layer: int | None          # index in the layer container (AdapterDrop), None if not in one
    in_features: int           # what the block reads: the module's output (sequential) or input (parallel)
    out_features: int          # the module's output features


def _linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module (nn.Linear, fastpeft's Linear4bit, transformers' Conv1D), else None."""
    if isinstance(module, (nn.Linear, Linear4bit)):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def module_features(module: nn.Module) -> tuple[int, int]:
    """(input, output) features of a block, by rule: a linear layer's own; for a container (an
    attention or MLP block) the input of its first linear layer and the output of its last one."""
    own = _linear_features(module)
    if own is not None:
        return own
    linears = [f for f in (_linear_features(m) for m in module.modules()) if f is not None]
    if not linears:
        raise TypeError(f"cannot tell the features of a {type(module).__name__}: it has no linear layer")
    return linears[0][0], linears[-1][1]


def find_insertion_points(model: nn.Module, config: AdapterLayoutConfig) -> list[InsertionPoint]:
    """The modules `config` puts blocks at, in model order. Raises, changing nothing, when a kind of
    point matches nothing (naming the patterns to set) or a module already has a block."""
    patterns = {"attn": config.attn_modules or DEFAULT_ATTN_MODULES, "ffn": config.ffn_modules or DEFAULT_FFN_MODULES}
    found: list[InsertionPoint] = []
    for kind in config.point_kinds():
        matched = [(n, m) for n, m in own_modules(model) if n and name_matches(n, patterns[kind])]
        # A pattern may match a container and a module inside it: keep the outermost.
        matched = [(n, m) for n, m in matched if not any(n.startswith(o + ".") for o, _ in matched)]
        if not matched:
            raise ValueError(f"{type(config).__name__}: no module matches the {kind} insertion point pattern "
                             f"{patterns[kind]!r}; set {kind}_modules to this model's names")
        for n, m in matched:
            if hasattr(m, ADAPTER_ATTR):
                raise ValueError(f"module {n!r} already has an adapter block")
            in_f, out_f = module_features(m)
            found.append(InsertionPoint(n, m, kind, layer_index(n, config.layers_pattern),
                                        in_f if config.parallel else out_f, out_f))
    names = [p.name for p in found]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"modules {sorted(dup)} match both the attn and the ffn pattern")
    return sorted(found, key=lambda p: names.index(p.name))


def _module_input(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


class AdapterDropState:
    """How many of the lowest layers skip their blocks now (``current``); redrawn per training forward
    when ``random`` (by a forward pre-hook on the root model). The draw is per thread, so forwards
    running at once in several threads each skip what they drew."""

    def __init__(self, layers: int, random_in_training: bool):
        self.reset(layers, random_in_training)

    def reset(self, layers: int, random_in_training: bool) -> None:
        self.layers, self.random = layers, random_in_training
        self._now = threading.local()  # earlier draws no longer count

    @property
    def current(self) -> int:
        return getattr(self._now, "value", self.layers)

    def draw(self, training: bool) -> None:
        # torch's generator, so torch.manual_seed makes the draws repeatable
        self._now.value = int(torch.randint(0, self.layers + 1, ())) if training and self.random else self.layers

    def skips(self, layer: int | None) -> bool:
        return layer is not None and layer < self.current


class _AdapterHook:
    """Forward hook running the module's block on its output (or, parallel, on its input)."""

    def __init__(self, parallel: bool, layer: int | None, drop: AdapterDropState):
        self.parallel, self.layer, self.drop = parallel, layer, drop

    def __call__(self, module, args, kwargs, output):
        if self.drop.skips(self.layer):
            return None
        h = output[0] if isinstance(output, tuple) else output
        x = _module_input(args, kwargs) if self.parallel else h
        h = getattr(module, ADAPTER_ATTR)(x, h)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def set_adapter_drop(model: nn.Module, layers: int, random_in_training: bool = False) -> None:
    """Skip the adapter blocks of layers ``0 .. layers-1`` from now on (AdapterDrop at inference)."""
    state = getattr(model, DROP_ATTR, None)
    if state is None:
        raise ValueError("the model has no bottleneck-style adapters")
    state.reset(layers, random_in_training)


def _first_param(module: nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)


# ---------------------------------------------------------------- the method

class AdapterMethod(Method):
    """Shared machinery of bottleneck-style methods: subclasses build the blocks (and any parameters
    shared between them, which live on the root model as ``fastpeft_<name>`` and are saved once)."""

    def build_blocks(self, points: list[InsertionPoint], config, device=None, dtype=None
                     ) -> tuple[list[nn.Module], dict[str, nn.Parameter]]:
        raise NotImplementedError

    def _blocks_for(self, model: nn.Module, config, device=None):
        config.validate()
        points = find_insertion_points(model, config)
        first = _first_param(model)
        dtype = first.dtype if first is not None and first.is_floating_point() else None
        return points, *self.build_blocks(points, config, device=device, dtype=dtype)

    def apply(self, model: nn.Module, config, adapter_name: str) -> nn.Module:
        points, blocks, shared = self._blocks_for(model, config)   # everything checked before any change
        heads = find_heads(model, config, points)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, param in shared.items():
            setattr(model, f"fastpeft_{name}", param)
        drop = AdapterDropState(config.adapter_drop, config.adapter_drop_random)
        setattr(model, DROP_ATTR, drop)
        model.register_forward_pre_hook(lambda module, args: drop.draw(module.training))
        for point, block in zip(points, blocks):
            ref = _first_param(point.module)
            if ref is not None:
                block.to(device=ref.device, dtype=ref.dtype)
            attach_module(point.module, ADAPTER_ATTR, block)
            point.module.register_forward_hook(_AdapterHook(config.parallel, point.layer, drop), with_kwargs=True)
        for param in [*shared.values(), *(q for b in blocks for q in b.parameters())]:
            param.requires_grad_(True)
        wrap_heads(model, config, heads, adapter_name)
        return model

    @staticmethod
    def _keys(named_blocks: list[tuple[str, nn.Module]], shared: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Checkpoint key -> tensor: each shared parameter once, then every block's own parameters."""
        shared_ids = {id(p) for p in shared.values()}
        state = {f"{PREFIX}fastpeft_{name}": p for name, p in shared.items()}
        for module_name, block in named_blocks:
            for key, param in block.named_parameters(remove_duplicate=False):
                if id(param) not in shared_ids:
                    state[f"{PREFIX}{module_name}.{ADAPTER_ATTR}.{key}"] = param
        return state

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        shared = {name[len("fastpeft_"):]: p for name, p in model.named_parameters(recurse=False)
                  if name.startswith("fastpeft_")}
        named_blocks = [(name, getattr(module, ADAPTER_ATTR)) for name, module in model.named_modules()
                        if isinstance(getattr(module, ADAPTER_ATTR, None), nn.Module)]
        return {**self._keys(named_blocks, shared), **heads_state_dict(model, adapter_name, PREFIX)}

    def expected_shapes(self, model: nn.Module, config) -> dict[str, tuple[int, ...]]:
        points, blocks, shared = self._blocks_for(model, config, device="meta")
        named_blocks = [(p.name, b) for p, b in zip(points, blocks)]
        shapes = {k: tuple(v.shape) for k, v in self._keys(named_blocks, shared).items()}
        return {**shapes, **heads_shapes(model, config, PREFIX, points)}


def init_linear_pair(down: nn.Module, up: nn.Module, config: AdapterLayoutConfig) -> None:
    """identity: down keeps its default init, up is zero. near_identity: both ~ N(0, init_std²)."""
    with torch.no_grad():
        if config.init_weights == "identity":
            up.weight.zero_()
        else:
            down.weight.normal_(0.0, config.init_std)
            up.weight.normal_(0.0, config.init_std)
        for layer in (down, up):
            if layer.bias is not None:
                layer.bias.zero_()


@dataclass
class BottleneckConfig(AdapterLayoutConfig, MethodConfig):
    """Bottleneck adapters (see :class:`AdapterLayoutConfig` for the shared fields and the module
    docstring for layouts). ``adapter_bias=True``: AdapterBias blocks instead of bottlenecks."""

    peft_type: ClassVar[str] = "BOTTLENECK"
    adapter_bias: bool = False


@register
class BottleneckMethod(AdapterMethod):
    config_cls = BottleneckConfig

    def build_blocks(self, points, config: BottleneckConfig, device=None, dtype=None):
        blocks = []
        for p in points:
            if config.adapter_bias:
                block = AdapterBiasBlock(p.in_features, p.out_features, config.scaling, device=device, dtype=dtype)
                if config.init_weights == "near_identity" and device != "meta":
                    with torch.no_grad():
                        block.vector.normal_(0.0, config.init_std)
            else:
                width = config.width(p.out_features)
                down = nn.Linear(p.in_features, width, device=device, dtype=dtype)
                up = nn.Linear(width, p.out_features, device=device, dtype=dtype)
                if device != "meta":
                    init_linear_pair(down, up, config)
                block = AdapterBlock(down, up, config.non_linearity, config.scaling)
            blocks.append(block)
        return blocks, {}


__all__ = ["BottleneckConfig", "AdapterLayoutConfig", "AdapterBlock", "AdapterBiasBlock", "AdapterMethod",
           "find_insertion_points", "set_adapter_drop", "InsertionPoint"]
