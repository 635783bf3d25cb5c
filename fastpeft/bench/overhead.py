"""Per-call overhead: a tiny layer (64x64, one token) in inference, where what a call costs besides
its arithmetic is the time. fastpeft's Linear4bit and LoRALinear beside ``nn.Linear`` on the same
shape, and the peers' layers (bitsandbytes' Linear4bit, PEFT's LoRA layer) on the same weights.

A decode step calls hundreds of such layers (SmolLM2-135M: 210 linear calls a token); on a GPU this
per-call cost is the decode. One call of a variant runs `layers` distinct layers on x, inside one
``no_grad`` block as a decode step's model does; times are per layer. The training case (LoRA's
forward and backward) has no target: it is tracked so that a faster inference path never makes
training slower.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import LoRALinear
from . import nf4_matmul
from .case import AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, default_dtype, layer_inputs, layer_stack, peft_lora_layer, with_faces

ISSUE_18 = "issue 18, Targets"
PER_CALL = Target("fastpeft/base", AT_MOST, 1.5, "per call over nn.Linear's, 64x64 layer, one token, inference",
                  ISSUE_18)
# Distinct layers a variant's call runs (a decode step's worth would be hundreds; 32 keeps a case
# under a second while each timed call is long enough to read with perf_counter).
LAYERS = 32
RANK = 8


def case(label: str, mode: str, dtype: str, layers: int = LAYERS, targets=()) -> Case:
    dims = dict(M=1, K=64, N=64) if label == "Linear4bit" else dict(M=1, K=64, N=64, r=RANK)
    return Case(label, mode, dtype, dims, tuple(targets), layers, modules="train" if mode == "fwd+bwd" else "eval")


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [case("LoRALinear", "fwd", default_dtype(device), layers=4)]
    dtypes = ("fp32", "bf16") if device == "cpu" else ("bf16",)
    out = [case(label, "fwd", dtype, targets=(PER_CALL,)) for dtype in dtypes for label in ("Linear4bit", "LoRALinear")]
    return out + [case("LoRALinear", "fwd+bwd", dtype) for dtype in dtypes]


def _lora_layers(case: Case, device: str) -> dict[str, list[nn.Module]]:
    """`layers` distinct nn.Linear ("base"), LoRALinear over each ("fastpeft") and PEFT's layer over
    each ("peft", when peft is installed), with the same adapter weights, in the case's mode."""
    K, N, r = (case.dims[k] for k in "KNr")
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    groups: dict[str, list[nn.Module]] = {"base": [], "fastpeft": [], "peft": []}
    for _ in range(case.layers):
        base = nn.Linear(K, N)
        peft_layer = peft_lora_layer(base, r)  # wraps the same base module: weights shared
        base = base.to(device, dtype).requires_grad_(False)
        layer = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, init_lora_weights=False).to(device, dtype)
        groups["base"].append(base)
        groups["fastpeft"].append(layer)
        if peft_layer is not None:
            peft_layer = peft_layer.to(device=device, dtype=dtype)
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
            groups["peft"].append(peft_layer)
    if not groups["peft"]:
        del groups["peft"]
    for group in groups.values():
        for layer in group:
            layer.train(case.training)
    return groups


def variants(case: Case, device: str) -> Variants:
    """One call runs every layer of a group on the same x: under one no_grad block for inference,
    forward and backward from a fixed dy for training."""
    if case.label == "Linear4bit":
        groups = nf4_matmul.build_layers(case, device)
        groups["base"] = groups.pop("linear")
    else:
        groups = _lora_layers(case, device)
    x, dy = layer_inputs(case, device)

    def stack(group):
        return layer_stack(group, x, dy, case.training)

    out = with_faces({"base": stack(groups["base"]), "fastpeft": stack(groups["fastpeft"])}, device)
    for peer in ("bitsandbytes", "peft"):
        if peer in groups:
            out[peer] = stack(groups[peer])
    return out


# A variant's call is 32 tiny layers (well under a millisecond): 301 interleaved rounds cost about a
# second per case, where the default 15 left medians that moved by +-15 % between runs on the 2-core CPU.
BENCH = BenchOp("overhead", cases, variants, baseline="base", peers=("bitsandbytes", "peft"), repetitions=(5, 301))
