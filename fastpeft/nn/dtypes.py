"""The dtype a layer computes in."""

from __future__ import annotations

import torch


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type`. A device type autocast does not know (``meta``,
    where a model is built before its weights are loaded) has it off; torch.is_autocast_enabled
    raises for it."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """Autocast's dtype for `device_type` when autocast is on there, else `default` (so a forward on
    the meta device computes shapes in the default dtype)."""
    return torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else default


def is_dtensor(t) -> bool:
    """Whether `t` is a ``torch.distributed.tensor.DTensor`` (a shard FSDP2 holds), without importing
    torch.distributed where it is not built."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
