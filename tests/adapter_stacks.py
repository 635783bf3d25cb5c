"""Stacked adapter factors and mixed-adapter batches, shared by the BGMV, SGMV and MultiLoRALinear tests."""

import torch

from fastpeft.ops import AdapterBatch
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from conftest import fresh_seed

S = 6  # slots


def id_patterns(T, seed=0):
    """Slot-id patterns of length T (the first entries of a longer pattern when T is small)."""
    T = max(T, 2 * S)
    g = torch.Generator().manual_seed(seed)
    return {
        "random with -1 and the last slot": torch.cat([torch.tensor([-1, S - 1]), torch.randint(-1, S, (T - 2,), generator=g)]),
        "one adapter for all rows": torch.full((T,), 2),
        "all distinct": torch.cat([torch.randperm(S, generator=g), torch.arange(T - S) % S]),
        "base model only": torch.full((T,), -1),
    }


def stacks(K, N, R, dtype, device, ranks=(1, 3, 8, 2, 5, 8), seed=0):
    """Stacked factors with mixed ranks: slot i uses ranks[i] <= R rows, the rest zero."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(S, R, K)
    b = torch.zeros(S, N, R)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, K, generator=g) / K ** 0.5
        b[i, :, :r] = torch.randn(N, r, generator=g) / r ** 0.5
    scalings = torch.rand(S, generator=g) + 0.5
    return a.to(device, dtype), b.to(device, dtype), scalings.to(device)


def mixed_batch(T, K, N, R, pattern, dtype, device):
    """A batch of T tokens routed by id pattern `pattern`, the factors, and the per-row reference.

    Returns a dict: x ``[T, K]``, base ``[T, N]``, a ``[S, R, K]``, b ``[S, N, R]``, scalings ``[S]``,
    batch (the AdapterBatch), s_ref ``[T, R]`` and out_ref ``[T, N]`` (BGMV's per-row reference,
    which is SGMV's definition too)."""
    ids = id_patterns(T)[pattern][:T]
    a, b, scalings = stacks(K, N, R, dtype, device, ranks=[min(r, R) for r in (1, 3, 8, 2, 5, 8)])
    x = torch.randn(T, K).to(device, dtype)
    base = torch.randn(T, N).to(device, dtype)
    batch = AdapterBatch.build(ids, S, device=device)
    s_ref = bgmv_shrink_reference(x, a, batch.adapter_ids)
    out_ref = bgmv_expand_reference(base, s_ref, b, scalings, batch.adapter_ids)
    assert torch.equal(out_ref[ids == -1], base[ids == -1])
    return dict(x=x, base=base, a=a, b=b, scalings=scalings, batch=batch, s_ref=s_ref, out_ref=out_ref)


# The shapes the face tests run: one token; ragged sizes; a rank of 16; 70 tokens (SGMV's tiles).
FACE_SHAPES = [(1, 16, 24, 8), (37, 45, 70, 8), (20, 33, 17, 16), (70, 24, 40, 8)]


def wide_rank_batch(T, K, N, R, dtype, device):
    """T tokens (slots mixed with -1) over stacks whose slots reach the full rank R (ranks R, 1,
    R - 3, 2, R/2 + 1, R: every rank lane is read), a random s ``[T, R]`` for the expand (not the
    shrink's, whose columns beyond a slot's rank are zero), and the per-row references.

    Returns a dict: x, base, a, b, scalings, s, batch, s_ref (shrink of x), out_ref (expand of s)."""
    ids = id_patterns(T, seed=fresh_seed())["random with -1 and the last slot"][:T]
    a, b, scalings = stacks(K, N, R, dtype, device, ranks=(R, 1, R - 3, 2, R // 2 + 1, R), seed=fresh_seed())
    x, base = torch.randn(T, K).to(device, dtype), torch.randn(T, N).to(device, dtype)
    s = (torch.randn(T, R) / R ** 0.5).to(device, dtype)
    batch = AdapterBatch.build(ids, S, device=device)
    return dict(x=x, base=base, a=a, b=b, scalings=scalings, s=s, batch=batch,
                s_ref=bgmv_shrink_reference(x, a, batch.adapter_ids),
                out_ref=bgmv_expand_reference(base, s, b, scalings, batch.adapter_ids))
