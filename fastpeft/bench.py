"""Kernel microbenchmarks: each fastpeft face beside the base op, the reference and the peer.

Used by ``fastpeft bench`` (table, JSON, optional plot) and by the pytest-benchmark harness in
``benchmarks/``. Every row times all variants of one case in the same run, so the ratios compare
like with like.
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, backends
from .nn import LoRALinear

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoRACase:
    M: int
    K: int
    N: int
    r: int
    dtype: str
    mode: str  # "fwd" (inference, no autograd) or "fwd+bwd" (training step of one layer)
    label: str = ""
    # (numerator, denominator, limit): the brief's targets, checked and reported, never asserted.
    targets: list = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"


def lora_cases(device: str, quick: bool) -> list[LoRACase]:
    if quick:
        return [LoRACase(64, 256, 256, 8, "fp32" if device == "cpu" else "bf16", mode, "quick")
                for mode in ("fwd", "fwd+bwd")]
    if device == "cuda":
        return [
            LoRACase(4096, 4096, 4096, 16, "bf16", "fwd", "prefill",
                     [("fastpeft", "base", 1.05), ("fastpeft", "peft", 1 / 1.3)]),
            LoRACase(4096, 4096, 4096, 16, "bf16", "fwd+bwd", "training",
                     [("fastpeft", "base", 1.10), ("fastpeft", "peft", 1 / 1.3)]),
            LoRACase(1, 4096, 4096, 16, "bf16", "fwd", "decode", [("fastpeft", "peft", 1 / 1.3)]),
            LoRACase(16, 4096, 4096, 16, "bf16", "fwd", "decode", [("fastpeft", "peft", 1 / 1.3)]),
        ]
    # CPU: the GPU's square 4096³ shape scaled to 1024³ (64× less work: a 4096³ step takes seconds
    # here), and a wider layer with fewer tokens; the fp32 targets are the brief's.
    return [
        LoRACase(1024, 1024, 1024, 16, "fp32", "fwd", "prefill", [("fastpeft", "peft", 0.95)]),
        LoRACase(1024, 1024, 1024, 16, "fp32", "fwd+bwd", "training", [("fastpeft", "peft", 0.95)]),
        LoRACase(512, 2048, 2048, 16, "fp32", "fwd", "prefill-wide"),
        LoRACase(512, 2048, 2048, 16, "fp32", "fwd+bwd", "training-wide"),
        LoRACase(1, 4096, 4096, 16, "fp32", "fwd", "decode"),
    ]


def _peft_layer(base: nn.Linear, r: int, adapter_names=("default",)):
    """PEFT's LoRA layer around `base` (shared, not copied) with one adapter per name; None without peft."""
    try:
        import peft
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    def config():
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)

    model = peft.get_peft_model(Holder(), config(), adapter_name=adapter_names[0])
    for name in adapter_names[1:]:
        model.add_adapter(name, config())
    return model.base_model.model.proj


def _speed_faces(device: str) -> list[str]:
    """The fast faces worth timing on `device` (the Triton interpreter is a test tool, not a speed)."""
    return [f for f in ("triton", "cuda", "cpu")
            if backends.availability(f, torch.device(device)).usable and not (f == "triton" and device == "cpu")]


