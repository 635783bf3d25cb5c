"""LoRALinear: a drop-in replacement for ``nn.Linear`` (and transformers' ``Conv1D``) with LoRA adapters."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn as nn

from ..ops.lora_linear import lora_linear
from ..ops.nf4_matmul import qlora_linear
from ..quant.nf4 import quantize_nf4
from .dtypes import compute_dtype
from .linear4bit import Linear4bit

DEFAULT_ADAPTER = "default"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style: weight ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRALinear: rank r must be an integer >= 1, got {r!r}")
    for name, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"LoRALinear: {name} must be a finite number, got {value!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"LoRALinear: init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


class LoRALinear(nn.Module):
    """``y = base(x) + scaling·dropout(x)·Aᵀ·Bᵀ`` computed by the fused ``lora_linear`` op.

    The layout is PEFT's, so its checkpoints and tensors map one to one: ``base_layer`` is the
    wrapped module (weight shared, never copied; frozen); each named adapter has
    ``lora_A[name]`` (``nn.Linear(in, r)``, weight ``[r, in]``) and ``lora_B[name]``
    (``nn.Linear(r, out)``, weight ``[out, r]``), and ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout`` are dicts by adapter name. One adapter is active at a time.

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
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, fan_in_fan_out: bool | None = None,
                 adapter_name: str | None = DEFAULT_ADAPTER):
        super().__init__()
        if not (isinstance(base_layer, (nn.Linear, Linear4bit)) or is_conv1d(base_layer)):
            raise TypeError(f"LoRALinear: base layer {type(base_layer).__name__} is not a linear layer (nn.Linear, "
                            "transformers' Conv1D or fastpeft's Linear4bit)")
        if adapter_name is not None:  # every argument checked before the base layer is frozen
            _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights)
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
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @classmethod
    def from_linear(cls, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    **kwargs) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` or ``Conv1D``; its weight is shared, not copied."""
        return cls(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)

    # ------------------------------------------------------------ adapters

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights: bool | str = True) -> None:
        """Add adapter `name` (it does not become active: see :meth:`set_adapter`)."""
        _check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights)
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
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    # ------------------------------------------------------------ weights

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·B·A`` of adapter `name` (default: the active one), ``[out, in]``, in float32."""
        name = name or self.active_adapter
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active one) into the base weight, in float32, then back to its dtype."""
        for name in [self.active_adapter] if adapter_names is None else adapter_names:
            if name in self.lora_A and name not in self.merged_adapters:
                self._add_to_weight(self.delta_weight(name))
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to one rounding to the weight's dtype per adapter)."""
        while self.merged_adapters:
            self._add_to_weight(-self.delta_weight(self.merged_adapters.pop()))

    def _add_to_weight(self, delta_out_in: torch.Tensor) -> None:
        if self.quantized:
            warnings.warn("merging a LoRA adapter into a 4-bit (NF4) base: it is added to the dequantised weight and "
                          "the sum requantised to NF4, which rounds (unmerge does not restore the exact bytes)")
            base = self.base_layer
            merged = base.dequantized_weight().float() + delta_out_in.to(base.weight.device)
            base.q = quantize_nf4(merged.to(base.weight_dtype), base.blocksize, base.nested_absmax is not None,
                                  base.weight.dtype)
            return
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        w.copy_((w.float() + delta_out_in).to(w.dtype))

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
        return lora_linear(x, weight, bias, lora_a, lora_b, self.scaling[name],
                           dropout_p=self.lora_dropout[name] if self.training else 0.0)

    def _qlora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x2, bias, dtype = self.base_layer.compute_inputs(x)
        # adapters kept in float32 over a bf16 base are cast for the product (as PEFT does)
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        y = qlora_linear(x2, self.base_layer.q, bias, a, b, self.scaling[name],
                         self.lora_dropout[name] if self.training else 0.0)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}, "
                f"active={name!r}, r={self.r.get(name)}, scaling={self.scaling.get(name)}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged_adapters}")


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
