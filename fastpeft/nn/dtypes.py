"""The dtype a layer computes in."""

from __future__ import annotations

import torch


def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """Autocast's dtype for `device_type` when autocast is on there, else `default`. A device type
    autocast does not know (``meta``, where a model is built before its weights are loaded) has it
    off, so a forward on the meta device computes shapes in the default dtype."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default