def _on_backend(face: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run():
        with backends.use_backend(face):
            fn()
    return run


def _inference(variants: dict[str, Callable[[], None]]) -> dict[str, Callable[[], None]]:
    """The same variants, each run under torch.no_grad() (serving: no autograd graph is built)."""
    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run
    return {name: no_grad(fn) for name, fn in variants.items()}


def lora_variants(case: LoRACase, device: str) -> dict[str, Callable[[], None]]:
    """One callable per variant, each running one iteration of the case on shared weights."""
    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(case.K, case.N, bias=False)
    peft_layer = _peft_layer(base, case.r)  # wraps the same base module: weights shared
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    layer = LoRALinear.from_linear(base, r=case.r, lora_alpha=2 * case.r, init_lora_weights=False).to(device, dtype)
    if peft_layer is not None:
        peft_layer = peft_layer.to(device=device, dtype=dtype)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(case.M, case.K, generator=gen).to(device, dtype)
    dy = torch.randn(case.M, case.N, generator=gen).to(device, dtype)
    train = case.mode == "fwd+bwd"
    if train:
        x.requires_grad_(True)

    def step(fn):
        def run():
            if train:
                fn(x).backward(dy)
            else:
                with torch.no_grad():
                    fn(x)
        return run

    variants = {"base": step(lambda t: F.linear(t, base.weight)), "fastpeft": step(layer)}
    variants.update({f"fastpeft[{f}]": _on_backend(f, variants["fastpeft"]) for f in _speed_faces(device)})
    variants["reference"] = _on_backend("torch", variants["fastpeft"])
    if peft_layer is not None:
        variants["peft"] = step(peft_layer)
    return variants


def _time_once_ms(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_variants_ms(variants: dict[str, Callable[[], None]], device: str, warmup: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each variant (CUDA events on the GPU).

    Variants run interleaved, one call each per round, so clock and cache drift over the run hits
    them all alike (timing them one after another gave ±20 % swings between identical variants on
    the 2-core CPU). Each round's order is shuffled (seeded): rotating by one left each variant
    behind the same predecessor nearly every round, and what ran before matters (an NF4 decode was
    7 % slower right after the bf16 nn.Linear than after itself)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            samples[name].append(_time_once_ms(variants[name], device))
    return {name: statistics.median(samples[name]) for name in names}


def auto_face(case: LoRACase, device: str) -> str:
    from .ops.lora_linear import lora_linear_fwd

    t = torch.empty(case.M, case.K, device="meta")
    return lora_linear_fwd.select(torch.device(device), t, t.new_empty(case.N, case.K), None,
                                  t.new_empty(case.r, case.K), t.new_empty(case.N, case.r), 1.0, None)


def _timed(cases, make_variants, device: str, quick: bool, progress, describe):
    """(case, {variant: ms}) for each case, its variants timed together; the progress bar follows."""
    warmup, rounds = (1, 3) if quick else ((10, 100) if device == "cuda" else (2, 15))
    for case in cases:
        variants = make_variants(case, device)
        if progress is not None:
            progress.set_postfix_str(describe(case))
        times = time_variants_ms(variants, device, warmup, rounds)
        if progress is not None:
            progress.update(1)
        yield case, times


def run_lora(device: str, quick: bool, progress=None) -> list[dict]:
    rows = []
    for case, times in _timed(lora_cases(device, quick), lora_variants, device, quick, progress,
                              lambda c: f"lora_linear {c.label} {c.mode}"):
        ratios = _ratios(times, [("fastpeft", "base"), ("fastpeft", "peft"), ("fastpeft", "reference")])
        rows.append(_row("lora_linear", case, auto_face(case, device), times, ratios))
    return rows


def _row(op: str, case, auto_face: str, times: dict, ratios: dict) -> dict:
    """One result row: the case's fields, its shape, the face the rule picks, times, ratios and targets."""
    fields = {k: v for k, v in asdict(case).items() if k != "targets"}
    return dict(op=op, **fields, shape=case.shape, auto_face=auto_face, times_ms=times, ratios=ratios,
                targets=_targets(ratios, case.targets))


def _ratios(times: dict, pairs) -> dict:
    return {f"{a}/{b}": times[a] / times[b] for a, b in pairs if a in times and b in times}


def _targets(ratios: dict, wanted) -> list[dict]:
    """[(numerator, denominator, limit)] -> records of the measured ratio against its limit."""
    return [dict(ratio=f"{a}/{b}", limit=limit, value=ratios.get(f"{a}/{b}"),
                 met=None if f"{a}/{b}" not in ratios else ratios[f"{a}/{b}"] <= limit) for a, b, limit in wanted]


def count_cases(device: str, quick: bool, ops=None) -> int:
    return sum(len(cases(device, quick)) for op, (cases, _) in SUITES.items() if ops is None or op in ops)


def run_suites(device: str, quick: bool, ops=None, progress=None) -> list[dict]:
    """Result rows of every op's cases (or those of `ops`, names of :data:`SUITES`), in SUITES' order."""
    return [row for op, (_, run) in SUITES.items() if ops is None or op in ops
            for row in run(device, quick, progress)]


def environment(device: str) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
               fastpeft=__version__, torch=torch.__version__, triton=version("triton"), peft=version("peft"),
               python=platform.python_version(), cpu=backends.cpu_model(), cpu_threads=torch.get_num_threads())
    ext = backends.extension()
    if ext is not None:  # what the CPU kernels found and use: every CPU figure names its CPU
        env.update(cpu_isa_supported=ext.cpu_isa_supported(),
                   cpu_features=sorted(k for k, v in ext.cpu_features().items() if v))
        try:
            env["cpu_isa"] = ext.cpu_isa()
        except RuntimeError as e:  # an unknown FASTPEFT_CPU_ISA: the NF4 rows failed loudly already
            env["cpu_isa"] = str(e)
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    return env


def format_table(rows: list[dict]) -> str:
    names, ratio_keys = [], []
    for row in rows:
        names += [n for n in row["times_ms"] if n not in names]
        ratio_keys += [k for k in row["ratios"] if k not in ratio_keys]
    header = ["op", "case", "shape", "dtype", "mode", "auto"] + [f"{n} ms" for n in names] + ratio_keys
    lines = [header]
    for row in rows:
        t, q = row["times_ms"], row["ratios"]
        mode = row["mode"] + (f" ({row['modules']})" if "modules" in row else "")
        lines.append([row["op"], row["label"], row["shape"], row["dtype"], mode, row["auto_face"]] +
                     [f"{t[n]:.3f}" if n in t else "-" for n in names] +
                     [f"{q[k]:.3f}" if k in q else "-" for k in ratio_keys])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for row in rows:
        for tgt in row["targets"]:
            if tgt["value"] is not None:
                out.append(f"target {row['op']} {row['label']} {row['mode']}: {tgt['ratio']} = {tgt['value']:.3f} "
                           f"(limit {tgt['limit']:.3f}) {'met' if tgt['met'] else 'NOT met'}")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        names = list(row["times_ms"])
        ax.bar(range(len(names)), [row["times_ms"][n] for n in names],
               color=["#999999" if n == "base" else "#1f77b4" if n.startswith("fastpeft") else "#ff7f0e" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{row['op']} {row['label']} {row['mode']}\n{row['shape']} {row['dtype']}", fontsize=9)
        ax.set_ylabel("ms (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(rows: list[dict], env: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dict(environment=env, results=rows), f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- mixed-adapter batches

@dataclass
class MultiLoRACase:
    T: int          # tokens (decode: one per request)
    K: int
    N: int
    r: int
    U: int          # distinct adapters in the batch
    dtype: str
    label: str = ""
    mode: str = "fwd"
    targets: list = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"T={self.T} K={self.K} N={self.N} r={self.r} U={self.U}"


def multi_lora_cases(device: str, quick: bool) -> list[MultiLoRACase]:
    if quick:
        return [MultiLoRACase(16, 128, 128, 8, 4, "fp32" if device == "cpu" else "bf16", "quick")]
    if device == "cuda":
        return [MultiLoRACase(64, 4096, 4096, 16, u, "bf16", "decode",
                              targets=[("fastpeft", "peft", 1 / 5)] if u >= 8 else []) for u in (1, 8, 64)]
    # The brief's CPU targets: what the adapters add to the base layer at most a third of what they
    # add in PEFT (whose layer took 1.3-1.45x the base alone here), and at most 10 % of the base.
    return [MultiLoRACase(64, 4096, 4096, 16, 32, "fp32", "decode",
                          targets=[("overhead fastpeft", "peft", 1 / 3), ("fastpeft", "base", 1.10)])]


def multi_lora_variants(case: MultiLoRACase, device: str) -> dict[str, Callable[[], None]]:
    from .nn import MultiLoRALinear

    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(case.K, case.N, bias=False)
    peft_layer = _peft_layer(base, case.r, [f"a{u}" for u in range(case.U)])
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    layer = MultiLoRALinear(base, max_adapters=max(case.U, 1), max_rank=case.r).to(device)
    separate = LoRALinear(base, adapter_name=None)  # one adapter at a time, the fused single-adapter layer
    for u in range(case.U):
        a = torch.randn(case.r, case.K, generator=gen) / case.K ** 0.5
        b = torch.randn(case.N, case.r, generator=gen) / case.r ** 0.5
        layer.set_adapter(u, a, b, 2.0)
        separate.add_adapter(f"a{u}", case.r, 2 * case.r, init_lora_weights=False)
        with torch.no_grad():
            separate.lora_A[f"a{u}"].weight.copy_(a)
            separate.lora_B[f"a{u}"].weight.copy_(b)
            if peft_layer is not None:
                peft_layer.lora_A[f"a{u}"].weight.copy_(a)
                peft_layer.lora_B[f"a{u}"].weight.copy_(b)
    separate.to(device=device, dtype=dtype)
    if peft_layer is not None:
        peft_layer.to(device=device, dtype=dtype)
    x = torch.randn(case.T, case.K, generator=gen).to(device, dtype)
    slots = torch.arange(case.T) % case.U
    ids = slots.to(device)
    names = [f"a{u}" for u in slots.tolist()]
    groups = [(f"a{u}", torch.nonzero(slots == u).flatten().to(device)) for u in range(case.U)]

    def run_separately():
        out = torch.empty(case.T, case.N, device=device, dtype=dtype)
        for name, rows in groups:
            separate.set_adapter(name)
            out[rows] = separate(x[rows])

    variants = {"base": lambda: F.linear(x, base.weight), "fastpeft": lambda: layer(x, ids)}
    variants.update({f"fastpeft[{f}]": _on_backend(f, variants["fastpeft"]) for f in _speed_faces(device)})
    variants["separately"] = run_separately
    if peft_layer is not None:
        variants["peft"] = lambda: peft_layer(x, adapter_names=names)
    return _inference(variants)


def run_multi_lora(device: str, quick: bool, progress=None) -> list[dict]:
    rows = []
    for case, times in _timed(multi_lora_cases(device, quick), multi_lora_variants, device, quick, progress,
                              lambda c: f"multi_lora {c.label} U={c.U}"):
        ratios = _ratios(times, [("fastpeft", "base"), ("fastpeft", "peft"), ("fastpeft", "separately")])
        if {"base", "peft", "fastpeft"} <= times.keys() and times["peft"] > times["base"]:
            # what the adapters add on top of the base GEMM: ours over PEFT's
            ratios["overhead fastpeft/peft"] = (times["fastpeft"] - times["base"]) / (times["peft"] - times["base"])
        rows.append(_row("multi_lora", case, "bgmv/sgmv", times, ratios))
    # GPU targets across cases: time with U adapters over time with one (same shape)
    one = next((r for r in rows if r["U"] == 1), None)
    for row in rows:
        if one is not None and row is not one:
            limit = 1.15 if row["U"] <= 8 else 1.6
            value = row["times_ms"]["fastpeft"] / one["times_ms"]["fastpeft"]
            row["ratios"]["fastpeft/fastpeft@U=1"] = value
            row["targets"].append(dict(ratio="fastpeft/fastpeft@U=1", limit=limit, value=value, met=value <= limit))
    return rows


# ---------------------------------------------------------------- NF4 base weights (QLoRA)

@dataclass
class NF4Case:
    M: int
    K: int
    N: int
    dtype: str
    label: str = ""
    # "fwd": inference, every module in eval mode under no_grad (bitsandbytes repacks its weight for
    # its fast CPU kernel only so); "fwd+bwd": a training step through the frozen 4-bit layer (dx),
    # every module in training mode, as QLoRA runs it.
    mode: str = "fwd"
    targets: list = field(default_factory=list)
    # Distinct weights one call runs back to back, as a model's decode step does: together they
    # are twice the last-level cache or more (8 x 8.3 MiB against 32 MiB of L3 here; 8 x 28 MiB
    # against an H200's 50 MiB of L2), so every layer streams its weight from memory as in a real
    # model; times are reported per layer. With one weight the NF4 weight stayed in this CPU's L3.
    layers: int = 1

    @property
    def modules(self) -> str:
        return "train" if self.mode == "fwd+bwd" else "eval"

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N}" + (f" x{self.layers} layers" if self.layers > 1 else "")


def _cpu_isa_supported() -> str:
    """What the CPU offers (not the FASTPEFT_CPU_ISA cap): it decides how fast torch's bf16 matmul
    and bitsandbytes are, so which targets apply."""
    ext = backends.extension()
    return ext.cpu_isa_supported() if ext is not None else "portable"


def nf4_cases(device: str, quick: bool) -> list[NF4Case]:
    if quick:
        return [NF4Case(1, 256, 256, "bf16", "quick")]
    if device == "cuda":  # the brief's shapes; ratios read "fastpeft/linear": the bf16 cuBLAS layer
        return [NF4Case(1, 4096, 14336, "bf16", "decode", targets=[("fastpeft", "linear", 1 / 3.2),
                                                                   ("fastpeft", "bitsandbytes", 0.8)], layers=8),
                NF4Case(16, 4096, 14336, "bf16", "decode", targets=[("fastpeft", "linear", 1 / 3.0)], layers=8),
                NF4Case(512, 4096, 14336, "bf16", "prefill", targets=[("fastpeft", "linear", 1.10)])]
    # A bf16 model's layer (x and nn.Linear in bf16; NF4 with bf16 compute, as bitsandbytes'
    # compute_dtype), bitsandbytes at its best (eval mode: on an AVX512_BF16 CPU its repacked
    # weight and bf16 kernel). The targets depend on the CPU: with AVX512_BF16, torch's bf16 GEMM
    # is 4-5x its fp32 one and bitsandbytes has a fast kernel; on an AVX2 CPU neither.
    if _cpu_isa_supported() == "avx512_bf16":
        targets = {1: [("fastpeft", "linear", 0.5), ("fastpeft", "bitsandbytes", 1.0)],
                   16: [("fastpeft", "linear", 1.0), ("fastpeft", "bitsandbytes", 1.0)],
                   64: [("fastpeft", "linear", 1.0), ("fastpeft", "bitsandbytes", 1.0)]}
    else:
        targets = {1: [("fastpeft", "linear", 0.5)], 16: [], 64: [("fastpeft", "linear", 0.5)]}
    # fp32 activations (exact fp32 levels) are measured beside their own fp32 nn.Linear, without a
    # target; the training row shows bitsandbytes' training path (no fast CPU kernel there).
    return [NF4Case(1, 4096, 4096, "bf16", "decode", targets=targets[1], layers=8),
            NF4Case(16, 4096, 4096, "bf16", "decode", targets=targets[16], layers=8),
            NF4Case(64, 4096, 4096, "bf16", "prefill", targets=targets[64], layers=8),
            NF4Case(1, 4096, 4096, "fp32", "decode", layers=8),
            NF4Case(64, 4096, 4096, "bf16", "training", mode="fwd+bwd", layers=2)]


def nf4_layers(case: NF4Case, device: str) -> dict[str, list[nn.Module]]:
    """The case's `layers` weights as bf16/fp32 nn.Linear ("linear"), fastpeft's Linear4bit
    ("fastpeft") and bitsandbytes' Linear4bit ("bitsandbytes", when it is installed and has a backend
    here), each in the case's mode: eval for inference, training for a training step."""
    from .nn.linear4bit import Linear4bit

    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(case.N, case.K, generator=gen).div_(case.K ** 0.5).to(dtype) for _ in range(case.layers)]
    layers: dict[str, list[nn.Module]] = {"linear": [], "fastpeft": []}
    for w in weights:
        linear = nn.Linear(case.K, case.N, bias=False, device="meta").to_empty(device=device).to(dtype)
        linear.weight.data.copy_(w)  # the unquantised layer
        linear.requires_grad_(False)
        layers["linear"].append(linear)
        layers["fastpeft"].append(Linear4bit.from_linear(linear, 64, double_quant=True).to(device))  # computes in dtype
    try:
        import bitsandbytes as bnb

        refs = []
        for w in weights:
            ref = bnb.nn.Linear4bit(case.K, case.N, bias=False, compute_dtype=dtype, quant_type="nf4",
                                    compress_statistics=True)
            ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64)
            refs.append(ref.to(device))
        layers["bitsandbytes"] = refs
    except Exception:  # bitsandbytes absent or without a backend for this device: no peer column
        pass
    for group in layers.values():
        for layer in group:
            layer.train(case.mode == "fwd+bwd")
    return layers


def nf4_variants(case: NF4Case, device: str, layers: dict[str, list[nn.Module]] | None = None
                 ) -> dict[str, Callable[[], None]]:
    """One call of each variant runs the case's `layers` weights on x, one after the other:
    inference cases under no_grad, training cases with dx (see :func:`nf4_layers`)."""
    layers = layers or nf4_layers(case, device)
    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(1)
    train = case.mode == "fwd+bwd"
    x = torch.randn(case.M, case.K, generator=gen).to(device, dtype).requires_grad_(train)
    dy = torch.randn(case.M, case.N, generator=gen).to(device, dtype)

    def stack(group):
        def run():
            for layer in group:
                if train:
                    layer(x).backward(dy)
                else:
                    with torch.no_grad():
                        layer(x)
        return run

    variants = {name: stack(group) for name, group in layers.items() if name != "bitsandbytes"}
    variants.update({f"fastpeft[{f}]": _on_backend(f, variants["fastpeft"]) for f in _speed_faces(device)})
    if "bitsandbytes" in layers:
        variants["bitsandbytes"] = stack(layers["bitsandbytes"])
    return variants


def run_nf4(device: str, quick: bool, progress=None) -> list[dict]:
    rows = []
    for case, times in _timed(nf4_cases(device, quick), nf4_variants, device, quick, progress,
                              lambda c: f"nf4_matmul {c.label} M={c.M}"):
        times = {name: ms / case.layers for name, ms in times.items()}  # per layer
        ratios = _ratios(times, [("fastpeft", "linear"), ("fastpeft", "bitsandbytes")])
        row = _row("nf4_matmul", case, auto_nf4_face(case, device), times, ratios)
        row["modules"] = case.modules
        rows.append(row)
    return rows


def auto_nf4_face(case: NF4Case, device: str) -> str:
    from .ops.nf4_matmul import nf4_matmul

    x = torch.empty(case.M, case.K, device="meta")  # the rule reads shapes only
    face = nf4_matmul.select(torch.device(device), x, None, None, None, 64, case.N)
    ext = backends.extension()
    if face == "cpu" and ext is not None:  # and the CPU path its shape takes (the forward's)
        face += f" ({ext.nf4_cpu_path(case.M, case.K, 64, str(DTYPE_NAMES[case.dtype]).removeprefix('torch.'))})"
    return face


# ---------------------------------------------------------------- PHM linear (Compacter)

@dataclass
class PHMCase:
    M: int
    K: int          # in_features
    N: int          # out_features
    n: int          # phm_dim
    rank: int | None  # phm_rank; None: full Bᵢ
    dtype: str
    label: str = ""
    mode: str = "fwd+bwd"
    targets: list = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} n={self.n} r={self.rank or 'full'}"


def phm_cases(device: str, quick: bool) -> list[PHMCase]:
    # The brief's targets: ≥ 3× faster than materialising W, and no slower than a same-shape nn.Linear.
    targets = [("fastpeft", "reference", 1 / 3), ("fastpeft", "linear", 1.0)]
    if quick:
        return [PHMCase(64, 256, 256, 4, 1, "fp32" if device == "cpu" else "bf16", "quick")]
    if device == "cuda":
        return [PHMCase(4096, 4096, 4096, n, rank, "bf16", "compacter" if rank else "full-B", targets=targets)
                for n, rank in ((4, 1), (8, 1), (8, None))]
    return [PHMCase(512, k, k, n, rank, "fp32", "compacter++" if rank else "full-B", targets=targets)
            for k, n, rank in ((1024, 4, 1), (1024, 8, 1), (2048, 8, 1), (1024, 4, None), (2048, 8, None))]


def phm_variants(case: PHMCase, device: str) -> dict[str, Callable[[], None]]:
    """One training step of one layer each: PHMLinear (factored), the materialised reference, and a
    trainable nn.Linear of the same shape (what a dense projection costs)."""
    from .nn import PHMLinear

    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    layer = PHMLinear(case.K, case.N, case.n, phm_rank=case.rank).to(device, dtype)
    linear = nn.Linear(case.K, case.N).to(device, dtype)
    x = torch.randn(case.M, case.K, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(case.M, case.N, generator=gen).to(device, dtype)
    variants = {"linear": lambda: linear(x).backward(dy), "fastpeft": lambda: layer(x).backward(dy)}
    variants.update({f"fastpeft[{f}]": _on_backend(f, variants["fastpeft"]) for f in _speed_faces(device)})
    variants["reference"] = _on_backend("torch", variants["fastpeft"])
    return variants


def run_phm(device: str, quick: bool, progress=None) -> list[dict]:
    from .ops.phm_linear import phm_linear_fwd

    rows = []
    for case, times in _timed(phm_cases(device, quick), phm_variants, device, quick, progress,
                              lambda c: f"phm_linear {c.label} n={c.n}"):
        ratios = _ratios(times, [("fastpeft", "reference"), ("fastpeft", "linear")])
        t = torch.empty(case.M, case.K, device="meta")
        face = phm_linear_fwd.select(torch.device(device), t, t.new_empty(case.n, case.n, case.n),
                                     None if case.rank else t.new_empty(case.n, case.N // case.n, case.K // case.n))
        rows.append(_row("phm_linear", case, face, times, ratios))
    return rows


# ---------------------------------------------------------------- the whole adapter block

@dataclass
class AdapterBlockCase:
    M: int          # tokens
    D: int          # hidden size: a sequential block reads h itself, so in = out = D
    R: int          # bottleneck width
    activation: str
    dtype: str
    label: str = ""
    mode: str = "fwd"
    targets: list = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"M={self.M} D={self.D} R={self.R} {self.activation}"


def adapter_block_cases(device: str, quick: bool) -> list[AdapterBlockCase]:
    if quick:
        return [AdapterBlockCase(64, 256, 16, "relu", "fp32" if device == "cpu" else "bf16", "quick")]
    if device == "cuda":
        # The brief's target: the whole block (reading x, writing y) within 1.3x of copying x.
        copy = [("fastpeft", "copy", 1.3)]
        return [AdapterBlockCase(4096, 4096, 64, "relu", "bf16", "rf64", targets=copy),
                AdapterBlockCase(4096, 4096, 256, "relu", "bf16", "rf16", targets=copy),
                AdapterBlockCase(4096, 4096, 64, "relu", "bf16", "rf64", "fwd+bwd")]
    # CPU: no target in the brief; the rows say what folding the epilogues into the GEMMs buys.
    return [AdapterBlockCase(1024, 1024, 64, "relu", "fp32", "rf16"),
            AdapterBlockCase(1024, 1024, 64, "relu", "fp32", "rf16", "fwd+bwd"),
            AdapterBlockCase(512, 2048, 128, "gelu", "fp32", "rf16")]


def adapter_block_variants(case: AdapterBlockCase, device: str) -> dict[str, Callable[[], None]]:
    """A sequential block on h: fastpeft's op (each face), the unfused reference, and ``x.clone()``."""
    from .ops.adapter_block import adapter_block

    dtype = DTYPE_NAMES[case.dtype]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)
    x = rnd(case.M, case.D)
    w_down, b_down = rnd(case.R, case.D, scale=case.D ** -0.5), rnd(case.R)
    w_up, b_up = rnd(case.D, case.R, scale=case.R ** -0.5), rnd(case.D)
    train = case.mode == "fwd+bwd"
    if train:
        for t in (x, w_down, b_down, w_up, b_up):
            t.requires_grad_(True)
    dy = rnd(case.M, case.D)

    def block():
        y = adapter_block(x, x, w_down, b_down, w_up, b_up, 1.0, case.activation)
        if train:
            y.backward(dy)

    variants = {"copy": lambda: x.detach().clone(), "fastpeft": block}
    variants.update({f"fastpeft[{f}]": _on_backend(f, block) for f in _speed_faces(device)})
    variants["reference"] = _on_backend("torch", block)
    return variants if train else _inference(variants)


def run_adapter_block(device: str, quick: bool, progress=None) -> list[dict]:
    from .ops.adapter_block import adapter_block_fwd

    rows = []
    for case, times in _timed(adapter_block_cases(device, quick), adapter_block_variants, device, quick, progress,
                              lambda c: f"adapter_block {c.label} {c.mode}"):
        ratios = _ratios(times, [("fastpeft", "copy"), ("fastpeft", "reference")])
        t = torch.empty(case.M, case.D, device="meta")
        face = adapter_block_fwd.select(torch.device(device), t, t, t.new_empty(case.R, case.D), None,
                                        t.new_empty(case.D, case.R), None, 1.0, case.activation)
        rows.append(_row("adapter_block", case, face, times, ratios))
    return rows


# op name -> (its cases, the function that times them): what `fastpeft bench --op` picks from
SUITES = {"lora_linear": (lora_cases, run_lora), "multi_lora": (multi_lora_cases, run_multi_lora),
          "nf4_matmul": (nf4_cases, run_nf4), "phm_linear": (phm_cases, run_phm),
          "adapter_block": (adapter_block_cases, run_adapter_block)}
