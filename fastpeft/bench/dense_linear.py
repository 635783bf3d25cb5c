"""A full-precision layer a 4-bit model keeps (its output layer): torch's ``nn.Linear`` (the
baseline, and the op's reference, F.linear) beside fastpeft's DenseLinear on the same weight, in
inference (eval mode, no_grad)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import backends
from ..nn import DenseLinear
from .case import BenchOp, Case, Variants
from .variants import DTYPES, layer_inputs, layer_stack, with_faces

# SmolLM2-135M's output layer: its 49152-token vocabulary over hidden 576 (56.6 MB in bf16, more
# than a CPU's last-level cache: it streams from memory at every generated token).
OUTPUT_LAYER = dict(K=576, N=49152)


def dims(M: int, K: int, N: int) -> dict:
    """M rows of x, K in_features, N out_features."""
    return dict(M=M, K=K, N=N)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [Case("quick", "fwd", "bf16", dims(1, 64, 256), modules="eval")]
    return [Case("output layer", "fwd", "bf16", dims(1, **OUTPUT_LAYER), modules="eval"),
            Case("output layer", "fwd", "bf16", dims(4, **OUTPUT_LAYER), modules="eval"),
            Case("output layer", "fwd", "fp32", dims(1, **OUTPUT_LAYER), modules="eval")]


def variants(case: Case, device: str) -> Variants:
    M, K, N = (case.dims[k] for k in "MKN")
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
    linear = linear.to(device, DTYPES[case.dtype]).eval().requires_grad_(False)
    dense = DenseLinear.from_linear(linear)  # the same weight tensor
    x, dy = layer_inputs(case, device)
    return with_faces({"linear": layer_stack([linear], x, dy, False), "fastpeft": layer_stack([dense], x, dy, False)},
                      device, reference=False)


def cpu_path(case: Case, face: str) -> str:
    """The CPU kernel's path for the case's shape, when the C++ CPU face ran it."""
    ext = backends.extension()
    if face != "cpu" or ext is None:
        return ""
    return ext.dense_cpu_path(case.dims["M"], str(DTYPES[case.dtype]).removeprefix("torch."))


# The reference is F.linear, what the baseline nn.Linear runs: the baseline column is it.
BENCH = BenchOp("dense_linear", cases, variants, baseline="linear", reference=None, face_detail=cpu_path)
