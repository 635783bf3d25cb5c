"""DenseLinear: an ``nn.Linear`` whose inference runs fastpeft's ``dense_linear`` op."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dense_linear import dense_linear
from .dtypes import autocast_enabled, is_dtensor


class DenseLinear(nn.Linear):
    """``y = x·Wᵀ + b`` with a full-precision weight: an ``nn.Linear`` (the same parameters, state
    dict keys, ``isinstance`` and training) whose inference takes :func:`fastpeft.ops.dense_linear`.

    For the layers a 4-bit model keeps in full precision and reads whole at every generated token:
    the output layer (SmolLM2's ties 49152 x 576 bf16 weights to its embedding, 56.6 MB). On the CPU
    the op's face streams the weight once for a few rows, where torch's own kernels reach about
    half the memory's speed (csrc/cpu/dense_linear.cpp has the figures). Everything else is
    ``nn.Linear.forward`` itself: autograd (a weight or an x that needs a gradient under grad mode),
    autocast, torch.compile, an x in another dtype than the weight or of another width (nn.Linear's
    own error), a sharded weight.

    x ``[..., in_features]``, y ``[..., out_features]``, in the weight's dtype (float32, float16 or
    bfloat16).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseLinear":
        """A DenseLinear holding `linear`'s own parameters (the same objects: a weight tied to an
        embedding stays tied), in its training mode."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"DenseLinear.from_linear takes a torch.nn.Linear, not a {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (torch.compiler.is_compiling() or x.dtype is not weight.dtype or x.device != weight.device
                or x.dim() == 0 or x.shape[-1] != self.in_features or bias is not None and bias.dtype is not x.dtype
                or torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                                or bias is not None and bias.requires_grad)
                or autocast_enabled(x.device.type) or is_dtensor(weight)
                or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or weight.stride(-1) != 1):
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return dense_linear(x2, weight, bias).reshape(*x.shape[:-1], self.out_features)


__all__ = ["DenseLinear"]
