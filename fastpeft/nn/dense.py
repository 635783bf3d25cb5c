"""DenseLinear: an ``nn.Linear`` whose inference runs fastpeft's ``dense_linear`` op."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dense_linear import dense_linear
from .dtypes import autocast_enabled, is_dtensor


class DenseLinear(nn.Linear):
    """``y = x·Wᵀ + b`` with a full-precision weight: an ``nn.Linear`` (the same parameters, state
    dict keys and training, and ``isinstance(layer, nn.Linear)``) whose inference takes
    :func:`fastpeft.ops.dense_linear`.

    For the layers a 4-bit model keeps in full precision and reads whole at every generated token:
    the output layer (SmolLM2's is its 49152 x 576 bf16 embedding, tied, 56.6 MB). On the CPU the
    op's face streams the weight once for a few rows, where torch's own kernels reach about half
    the memory's speed (csrc/cpu/dense_linear.cpp has the figures). Everything else is
    ``nn.Linear.forward`` itself, with its own errors: autograd (a weight, bias or x that needs a
    gradient under grad mode), autocast, torch.compile, an x of another dtype, device or width, a
    bias of another dtype, device or shape, no input features, a sharded weight.

    x ``[..., in_features]``, y ``[..., out_features]``, in the weight's dtype (float32, float16 or
    bfloat16). The weight's own shape is read at each call, not ``in_features``/``out_features``
    (nn.Linear's forward never reads them either: a resized weight keeps working).

    Each call goes through the op's checks and face choice (about 8 us on a 64 x 64 layer, AMD EPYC
    Zen 4) rather than a held plan as Linear4bit's do: a model has one or two such layers, each
    streaming megabytes.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseLinear":
        """A new DenseLinear holding `linear`'s own parameters (the same objects: a weight tied to
        an embedding stays tied), in its training mode. To keep the module itself (its hooks,
        attributes, identity), :meth:`make_dense` converts it in place."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"DenseLinear.from_linear takes a torch.nn.Linear, not a {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.register_parameter("weight", linear.weight)
        layer.register_parameter("bias", linear.bias)
        layer.train(linear.training)
        return layer

    @classmethod
    def make_dense(cls, linear: nn.Linear) -> "DenseLinear":
        """`linear` itself made a DenseLinear (its class changed in place: the module adds no
        state), so that its hooks (accelerate's device hooks among them), attributes and every
        reference to it stay; returns it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"DenseLinear.make_dense takes a torch.nn.Linear, not a {type(linear).__name__}")
        linear.__class__ = cls
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (torch.compiler.is_compiling() or x.dtype is not weight.dtype or x.device != weight.device
                or x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0
                or bias is not None and (bias.dtype is not x.dtype or bias.device != x.device
                                         or bias.shape != weight.shape[:1])
                or torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                                or bias is not None and bias.requires_grad)
                or autocast_enabled(x.device.type) or is_dtensor(weight)
                or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or weight.stride(-1) != 1):  # the op reads the weight's rows as they lie; it never copies them
            return F.linear(x, weight, bias)
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return dense_linear(x2, weight, bias).reshape(*x.shape[:-1], N)


__all__ = ["DenseLinear"]
