"""A batch whose tokens each name their own adapter: the base layer alone, fastpeft's
MultiLoRALinear (one gathered shrink and expand), each adapter's tokens run separately through the
single-adapter layer, and PEFT's ``adapter_names`` path."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import LoRALinear, MultiLoRALinear
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, peft_lora_layer, under_no_grad, with_faces

ISSUE_4 = "issue 4, Benchmarks"
OVERHEAD = "overhead fastpeft/peft"   # what the adapters add to the base layer: fastpeft's over PEFT's
VS_ONE_ADAPTER = "fastpeft/fastpeft@U=1"  # time with U adapters over time with one, same shape


def dims(T: int, K: int, N: int, r: int, U: int) -> dict:
    """T tokens (decode: one per request), U distinct adapters among them."""
    return dict(T=T, K=K, N=N, r=r, U=U)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", "fwd", default_dtype(device), dims(16, 128, 128, 8, 4))]
    if device == "cuda":
        vs_peft = Target("peft/fastpeft", AT_LEAST, 5, "PEFT's mixed batch over fastpeft's, U >= 8", ISSUE_4)
        return [
            Case("decode", "fwd", "bf16", dims(64, 4096, 4096, 16, 1)),
            Case("decode", "fwd", "bf16", dims(64, 4096, 4096, 16, 8), (
                Target(VS_ONE_ADAPTER, AT_MOST, 1.15, "8 distinct adapters over one adapter", ISSUE_4), vs_peft)),
            Case("decode", "fwd", "bf16", dims(64, 4096, 4096, 16, 64), (
                Target(VS_ONE_ADAPTER, AT_MOST, 1.6, "64 distinct adapters over one adapter", ISSUE_4), vs_peft)),
            # fewer than SEGMENT_MIN_TOKENS_GPU tokens: the BGMV kernels, which the T = 64 cases never reach
            Case("decode", "fwd", "bf16", dims(8, 4096, 4096, 16, 8)),
            Case("decode", "fwd", "bf16", dims(1, 4096, 4096, 16, 1)),   # one sequence decoding
        ]
    # "≥ 3x faster than PEFT's mixed batch" read as what the adapters add to the base GEMM, which
    # both pay alike (PEFT's layer took 1.3-1.45x the base alone here).
    return [Case("decode", "fwd", "fp32", dims(64, 4096, 4096, 16, 32), (
        Target(OVERHEAD, AT_MOST, 1 / 3, "the adapters' cost over the base layer: fastpeft's over PEFT's", ISSUE_4),
        Target("fastpeft/base", AT_MOST, 1.10, "fastpeft's mixed batch over the base layer alone", ISSUE_4)))]


def variants(case: Case, device: str) -> Variants:
    T, K, N, r, U = (case.dims[k] for k in ("T", "K", "N", "r", "U"))
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(K, N, bias=False)
    peft_layer = peft_lora_layer(base, r, [f"a{u}" for u in range(U)])
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    layer = MultiLoRALinear(base, max_adapters=max(U, 1), max_rank=r).to(device)
    separate = LoRALinear(base, adapter_name=None)  # one adapter at a time, the fused single-adapter layer
    for u in range(U):
        a = torch.randn(r, K, generator=gen) / K ** 0.5
        b = torch.randn(N, r, generator=gen) / r ** 0.5
        layer.set_adapter(u, a, b, 2.0)
        separate.add_adapter(f"a{u}", r, 2 * r, init_lora_weights=False)
        with torch.no_grad():
            separate.lora_A[f"a{u}"].weight.copy_(a)
            separate.lora_B[f"a{u}"].weight.copy_(b)
            if peft_layer is not None:
                peft_layer.lora_A[f"a{u}"].weight.copy_(a)
                peft_layer.lora_B[f"a{u}"].weight.copy_(b)
    separate.to(device=device, dtype=dtype)
    if peft_layer is not None:
        peft_layer.to(device=device, dtype=dtype)
    x = torch.randn(T, K, generator=gen).to(device, dtype)
    slots = torch.arange(T) % U
    ids = slots.to(device)
    names = [f"a{u}" for u in slots.tolist()]
    groups = [(f"a{u}", torch.nonzero(slots == u).flatten().to(device)) for u in range(U)]

    def run_separately():
        out = torch.empty(T, N, device=device, dtype=dtype)
        for name, rows in groups:
            separate.set_adapter(name)
            out[rows] = separate(x[rows])

    out = with_faces({"base": lambda: F.linear(x, base.weight), "fastpeft": lambda: layer(x, ids)}, device,
                     reference=False)
    out["separately"] = run_separately
    if peft_layer is not None:
        out["peft"] = lambda: peft_layer(x, adapter_names=names)
    return under_no_grad(out)


def derive_ratios(rows: list[dict]) -> None:
    for row in rows:
        t = row["times_ms"]
        if {"base", "peft", "fastpeft"} <= t.keys() and t["peft"] > t["base"]:
            row["ratios"][OVERHEAD] = (t["fastpeft"] - t["base"]) / (t["peft"] - t["base"])
    one = next((row for row in rows if row["U"] == 1), None)
    for row in rows:
        if one is not None and row is not one and all(row[k] == one[k] for k in ("T", "K", "N", "r")):
            row["ratios"][VS_ONE_ADAPTER] = row["times_ms"]["fastpeft"] / one["times_ms"]["fastpeft"]


BENCH = BenchOp("multi_lora", cases, variants, baseline="base", peers=("peft", "separately"), reference=None,
                derive_ratios=derive_ratios)
