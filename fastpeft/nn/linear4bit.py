"""Linear4bit: an ``nn.Linear`` whose frozen weight is stored in NF4 (bitsandbytes' format)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.nf4_matmul import dequantize_packed, nf4_linear
from ..quant.nf4 import NF4Weight, dequantize_nf4, nf4_from_state_dict, quantize_nf4
from .dtypes import compute_dtype

# The quantisation state's tensors, registered as buffers under these names; in the state dict they
# are bitsandbytes' ``weight.<name>`` keys.
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Linear4bit(nn.Module):
    """``y = x·Wᵀ + b`` with W in NF4 (0.5 byte per weight plus one float32 absmax per block).

    Build it with :meth:`from_linear` (quantises), :meth:`from_bnb` (a bitsandbytes ``Linear4bit``)
    or :meth:`from_state_dict`. The weight is real module state, as bitsandbytes' is: ``weight`` a
    frozen parameter holding the packed bytes (``[(out·in + 1) // 2 / itemsize, 1]`` of the storage
    dtype), the quantisation state buffers (``absmax``, ``quant_map``, ``nested_absmax``,
    ``nested_quant_map``), so ``state_dict`` (bitsandbytes' keys: ``weight``, ``weight.absmax``...,
    ``weight.quant_state.bitsandbytes__nf4``), ``.to()``, DDP's broadcast, FSDP and memory counts
    all see it. ``.half()`` and friends never convert it (the bytes and scales keep their dtypes).
    The bias (if any) is a regular parameter, frozen.
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

    @property
    def q(self) -> NF4Weight:
        """The weight as the NF4 ops take it, over the module's current tensors (whatever .to(),
        DDP or FSDP put there since). Built again only when one of those tensors was replaced: a
        decode step calls hundreds of layers, and building it each call cost 3.6 µs of a 64×64
        layer's 34 µs (AMD EPYC Zen 4, one thread)."""
        params, buffers = self._parameters, self._buffers
        held = self.__dict__.get("_nf4_view")
        if (held is not None and held.packed is params["weight"] and held.absmax is buffers["absmax"]
                and held.quant_map is buffers["quant_map"] and held.nested_absmax is buffers["nested_absmax"]
                and held.nested_quant_map is buffers["nested_quant_map"]):
            return held
        held = NF4Weight(params["weight"], buffers["absmax"], self.blocksize, self.weight_shape, self.weight_dtype,
                         buffers["quant_map"], buffers["nested_absmax"], buffers["nested_quant_map"],
                         self.absmax_offset, self.nested_blocksize)
        self.__dict__["_nf4_view"] = held
        return held

    @q.setter
    def q(self, q: NF4Weight) -> None:
        """Hold `q` (a new quantisation of a weight of this layer's shape): its tensors become the
        module's parameter and buffers."""
        if hasattr(self, "out_features") and tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: a [{', '.join(map(str, q.shape))}] weight cannot replace this layer's "
                             f"[{self.out_features}, {self.in_features}] one")
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, getattr(q, name))
        self.blocksize, self.weight_shape, self.weight_dtype = q.blocksize, torch.Size(q.shape), q.dtype
        self.absmax_offset, self.nested_blocksize = q.offset, q.nested_blocksize

    def block_absmax(self) -> torch.Tensor:
        return self.q.block_absmax()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in full precision: ``[out, in]`` in the original dtype (a new tensor)."""
        return dequantize_nf4(self.q)

    def _apply(self, fn, recurse=True):
        # .half(), .to(bfloat16)... would convert bf16-stored bytes and the float32 scales: the NF4
        # tensors only move to where fn sends tensors, keeping their dtypes; the rest gets fn.
        held = {name: getattr(self, name) for name in ("weight", *_STATE_BUFFERS)}
        for name in held:
            (self._parameters if name == "weight" else self._buffers).pop(name)
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0)).device
            self.weight = nn.Parameter(held["weight"].to(device), requires_grad=False)
            for name in _STATE_BUFFERS:
                self.register_buffer(name, None if held[name] is None else held[name].to(device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.q.state_dict("weight").items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
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
            self.q = q.to(self.weight.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        # The rest (the bias, hooks, unexpected keys) as any module loads it, the NF4 tensors given
        # as what the layer now holds: they are read above, under bitsandbytes' keys.
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        rest.update({prefix + name: getattr(self, name) for name in ("weight", *_STATE_BUFFERS)
                     if getattr(self, name) is not None})
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # --------------------------------------------------------------- forward

    def compute_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        """x as the NF4 ops take it ([M, in], unit stride, in the compute dtype: autocast's when it is
        on, else the weight's original dtype), the bias in that dtype, and the dtype."""
        dtype = compute_dtype(x.device.type, self.weight_dtype)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, None if self.bias is None else self.bias.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, bias, _ = self.compute_inputs(x)
        y = nf4_linear(x2, self.q, bias)  # double quantisation decoded inside the kernels
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}, dtype={self.weight_dtype}")


__all__ = ["Linear4bit", "dequantize_packed"]
