"""Linear4bit: an ``nn.Linear`` whose frozen weight is stored in NF4 (bitsandbytes' format)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.nf4_matmul import dequantize_packed, nf4_linear
from ..quant.nf4 import NF4Weight, dequantize_nf4, nf4_from_state_dict, quantize_nf4

_QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class Linear4bit(nn.Module):
    """``y = x·Wᵀ + b`` with W in NF4 (0.5 byte per weight plus one float32 absmax per block).

    Build it with :meth:`from_linear` (quantises), :meth:`from_bnb` (a bitsandbytes ``Linear4bit``)
    or :meth:`from_state_dict`. Its state dict has bitsandbytes' keys, so checkpoints move both
    ways. The weight is frozen; the bias (if any) is a regular parameter.
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"Linear4bit: the weight must be 2-D, got shape {list(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.q = q
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(q.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant, quant_storage), linear.bias)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "Linear4bit":
        q = nf4_from_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "weight")
        return cls(q, state.get(f"{prefix}bias"))

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "Linear4bit":
        """From a bitsandbytes ``Linear4bit`` (its quantised weight, read through its state dict)."""
        return cls.from_state_dict(layer.state_dict())

    # --------------------------------------------------------------- weights

    def block_absmax(self) -> torch.Tensor:
        return self.q.block_absmax()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in full precision: ``[out, in]`` in the original dtype (a new tensor)."""
        return dequantize_nf4(self.q)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.q.dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0))  # where .to()/.cuda() sends tensors; the bytes keep their dtype
        self.q = self.q.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.q.state_dict("weight").items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix + "weight")}
        if own:
            try:
                q = nf4_from_state_dict(own, "weight")
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
                return
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {list(q.shape)} does not match "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            self.q = q.to(self.q.packed.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # --------------------------------------------------------------- forward

    def compute_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        """x as the NF4 ops take it ([M, in], unit stride, in the compute dtype: autocast's when it is
        on, else the weight's original dtype), the bias in that dtype, and the dtype."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.q.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, None if self.bias is None else self.bias.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, bias, _ = self.compute_inputs(x)
        y = nf4_linear(x2, self.q, bias)  # double quantisation decoded inside the kernels
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.q.blocksize}, "
                f"double_quant={self.q.double_quant}, dtype={self.q.dtype}")


__all__ = ["Linear4bit", "dequantize_packed"]
