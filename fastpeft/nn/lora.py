"""LoRALinear: a drop-in replacement for ``nn.Linear`` (and transformers' ``Conv1D``) with LoRA adapters."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import torch
import torch.nn as nn

from ..ops.dora_linear import dora_linear, norm_from_products, qdora_linear, row_norms_sq
from ..ops.lora_linear import lora_linear, lora_linear_fwd
from ..ops.nf4_matmul import nf4_linear, qlora_linear
from ..quant.nf4 import quantize_nf4
from .dtypes import compute_dtype
from .linear4bit import Linear4bit
from .op_plans import PLAN_ATTRIBUTE, HeldPlan, call_on_new_plan

DEFAULT_ADAPTER = "default"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style: weight ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights, use_dora=False) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRALinear: rank r must be an integer >= 1, got {r!r}")
    for name, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"LoRALinear: {name} must be a finite number, got {value!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"LoRALinear: init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    if not isinstance(use_dora, bool):
        raise ValueError(f"LoRALinear: use_dora must be True or False, got {use_dora!r}")


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude vector of one adapter: ``weight`` ``[out_features]``, the learned length of
    each output row. A module holding ``weight``, as PEFT's ``DoraLinearLayer``, so the layer's
    state-dict keys (``lora_magnitude_vector.<adapter>.weight``) are PEFT's."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        # a Parameter is held as it is (from_peft shares PEFT's), a plain tensor becomes one
        self.weight = magnitude if isinstance(magnitude, nn.Parameter) else nn.Parameter(magnitude)


class LoRALinear(nn.Module):
    """``y = base(x) + scaling·dropout(x)·Aᵀ·Bᵀ`` computed by the fused ``lora_linear`` op, or with
    ``use_dora=True`` DoRA's ``m ⊙ (W + scaling·B·A) / ‖W + scaling·B·A‖_row`` by ``dora_linear``.

    The layout is PEFT's, so its checkpoints and tensors map one to one: ``base_layer`` is the
    wrapped module (weight shared, never copied; frozen); each named adapter has
    ``lora_A[name]`` (``nn.Linear(in, r)``, weight ``[r, in]``) and ``lora_B[name]``
    (``nn.Linear(r, out)``, weight ``[out, r]``), a DoRA adapter also
    ``lora_magnitude_vector[name].weight`` ``[out]``, and ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout`` are dicts by adapter name. One adapter is active at a time.

    DoRA's row norms ``‖Wᵢ + scaling·Bᵢ·A‖`` are computed in every forward without forming
    ``W + scaling·B·A``: from ``‖Wᵢ‖²``, which the layer computes once (:meth:`base_weight_norm_sq`)
    and again only when the base weight has changed, and two rank-sized products.

    Args:
        base_layer: an ``nn.Linear``, or a ``Conv1D``-style layer with weight ``[in, out]``
            (``fan_in_fan_out=True``; detected for transformers' ``Conv1D``).
        r: rank, >= 1.
        lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (training only).
        init_lora_weights: True for PEFT's default (A Kaiming-uniform, B zeros: the layer starts
            equal to its base), ``"gaussian"`` (A ~ N(0, 1/r), B zeros), or False (both random).
        adapter_name: name of this first adapter (None: start with none; add them with
            :meth:`add_adapter`).
        use_dora: DoRA (weight-decomposed LoRA): a magnitude vector per output row, initialised,
            as PEFT does, to the row norms of ``W + scaling·B·A``.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, fan_in_fan_out: bool | None = None,
                 adapter_name: str | None = DEFAULT_ADAPTER, use_dora: bool = False):
        super().__init__()
        if not (isinstance(base_layer, (nn.Linear, Linear4bit)) or is_conv1d(base_layer)):
            raise TypeError(f"LoRALinear: base layer {type(base_layer).__name__} is not a linear layer (nn.Linear, "
                            "transformers' Conv1D or fastpeft's Linear4bit)")
        if adapter_name is not None:  # every argument checked before the base layer is frozen
            _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights, use_dora)
        self.base_layer = base_layer
        self.quantized = isinstance(base_layer, Linear4bit)  # QLoRA: an NF4 base
        if self.quantized:
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            weight = getattr(base_layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise TypeError(f"LoRALinear: base layer {type(base_layer).__name__} has no 2-D weight")
            self.fan_in_fan_out = is_conv1d(base_layer) if fan_in_fan_out is None else fan_in_fan_out
            self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.fan_in_fan_out else \
                (weight.shape[1], weight.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.disabled = False
        # DoRA: the row norms each merged DoRA adapter was merged with (unmerge divides them out), and
        # the cache of ‖Wᵢ‖² (see base_weight_norm_sq)
        self.merged_dora_norms: dict[str, torch.Tensor] = {}
        self._weight_norm_cache: tuple | None = None
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora)

    @classmethod
    def from_linear(cls, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    **kwargs) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` or ``Conv1D``; its weight is shared, not copied."""
        return cls(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)

    # ------------------------------------------------------------ adapters

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights: bool | str = True, use_dora: bool = False) -> None:
        """Add adapter `name` (it does not become active: see :meth:`set_adapter`)."""
        _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights, use_dora)
        if name in self.lora_A:
            raise ValueError(f"LoRALinear: adapter {name!r} already exists")
        factory = (dict(device=self.base_layer.weight.device, dtype=self.base_layer.weight_dtype) if self.quantized
                   else dict(device=self.weight.device, dtype=self.weight.dtype))
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = float(lora_dropout)
        self.reset_lora_parameters(name, init_lora_weights)
        if use_dora:  # PEFT's init: m = ‖W + scaling·B·A‖ per row (‖W‖ for B = 0: the layer starts as its base)
            self.lora_magnitude_vector[name] = DoRAMagnitude(self.weight_norm(name).to(factory["dtype"]))

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str = True) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear, as PEFT
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def set_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"LoRALinear: no adapter named {name!r}; adapters: {sorted(self.lora_A)}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"LoRALinear: no adapter named {name!r}; adapters: {sorted(self.lora_A)}")
        if name in self.merged_adapters:
            self.unmerge()
        for table in (self.lora_A, self.lora_B):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def uses_dora(self, name: str | None = None) -> bool:
        """Whether adapter `name` (default: the active one) is a DoRA adapter."""
        return (name or self.active_adapter) in self.lora_magnitude_vector

    # ------------------------------------------------------------ weights

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------ DoRA's row norms

    def base_weight_norm_sq(self) -> torch.Tensor:
        """``‖Wᵢ‖²`` of every output row of the base weight, ``[out]`` float32: DoRA's fixed norm term.

        Computed once and kept. Computed again when the base weight changed: merge, unmerge, a
        state-dict load and ``.to()`` drop it, and any other in-place write autograd sees (an
        optimiser step, ``copy_``) bumps the weight's version counter, which the cache holds (with
        the tensor it was computed from: a tensor put in its place is a change too). A write through
        ``weight.data`` is invisible to it, as to autograd: call :meth:`refresh_weight_norm` after
        one. A 4-bit base is dequantised once for it (one ``[out, in]`` temporary per refresh, as
        PEFT's DoRA init makes)."""
        t = self.base_layer.weight  # a 4-bit base's packed bytes: merging puts new ones in place
        if torch.compiler.is_compiling():
            # a compiled graph cannot guard on a version counter: there the norm is one more pass
            # over W per forward, in the graph (PEFT's DoRA makes that pass, and an [out, in] sum, always)
            with torch.no_grad():
                return row_norms_sq(self.base_layer.dequantized_weight() if self.quantized else
                                    t.t() if self.fan_in_fan_out else t)
        state = (t._version, t.dtype, t.device)
        cache = self._weight_norm_cache
        if cache is None or cache[0]() is not t or cache[1] != state:
            with torch.no_grad():
                wsq = row_norms_sq(self.base_layer.dequantized_weight() if self.quantized else
                                   t.t() if self.fan_in_fan_out else t)
            self._weight_norm_cache = cache = (weakref.ref(t), state, wsq)
        return cache[2]

    def refresh_weight_norm(self) -> None:
        """Forget the cached ``‖Wᵢ‖²``: the next DoRA forward recomputes it from the base weight."""
        self._weight_norm_cache = None

    @torch.no_grad()
    def weight_norm(self, name: str | None = None) -> torch.Tensor:
        """``‖W + scaling·B·A‖`` per output row for adapter `name` (default: the active one), ``[out]``
        float32 (what DoRA divides by), from ``‖Wᵢ‖²`` and the rank-sized product A·Wᵀ; the
        ``[out, in]`` sum is never formed."""
        name = name or self.active_adapter
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if self.quantized:
            aw = nf4_linear(a.to(self.base_layer.weight_dtype).contiguous(), self.base_layer.q)
        else:
            w = self.weight.t() if self.fan_in_fan_out else self.weight
            aw = torch.nn.functional.linear(a.to(w.dtype), w)   # [r, out]
        return norm_from_products(self.base_weight_norm_sq(), aw, a, b, self.scaling[name])

    # ------------------------------------------------------------ merging

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·B·A`` of adapter `name` (default: the active one), ``[out, in]``, in float32."""
        name = name or self.active_adapter
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active one) into the base weight, in float32, then back to its dtype.

        LoRA adds ``scaling·B·A``; DoRA, as PEFT, makes ``W ← m/‖W₀ + scaling·B·A‖ ⊙ (W + scaling·B·A)``
        with the norm of the unmerged weight W₀, so merging a DoRA adapter beside merged ones takes
        them all out and folds them back in turn."""
        names = [n for n in ([self.active_adapter] if adapter_names is None else adapter_names)
                 if n in self.lora_A and n not in self.merged_adapters]
        if self.merged_adapters and any(self.uses_dora(n) for n in names):
            names = self.merged_adapters + names
            self.unmerge()
        norms = {n: self.weight_norm(n) for n in names if self.uses_dora(n)}  # all of W₀, before any change
        for name in names:
            delta = self.delta_weight(name)
            if name in norms:
                g = (self.lora_magnitude_vector[name].weight.float() / norms[name])[:, None]
                self._update_weight(lambda w: g * (w + delta))
                self.merged_dora_norms[name] = norms[name]
            else:
                self._update_weight(lambda w: w + delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to one rounding to the weight's dtype per adapter)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            if name in self.merged_dora_norms:
                g = (self.lora_magnitude_vector[name].weight.float() / self.merged_dora_norms.pop(name))[:, None]
                self._update_weight(lambda w: w / g - delta)
            else:
                self._update_weight(lambda w: w - delta)

    def _update_weight(self, fn) -> None:
        """W ← fn(W), fn taking and giving the ``[out, in]`` weight in float32; stored back in the
        weight's dtype (a 4-bit base: dequantised, changed, requantised)."""
        self.refresh_weight_norm()
        self.drop_op_plan()
        if self.quantized:
            warnings.warn("merging a LoRA adapter into a 4-bit (NF4) base: it is added to the dequantised weight and "
                          "the sum requantised to NF4, which rounds (unmerge does not restore the exact bytes)")
            base = self.base_layer
            merged = fn(base.dequantized_weight().float())
            base.q = quantize_nf4(merged.to(base.weight_dtype), base.blocksize, base.nested_absmax is not None,
                                  base.weight.dtype)
            return
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        w.copy_(fn(w.float()).to(w.dtype))

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_weight_norm_cache"] = None  # holds a weak reference, which pickling refuses; recomputed anyway
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self.refresh_weight_norm()  # a base weight loaded in place: its ‖Wᵢ‖² is recomputed
        self.drop_op_plan()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.refresh_weight_norm()  # .to(dtype/device): recomputed from the converted weight when needed
        self.drop_op_plan()
        return super()._apply(fn, recurse)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the layer computes its base layer alone (merged adapters are unmerged first)."""
        merged, was_disabled = list(self.merged_adapters), self.disabled
        self.unmerge()
        self.disabled = True
        try:
            yield self
        finally:
            self.disabled = was_disabled
            self.merge(merged)

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference on the held op plan: the op's checks of the weights made once; each call checks
        # that the layer still holds what the plan was made from, and x (HeldPlan.call: one C++
        # call, which torch.compile cannot trace).
        held = self.__dict__.get(PLAN_ATTRIBUTE)
        y = None if held is None or torch.compiler.is_compiling() else held.call(self, x)
        if y is None:
            y = call_on_new_plan(self, held, x)
        return y if y is not None else self.forward_unplanned(x)

    @staticmethod
    def plan_paths(name: str) -> tuple[tuple, ...]:
        """What the op plan over adapter `name` is made from, read again at every planned call
        (:class:`HeldPlan`): the tensors, and every value that decides whether the layer computes
        ``lora_linear`` over them."""
        return (("base_layer", "weight"), ("base_layer", "bias"), ("lora_A", name, "weight"), ("lora_B", name, "weight"),
                ("lora_magnitude_vector", name), ("active_adapter",), ("scaling", name), ("lora_dropout", name),
                ("training",), ("disabled",), ("merged_adapters",), ("quantized",), ("fan_in_fan_out",))

    def op_plan(self, x: torch.Tensor):
        """The :class:`~fastpeft.ops._registry.Plan` of ``lora_linear_fwd`` over the active adapter's tensors,
        made with x (or None where the layer computes otherwise: disabled, merged, DoRA, a 4-bit or
        ``fan_in_fan_out`` base, tensors of another dtype than x to cast, dropout in training).
        Kept while the layer holds the same tensors, adapter, scaling and flags (:class:`HeldPlan`):
        a decode step calls hundreds of layers, and the op's checks of the weights cost about
        8 us a call on a 64x64 layer (AMD EPYC Zen 4, one thread), more than its kernels."""
        held = self.__dict__.get(PLAN_ATTRIBUTE)
        if held is None or not held.holds(self):
            held = self.new_held_plan(x)
        return None if held is None else held.plan

    def new_held_plan(self, x: torch.Tensor) -> HeldPlan | None:
        """A new op plan made with x, held by the layer in place of any it held (None, holding none,
        where no plan applies to the layer or to x)."""
        self.__dict__.pop(PLAN_ATTRIBUTE, None)
        name = self.active_adapter
        if self.disabled or self.merged_adapters or self.quantized or self.fan_in_fan_out:
            return None
        modules = self._modules
        a_layer, b_layer = modules["lora_A"]._modules.get(name), modules["lora_B"]._modules.get(name)
        if a_layer is None or b_layer is None or name in modules["lora_magnitude_vector"]._modules or (
                self.training and self.lora_dropout[name] > 0):
            return None
        base_layer = modules["base_layer"]
        base = base_layer._parameters
        weight, bias = base.get("weight"), base["bias"] if "bias" in base else getattr(base_layer, "bias", None)
        lora_a, lora_b = a_layer._parameters.get("weight"), b_layer._parameters.get("weight")
        if weight is None or lora_a is None or lora_b is None:
            return None  # a base whose weight is not a parameter (a parametrised one): as it computes
        dtype = weight.dtype
        if (x.dtype is not dtype or lora_a.dtype is not dtype or lora_b.dtype is not dtype
                or bias is not None and bias.dtype is not dtype or x.shape[-1] != self.in_features):
            return None
        plan = lora_linear_fwd.plan(x.reshape(-1, self.in_features).contiguous(), weight, bias, lora_a, lora_b,
                                    float(self.scaling[name]), None)
        held = self.__dict__[PLAN_ATTRIBUTE] = HeldPlan(plan, self, self.plan_paths(name), self.in_features,
                                                      self.out_features, output=0)
        return held

    def drop_op_plan(self) -> None:
        """Forget the op plan (the next inference call makes a new one)."""
        self.__dict__.pop(PLAN_ATTRIBUTE, None)

    def forward_unplanned(self, x: torch.Tensor) -> torch.Tensor:
        """The forward for any x, every argument checked by the op (what a plan's call equals)."""
        name = self.active_adapter
        if self.disabled or self.merged_adapters or name not in self.lora_A:
            return self.base_layer(x)  # (a model's active adapter may not cover this layer)
        if self.quantized:  # QLoRA: the delta fused into the NF4 GEMMs, forward and backward
            return self._qlora_forward(x, name)
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        bias = self.bias
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        # The op runs in one dtype: autocast's when it is on, else the base weight's. Adapters kept in
        # float32 over a bf16 base are cast for the product (as PEFT does); their grads stay float32.
        dtype = compute_dtype(x.device.type, weight.dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if lora_a.dtype != dtype:
            lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        if x.stride(-1) != 1:
            x = x.contiguous()  # a drop-in layer accepts what nn.Linear accepts; the op needs unit stride
        dropout_p = self.lora_dropout[name] if self.training else 0.0
        if self.uses_dora(name):
            magnitude = self.lora_magnitude_vector[name].weight.to(dtype)
            return dora_linear(x, weight, bias, lora_a, lora_b, magnitude, self.scaling[name],
                               self.base_weight_norm_sq(), dropout_p=dropout_p)
        return lora_linear(x, weight, bias, lora_a, lora_b, self.scaling[name], dropout_p=dropout_p)

    def _qlora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x2, bias, dtype = self.base_layer.compute_inputs(x)
        # adapters kept in float32 over a bf16 base are cast for the product (as PEFT does)
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        dropout_p = self.lora_dropout[name] if self.training else 0.0
        if self.uses_dora(name):  # QDoRA: ‖Wᵢ‖² from the dequantised weight, once; A·Wᵀ decoded with x·Wᵀ
            magnitude = self.lora_magnitude_vector[name].weight.to(dtype)
            y = qdora_linear(x2, self.base_layer.q, bias, a, b, magnitude, self.scaling[name],
                             self.base_weight_norm_sq(), dropout_p)
        else:
            y = qlora_linear(x2, self.base_layer.q, bias, a, b, self.scaling[name], dropout_p)
        return self.base_layer.output_as_input(y.reshape(*x.shape[:-1], self.out_features), x)

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}, "
                f"active={name!r}, r={self.r.get(name)}, scaling={self.scaling.get(name)}, "
                f"dora={self.uses_dora(name) if name else False}, fan_in_fan_out={self.fan_in_fan_out}, "
                f"merged={self.merged_adapters}")


class QLoRALinear(LoRALinear):
    """QLoRA: LoRA over a frozen NF4 base (:class:`Linear4bit`), the delta fused into the NF4 GEMMs
    forward and backward (``fastpeft.ops.nf4_matmul.qlora_linear``). A ``LoRALinear`` whose base is
    a ``Linear4bit`` computes the same way; this class names it and quantises for you::

        layer = QLoRALinear.from_linear(nn.Linear(4096, 4096), r=16, lora_alpha=32, double_quant=True)
    """

    def __init__(self, base_layer: Linear4bit, **kwargs):
        if not isinstance(base_layer, Linear4bit):
            raise TypeError(f"QLoRALinear needs a fastpeft Linear4bit base, got {type(base_layer).__name__}; "
                            "use QLoRALinear.from_linear to quantise an nn.Linear")
        super().__init__(base_layer, **kwargs)

    @classmethod
    def from_linear(cls, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    blocksize: int = 64, double_quant: bool = True, **kwargs) -> "QLoRALinear":
        """Quantise an ``nn.Linear`` to NF4 (bitsandbytes' format) and add a LoRA adapter."""
        if isinstance(base_layer, nn.Linear):
            base_layer = Linear4bit.from_linear(base_layer, blocksize, double_quant)
        return cls(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)
