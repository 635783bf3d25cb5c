"""BGMV: per-row gathered LoRA products for mixed-adapter decode (one adapter lookup per token).

Faces: reference (this file: a per-row loop), Triton ``kernels/bgmv.py``, C++ CPU
``csrc/cpu/bgmv.cpp``, CUDA ``csrc/cuda/bgmv.cu``.

``bgmv_shrink(x, lora_a, adapter_ids) -> s``
    x ``[T, K]``, lora_a ``[S, R, K]`` (S slots, max rank R; a slot of lower rank is zero-padded),
    adapter_ids ``[T]`` int32 → s ``[T, R]`` with ``s[t] = lora_a[id[t]] · x[t]``, 0 where id is -1.
``bgmv_expand(base, s, lora_b, scalings, adapter_ids) -> out``
    base ``[T, N]``, s ``[T, R]``, lora_b ``[S, N, R]``, scalings ``[S]`` float32 →
    ``out[t] = base[t] + scalings[id]·lora_b[id]·s[t]`` (``base[t]`` where id is -1).

x, s, base, lora_a and lora_b share one dtype (float32, float16, bfloat16) and device. Kernels
treat an id outside ``[0, S)`` as -1, so no input can make them read out of bounds; the public
entry points refuse such ids with a clear error first (see :class:`AdapterBatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry
from .lora_linear import SUPPORTED_DTYPES


def _shape(t):
    return list(t.shape)


def _check_tensor(op, name, t, dtype=None, device=None, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D; got shape {_shape(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; all tensors must be on one device")


def check_index(op, name, t, length, device):
    _check_tensor(op, name, t, device=device, dims=1)
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries, expected {length}")


def check_shrink(op, x, lora_a):
    _check_tensor(op, "x", x, dims=2)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported dtypes are float32, float16 and bfloat16")
    _check_tensor(op, "lora_a", lora_a, x.dtype, x.device, dims=3)
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: lora_a must be [slots, max_rank, {x.shape[1]}]; got {_shape(lora_a)}")
    if not _registry.unit_stride_rows(x):
        raise ValueError(f"{op}: x must be contiguous in its last dimension; got strides {list(x.stride())}")


def check_expand(op, base, s, lora_b, scalings):
    _check_tensor(op, "base", base, dims=2)
    if base.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: base has dtype {base.dtype}; supported dtypes are float32, float16 and bfloat16")
    _check_tensor(op, "s", s, base.dtype, base.device, dims=2)
    _check_tensor(op, "lora_b", lora_b, base.dtype, base.device, dims=3)
    _check_tensor(op, "scalings", scalings, torch.float32, base.device, dims=1)
    T, N = base.shape
    S, R = lora_b.shape[0], s.shape[1]
    if s.shape[0] != T:
        raise ValueError(f"{op}: s must be [{T}, max_rank]; got {_shape(s)}")
    if lora_b.shape[1] != N or lora_b.shape[2] != R:
        raise ValueError(f"{op}: lora_b must be [slots, {N}, {R}]; got {_shape(lora_b)}")
    if scalings.shape[0] != S:
        raise ValueError(f"{op}: scalings must have one entry per slot ({S}); got {scalings.shape[0]}")


def _check_bgmv_shrink(x, lora_a, adapter_ids):
    check_shrink("bgmv_shrink", x, lora_a)
    check_index("bgmv_shrink", "adapter_ids", adapter_ids, x.shape[0], x.device)


def _check_bgmv_expand(base, s, lora_b, scalings, adapter_ids):
    check_expand("bgmv_expand", base, s, lora_b, scalings)
    check_index("bgmv_expand", "adapter_ids", adapter_ids, base.shape[0], base.device)


def bgmv_shrink_reference(x, lora_a, adapter_ids):
    """The definition: one row at a time."""
    s = x.new_zeros(x.shape[0], lora_a.shape[1])
    for t, slot in enumerate(adapter_ids.tolist()):
        if 0 <= slot < lora_a.shape[0]:
            s[t] = F.linear(x[t], lora_a[slot])
    return s


def bgmv_expand_reference(base, s, lora_b, scalings, adapter_ids):
    out = base.clone()
    for t, slot in enumerate(adapter_ids.tolist()):
        if 0 <= slot < lora_b.shape[0]:
            out[t] = base[t] + scalings[slot].to(base.dtype) * F.linear(s[t], lora_b[slot])
    return out


def _choose(device, *args):
    if device.type == "cuda":
        return ("cuda", "triton", "torch")
    return _registry.DEFAULT_PREFERENCE.get(device.type, ("torch",))


bgmv_shrink = _registry.define(
    "bgmv_shrink", "(Tensor x, Tensor lora_a, Tensor adapter_ids) -> Tensor",
    check=_check_bgmv_shrink, fake=lambda x, a, ids: x.new_empty(x.shape[0], a.shape[1]),
    reference=bgmv_shrink_reference, choose=_choose)

bgmv_expand = _registry.define(
    "bgmv_expand", "(Tensor base, Tensor s, Tensor lora_b, Tensor scalings, Tensor adapter_ids) -> Tensor",
    check=_check_bgmv_expand, fake=lambda base, *rest: torch.empty_like(base),
    reference=bgmv_expand_reference, choose=_choose)


def _register_triton_faces():
    try:
        from ..kernels import bgmv as triton_bgmv
    except ImportError:
        return
    bgmv_shrink.register_triton(triton_bgmv.bgmv_shrink)
    bgmv_expand.register_triton(triton_bgmv.bgmv_expand)


_register_triton_faces()
