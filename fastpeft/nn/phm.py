"""PHMLinear: a linear layer whose weight is a sum of Kronecker products, ``W = Σᵢ Aᵢ ⊗ Bᵢ``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.phm_linear import phm_dense_weight, phm_linear


class PHMLinear(nn.Module):
    """``y = x·(Σᵢ Aᵢ ⊗ Bᵢ)ᵀ + bias``, computed from the factors by the ``phm_linear`` op (W never formed).

    Parameters (n = phm_dim):
        ``phm_rule`` ``[n, n, n]``: Aᵢ = ``phm_rule[i]``; with ``shared_A`` it is that very
        Parameter (Compacter shares it across layers: autograd sums its gradient over them);
        ``phm_b`` ``[n, out/n, in/n]``: full Bᵢ, or with ``phm_rank`` r
        ``phm_b_left`` ``[n, out/n, r]`` and ``phm_b_right`` ``[n, r, in/n]``: ``Bᵢ = left[i]·right[i]``;
        ``bias`` ``[out]`` (or None).

    ``in_features`` and ``out_features`` must be divisible by ``phm_dim``; ``phm_rank`` is at most
    ``min(in, out) / phm_dim`` (the rank of a full Bᵢ). Init: Aᵢ ~ N(0, 1/n) and Bᵢ scaled so W's
    entries have variance about 1/in_features (as a Kaiming-initialised linear); :meth:`zero_b`
    zeroes B (or its left factor) so the layer starts as the zero map.
    """

    def __init__(self, in_features: int, out_features: int, phm_dim: int, phm_rank: int | None = None,
                 shared_A: torch.Tensor | None = None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("phm_dim", phm_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PHMLinear: {name} must be a positive int, got {v!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v % phm_dim:
                raise ValueError(f"PHMLinear: {name}={v} is not divisible by phm_dim={phm_dim}")
        q, p = in_features // phm_dim, out_features // phm_dim
        if phm_rank is not None and not (isinstance(phm_rank, int) and 1 <= phm_rank <= min(p, q)):
            raise ValueError(f"PHMLinear: phm_rank must be an int in [1, min(in, out)/phm_dim = {min(p, q)}] "
                             f"(the rank of a full Bᵢ [{p}, {q}]); got {phm_rank!r}")
        self.in_features, self.out_features, self.phm_dim, self.phm_rank = in_features, out_features, phm_dim, phm_rank
        factory = dict(device=device, dtype=dtype)
        if shared_A is not None:
            if tuple(shared_A.shape) != (phm_dim,) * 3:
                raise ValueError(f"PHMLinear: shared_A must be [phm_dim]*3 = {[phm_dim] * 3}; got {list(shared_A.shape)}")
            self.phm_rule = shared_A if isinstance(shared_A, nn.Parameter) else nn.Parameter(shared_A)
            self.shares_rule = True
        else:
            self.phm_rule = nn.Parameter(torch.empty(phm_dim, phm_dim, phm_dim, **factory))
            self.shares_rule = False
        if phm_rank is None:
            self.phm_b = nn.Parameter(torch.empty(phm_dim, p, q, **factory))
            self.phm_b_left = self.phm_b_right = None
        else:
            self.phm_b = None
            self.phm_b_left = nn.Parameter(torch.empty(phm_dim, p, phm_rank, **factory))
            self.phm_b_right = nn.Parameter(torch.empty(phm_dim, phm_rank, q, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if not self.shares_rule:
                self.phm_rule.normal_(0.0, self.phm_dim ** -0.5)
            # Var(W) = n·Var(A)·Var(B) = Var(B): aim for 1/in_features.
            if self.phm_rank is None:
                self.phm_b.normal_(0.0, self.in_features ** -0.5)
            else:  # Var(B) = r·Var(left)·Var(right)
                std = (self.in_features * self.phm_rank) ** -0.25
                self.phm_b_left.normal_(0.0, std)
                self.phm_b_right.normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    def zero_b(self) -> None:
        """Make W zero through B (its left factor when low-rank): Aᵢ, shared or not, stays as it is,
        and B's gradient is not zero, so training moves it (LoRA's B = 0 start)."""
        with torch.no_grad():
            (self.phm_b if self.phm_rank is None else self.phm_b_left).zero_()

    def normal_b_(self, std: float) -> None:
        """B (both factors when low-rank) ~ N(0, std²): a near-zero map for near-identity adapters."""
        with torch.no_grad():
            for t in (self.phm_b, self.phm_b_left, self.phm_b_right):
                if t is not None:
                    t.normal_(0.0, std if self.phm_rank is None else std ** 0.5)

    def dense_weight(self) -> torch.Tensor:
        """The materialised ``[out_features, in_features]`` weight ``Σᵢ kron(Aᵢ, Bᵢ)`` (what the reference
        multiplies by; for merging and inspection, never used by :meth:`forward`)."""
        return phm_dense_weight(self.phm_rule, self.phm_b, self.phm_b_left, self.phm_b_right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_features]`` → ``[..., out_features]``; float32, float16 or bfloat16 (the parameters' dtype)."""
        return phm_linear(x, self.phm_rule, self.phm_b, self.phm_b_left, self.phm_b_right, self.bias)

    def extra_repr(self) -> str:
        rank = "" if self.phm_rank is None else f", phm_rank={self.phm_rank}"
        shared = ", shared_A" if self.shares_rule else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}{rank}"
                f"{shared}, bias={self.bias is not None}")
