"""A layer with a 4-bit NF4 base weight (QLoRA's): the unquantised ``nn.Linear`` in the case's dtype,
fastpeft's Linear4bit, and bitsandbytes' Linear4bit on the same weights, at its best.

Inference cases run every module in eval mode under no_grad: bitsandbytes repacks its weight for
its fast CPU kernel only so. Training cases take one step through the frozen 4-bit layer (dx) with
every module in training mode, as QLoRA runs it."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import backends
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target, Variants
from .variants import DTYPES, layer_inputs, layer_stack, with_faces

BLOCKSIZE = 64
ISSUE_5 = "issue 5, Benchmarks"
ISSUE_12 = "issue 12, Targets"
# Distinct weights one decode call runs: together twice the last-level cache or more (8 x 8.3 MiB
# against 32 MiB of L3 on the CPU measured; 8 x 28 MiB against an H200's 50 MiB of L2), so every
# layer streams its weight from memory as in a real model. With one weight it stayed in the L3.
DECODE_LAYERS = 8


def dims(M: int, K: int, N: int) -> dict:
    return dict(M=M, K=K, N=N)


def case(label: str, mode: str, dtype: str, dims: dict, targets=(), layers: int = 1) -> Case:
    return Case(label, mode, dtype, dims, tuple(targets), layers, modules="train" if mode == "fwd+bwd" else "eval")


def _cpu_isa_supported() -> str:
    """What the CPU offers (not the FASTPEFT_CPU_ISA cap): it decides how fast torch's bf16 matmul
    and bitsandbytes are, so which targets apply."""
    ext = backends.extension()
    return ext.cpu_isa_supported() if ext is not None else "portable"


def vs_linear(direction: str, limit: float, compares: str, source: str) -> Target:
    ratio = "linear/fastpeft" if direction == AT_LEAST else "fastpeft/linear"
    return Target(ratio, direction, limit, compares, source)


def vs_bitsandbytes(limit: float, compares: str, source: str) -> Target:
    return Target("fastpeft/bitsandbytes", AT_MOST, limit, compares, source)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [case("quick", "fwd", "bf16", dims(1, 256, 256))]
    if device == "cuda":  # "linear" is the bf16 cuBLAS layer
        return [
            case("decode", "fwd", "bf16", dims(1, 4096, 14336), (
                vs_linear(AT_LEAST, 3.2, "bf16 cuBLAS over fastpeft NF4, batch 1", ISSUE_5),
                vs_bitsandbytes(0.8, "fastpeft over bitsandbytes, batch 1", ISSUE_5)), layers=DECODE_LAYERS),
            case("decode", "fwd", "bf16", dims(16, 4096, 14336), (
                vs_linear(AT_LEAST, 3.0, "bf16 cuBLAS over fastpeft NF4, M = 16", ISSUE_5),), layers=DECODE_LAYERS),
            case("prefill", "fwd", "bf16", dims(512, 4096, 14336), (
                vs_linear(AT_MOST, 1.10, "fastpeft NF4 forward over bf16 cuBLAS, M >= 512", ISSUE_5),)),
        ]
    # A bf16 model's layer (x and nn.Linear in bf16; NF4 computing in bf16, as bitsandbytes'
    # compute_dtype). The targets depend on the CPU: with AVX512_BF16 torch's bf16 GEMM is 4-5x its
    # fp32 one and bitsandbytes has a fast kernel; on an AVX2 CPU neither.
    if _cpu_isa_supported() == "avx512_bf16":
        where = ", on a CPU with AVX512_BF16"
        faster = {m: vs_bitsandbytes(1.0, f"fastpeft over bitsandbytes' eval path, M = {m}{where}", ISSUE_12)
                  for m in (1, 16, 64)}
        targets = {1: [vs_linear(AT_MOST, 0.5, f"fastpeft over bf16 nn.Linear, M = 1{where}", ISSUE_12), faster[1]],
                   16: [vs_linear(AT_MOST, 1.0, f"fastpeft over bf16 nn.Linear, M = 16{where}", ISSUE_12), faster[16]],
                   64: [vs_linear(AT_MOST, 1.0, f"fastpeft over bf16 nn.Linear, M = 64{where}", ISSUE_12), faster[64]]}
    else:
        where = ", on an AVX2-only CPU"
        targets = {1: [vs_linear(AT_MOST, 0.5, f"fastpeft over bf16 nn.Linear, M = 1{where}", ISSUE_12)], 16: [],
                   64: [vs_linear(AT_MOST, 0.5, f"fastpeft over bf16 nn.Linear, M = 64{where}", ISSUE_12)]}
    # fp32 activations (exact fp32 levels) are measured beside their own fp32 nn.Linear, without a
    # target; the training row shows bitsandbytes' training path (it has no fast CPU kernel there).
    return [case("decode", "fwd", "bf16", dims(1, 4096, 4096), targets[1], layers=DECODE_LAYERS),
            case("decode", "fwd", "bf16", dims(16, 4096, 4096), targets[16], layers=DECODE_LAYERS),
            case("prefill", "fwd", "bf16", dims(64, 4096, 4096), targets[64], layers=DECODE_LAYERS),
            case("decode", "fwd", "fp32", dims(1, 4096, 4096), layers=DECODE_LAYERS),
            case("training", "fwd+bwd", "bf16", dims(64, 4096, 4096), layers=2)]


def build_layers(case: Case, device: str) -> dict[str, list[nn.Module]]:
    """The case's `layers` weights as nn.Linear in its dtype ("linear"), fastpeft's Linear4bit
    ("fastpeft") and bitsandbytes' Linear4bit ("bitsandbytes", when it is installed and has a backend
    here), every module in the case's mode: eval for inference, training for a training step."""
    from ..nn.linear4bit import Linear4bit

    M, K, N = (case.dims[k] for k in "MKN")
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(N, K, generator=gen).div_(K ** 0.5).to(dtype) for _ in range(case.layers)]
    layers: dict[str, list[nn.Module]] = {"linear": [], "fastpeft": []}
    for w in weights:
        linear = nn.Linear(K, N, bias=False, device="meta").to_empty(device=device).to(dtype)
        linear.weight.data.copy_(w)  # the unquantised layer
        linear.requires_grad_(False)
        layers["linear"].append(linear)
        layers["fastpeft"].append(Linear4bit.from_linear(linear, BLOCKSIZE, double_quant=True).to(device))
    try:
        import bitsandbytes as bnb

        peers = []
        for w in weights:
            peer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
            peer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=True, blocksize=BLOCKSIZE)
            peers.append(peer.to(device))
        layers["bitsandbytes"] = peers
    except Exception:  # bitsandbytes absent or without a backend for this device: no peer column
        pass
    for group in layers.values():
        for layer in group:
            layer.train(case.training)
    return layers


def variants(case: Case, device: str, layers: dict[str, list[nn.Module]] | None = None) -> Variants:
    """One call of each variant runs the case's `layers` weights on x, one after the other:
    inference cases under no_grad, training cases with dx (see :func:`build_layers`)."""
    layers = layers or build_layers(case, device)
    x, dy = layer_inputs(case, device)

    def stack(group):
        return layer_stack(group, x, dy, case.training)

    out = with_faces({"linear": stack(layers["linear"]), "fastpeft": stack(layers["fastpeft"])}, device,
                     reference=False)
    if "bitsandbytes" in layers:
        out["bitsandbytes"] = stack(layers["bitsandbytes"])
    return out


def cpu_path(case: Case, face: str) -> str:
    """The CPU kernel's path for the case's forward shape, when the C++ CPU face ran it."""
    ext = backends.extension()
    if face != "cpu" or ext is None:
        return ""
    M, K = case.dims["M"], case.dims["K"]
    return ext.nf4_cpu_path(M, K, BLOCKSIZE, str(DTYPES[case.dtype]).removeprefix("torch."))


BENCH = BenchOp("nf4_matmul", cases, variants, baseline="linear", peers=("bitsandbytes",), reference=None,
                face_detail=cpu_path)
