"""LoRALinear: a drop-in replacement for ``nn.Linear`` (and transformers' ``Conv1D``) with a LoRA adapter."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.lora_linear import lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + scaling·dropout(x)·Aᵀ·Bᵀ`` computed by the fused ``lora_linear`` op.

    The base layer is kept as ``self.base_layer`` (the same module object, weight shared, never
    copied) and frozen. ``lora_A`` is ``[r, in_features]``, ``lora_B`` is ``[out_features, r]``.

    Args:
        base_layer: an ``nn.Linear``, or a transformers ``Conv1D``-style layer whose weight is
            ``[in_features, out_features]`` (pass ``fan_in_fan_out=True``).
        r: rank, >= 1.
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (training only).
        init_lora_weights: True for PEFT's default (A Kaiming-uniform, B zeros, so the layer starts
            equal to its base), ``"gaussian"`` (A ~ N(0, 1/r), B zeros), or False (both random,
            for tests: the adapter is not a no-op).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: rank r must be an integer >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"LoRALinear: base layer {type(base_layer).__name__} has no 2-D weight")
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else \
            (weight.shape[1], weight.shape[0])
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = lora_dropout
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self._disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    **kwargs) -> "LoRALinear":
        """Wrap an existing layer; its weight is shared, not copied. Conv1D-style layers (transformers'
        ``Conv1D``, weight ``[in, out]``) are detected by type name unless ``fan_in_fan_out`` is given."""
        kwargs.setdefault("fan_in_fan_out", type(base_layer).__name__ == "Conv1D")
        return cls(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, as PEFT
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            raise ValueError(f"LoRALinear: init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")

    # ------------------------------------------------------------ weights

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as ``[out_features, in_features]`` (a view for Conv1D-style layers)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·A`` as ``[out_features, in_features]``, computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (in place, in float32, then back to its dtype)."""
        if self.merged:
            return
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to one rounding to the weight's dtype)."""
        if not self.merged:
            return
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta_out_in: torch.Tensor) -> None:
        w = self._weight_out_in()
        w.copy_((w.float() + delta_out_in).to(w.dtype))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the layer computes its base layer alone (a merged adapter is unmerged first)."""
        was_merged, was_disabled = self.merged, self._disabled
        self.unmerge()
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = was_disabled
            if was_merged:
                self.merge()

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled or self.merged:
            return self.base_layer(x)
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        bias, lora_a, lora_b = self.bias, self.lora_A, self.lora_B
        # The op runs in one dtype: autocast's when it is on, else the base weight's. Adapters kept in
        # float32 over a bf16 base are cast for the product (as PEFT does); their grads stay float32.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
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
        return lora_linear(x, weight, bias, lora_a, lora_b, self.scaling,
                           dropout_p=self.lora_dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}")
