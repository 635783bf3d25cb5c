"""Compacter (Karimi Mahabadi et al. 2021): bottleneck adapters whose projections are PHM layers.

Each adapter's down- and up-projection is a :class:`fastpeft.nn.PHMLinear`, ``W = Σᵢ Aᵢ ⊗ Bᵢ``:
the n×n rules ``Aᵢ`` (one ``[n, n, n]`` tensor) are shared by every projection of every layer
(``shared_phm_rule``), and ``Bᵢ`` is low-rank ``Sᵢ·Tᵢ`` with ``phm_rank`` (1 in the paper; None:
full Bᵢ). Compacter is the Houlsby layout, Compacter++ the Pfeiffer layout. Placement, init,
scaling and AdapterDrop are those of :mod:`fastpeft.methods.bottleneck`.

The shared rule lives on the root model as ``fastpeft_phm_rule`` and is saved once, under
``base_model.model.fastpeft_phm_rule``; loading copies it into the one shared Parameter, so the
layers stay shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..nn.phm import PHMLinear
from .base import MethodConfig, register
from .bottleneck import AdapterBlock, AdapterLayoutConfig, AdapterMethod


@dataclass
class CompacterConfig(AdapterLayoutConfig, MethodConfig):
    """Compacter (``layout="houlsby"``) or Compacter++ (``layout="pfeiffer"``).

    Attributes (besides :class:`~fastpeft.methods.bottleneck.AdapterLayoutConfig`'s):
        phm_dim: n; the adapted features and the bottleneck width must be divisible by it.
        phm_rank: rank r of each ``Bᵢ = Sᵢ·Tᵢ`` (at most ``min(in, out)/n`` of every projection);
            None for full Bᵢ.
        shared_phm_rule: one rule tensor for all projections of all layers (the paper's); False:
            each projection has its own.
        phm_bias: the projections have biases.
    """

    peft_type: ClassVar[str] = "COMPACTER"
    layouts: ClassVar[tuple[str, ...]] = ("houlsby", "pfeiffer")
    reduction_factor: int = 32
    non_linearity: str = "gelu"
    phm_dim: int = 4
    phm_rank: int | None = 1
    shared_phm_rule: bool = True
    phm_bias: bool = True

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.phm_dim, int) and self.phm_dim >= 1):
            raise ValueError(f"CompacterConfig: phm_dim must be a positive int, got {self.phm_dim!r}")
        if self.phm_rank is not None and not (isinstance(self.phm_rank, int) and self.phm_rank >= 1):
            raise ValueError(f"CompacterConfig: phm_rank must be a positive int or None, got {self.phm_rank!r}")

    def width(self, features: int) -> int:
        """The bottleneck width, rounded down to a multiple of phm_dim (at least phm_dim)."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(self.phm_dim, int(features // self.reduction_factor) // self.phm_dim * self.phm_dim)


@register
class CompacterMethod(AdapterMethod):
    config_cls = CompacterConfig

    def build_blocks(self, points, config: CompacterConfig, device=None, dtype=None):
        n = config.phm_dim
        shared = {}
        if config.shared_phm_rule:
            rule = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
            if device != "meta":
                with torch.no_grad():
                    rule.normal_(0.0, n ** -0.5)
            shared["phm_rule"] = rule
        blocks = []
        for p in points:
            width = config.width(p.out_features)
            projections = []
            for in_f, out_f, what in ((p.in_features, width, "down"), (width, p.out_features, "up")):
                try:
                    projections.append(PHMLinear(in_f, out_f, n, config.phm_rank, shared.get("phm_rule"),
                                                 bias=config.phm_bias, device=device, dtype=dtype))
                except ValueError as e:
                    raise ValueError(f"CompacterConfig at {p.name!r} ({what}-projection {in_f} -> {out_f}): {e}") \
                        from None
            down, up = projections
            if device != "meta":
                if config.init_weights == "identity":
                    up.zero_b()
                else:
                    down.normal_b_(config.init_std)
                    up.normal_b_(config.init_std)
            blocks.append(AdapterBlock(down, up, config.non_linearity, config.scaling))
        return blocks, shared


__all__ = ["CompacterConfig"]
