"""A static performance model of the Triton faces and the C++ CUDA GEMVs: ``fastpeft bench --static``.
No GPU runs.

For every GPU bench case, the launches the ops make are recorded (the Triton launchers run on meta
tensors with the launch itself replaced: :func:`fastpeft.kernels.aot.record_launches`), each is
compiled as the JIT compiles it at run time for the architecture (its specialisation: integers
equal to 1 as constants, divisibility and alignment by 16; tiles chosen for that architecture's
shared memory) and its machine code read:

* registers, spilled bytes (``cuobjdump --dump-resource-usage``), shared memory (Triton's metadata);
* occupancy: CTAs per SM from registers, shared memory, warps and the CTA limit;
* the main loop: the backward branch of the SASS whose body requests the most global bytes;
  its instructions, its bytes per iteration (``LDG`` into registers, ``LDGSTS`` copies into shared
  memory), and from them bytes in flight per SM (register loads of one iteration plus
  ``num_stages - 1`` iterations of copies, times the CTAs resident) and warp-instructions issued
  per byte requested;
* an ESTIMATE of the time: the launch's unique bytes at the bandwidth its bytes in flight can keep
  busy (Little's law, ~620 ns of DRAM latency), the main loop's instruction issue, and the tensor-core
  FLOPs, whichever is longest, beside the roofline ideal (unique bytes / effective bandwidth or FLOPs /
  dense peak). An estimate from the code, never a measurement: a GPU number beats it every time.

The C++ CUDA faces' kernels (csrc/cuda: the NF4 and LoRA decode GEMVs, BGMV's shrink and expand)
are compiled with nvcc for the architecture as the extension's build compiles them (``-cubin``,
then ``cuobjdump``) when nvcc is found, their launch geometry mirrored from the C++ launchers
(:data:`CUDA_PLANS`), and modelled the same way; their in-flight bytes count the loads marked
L1::no_allocate (the streamed weight) when the kernel marks any, as the rest hits the cache.

Each launch's grid is also given in waves of the architecture's SMs (programs / SMs: below 1, SMs
sit idle for the whole launch; the launchers plan their grids for the SM count the model assumes,
``fastpeft.kernels.aot.SM_COUNT``), and the tensor-core time counts only the SMs the grid uses.

``check`` fails on a spill, a launch over an architecture's shared memory per block, an NF4/LoRA
GEMV (M ≤ 16) with less than 20 KB in flight per SM, or a launch below one wave for which the
launcher noted no reason (Triton: ``note_short_grid``, e.g. the whole problem is fewer tiles than
SMs; CUDA: the reason its plan in :data:`CUDA_PLANS` carries, the C++ launcher's comment mirrored,
the grid planned for the architecture's SM count as the launcher plans it for the device's);
known failures name their issue.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from ..kernels import aot
from ..kernels._common import GPU_ROOFLINE
from . import OPS
from .case import Case

# What the estimate assumes of each architecture (the GPU the project measures on, and the A100).
# bandwidth: effective HBM bytes/s (issue 15: 4.3 TB/s of the H200's 4.8); flops: dense bf16/fp16
# tensor-core peak; clock: boost, for instruction issue (4 warp-instructions per SM per cycle).
# bandwidth and flops: fastpeft/kernels/_common.py's GPU_ROOFLINE, which the launchers' cost rules read too.
MACHINES = {
    90: dict(gpu="H200", sms=aot.SM_COUNT[90], **GPU_ROOFLINE[90], clock=1.98e9, smem_per_sm=233472, max_warps=64,
             max_ctas=32),
    80: dict(gpu="A100-80GB", sms=aot.SM_COUNT[80], **GPU_ROOFLINE[80], clock=1.41e9, smem_per_sm=167936,
             max_warps=64, max_ctas=32),
    86: dict(gpu="RTX 3090/A10", sms=aot.SM_COUNT[86], **GPU_ROOFLINE[86], clock=1.7e9, smem_per_sm=102400,
             max_warps=48, max_ctas=16),
    89: dict(gpu="RTX 4090/L40S", sms=aot.SM_COUNT[89], **GPU_ROOFLINE[89], clock=2.5e9, smem_per_sm=102400,
             max_warps=48, max_ctas=24),
}
DRAM_LATENCY_S = 620e-9
MIN_IN_FLIGHT = 20 * 1024      # bytes per SM an NF4/LoRA GEMV must keep in flight (issue 15)
GEMV_M = 16
# Known failures of the checks, by (op, kernel, what failed): the issue that tracks each.
KNOWN: dict[tuple[str, str, str], str] = {}


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv
    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return bundled if os.path.exists(bundled) else (shutil.which(name) or name)


# ---------------------------------------------------------------- the launches of a bench case

def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _face(op: str):
    """The Triton launcher the registry runs for op `op` (``fastpeft/kernels/<module>.py``)."""
    from ..ops import all_ops
    target = all_ops()[op]
    return getattr(importlib.import_module(f"fastpeft.kernels.{target.triton_module}"), op)


def _nf4(case: Case, dt):
    M, K, N = (case.dims[k] for k in "MKN")
    w = (_meta(N * K // 2, 1, dtype=torch.uint8), _meta(N * K // 64, dtype=torch.uint8), _meta(16, dtype=torch.float32))
    nested = (_meta(math.ceil(N * K / 64 / 256), dtype=torch.float32), _meta(256, dtype=torch.float32), 0.0)
    nf4 = _face("nf4_matmul")
    nf4(_meta(M, K, dtype=dt), *w, 64, N, None, False, None, None, 1.0, *nested)
    if case.training:  # nf4_matmul's derivative: dx from the same bytes
        nf4(_meta(M, N, dtype=dt), *w, 64, N, None, True, None, None, 1.0, *nested)


def _lora(case: Case, dt):
    M, K, N, r = (case.dims[k] for k in "MKNr")
    x, w, a, b = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(r, K, dtype=dt), _meta(N, r, dtype=dt)
    _, s = _face("lora_linear_fwd")(x, w, None, a, b, 2.0, None)
    if case.training:
        _face("lora_linear_bwd")(_meta(M, N, dtype=dt), x, w, a, b, s, 2.0, None)


def _lora_variants(case: Case) -> dict:
    """The LoRA forward's plans the launcher did not take, for the comparison (:func:`lora_paths_table`):
    the other Triton mode (fused-shrink, or shrink + fused GEMM) and the base GEMM alone."""
    if case.training:
        return {}
    from ..kernels import lora_linear as kl
    M, K, N, r = (case.dims[k] for k in "MKNr")

    def inputs(dt):
        return _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(r, K, dtype=dt), _meta(N, r, dtype=dt)

    def fused_shrink(case, dt):
        x, w, a, b = inputs(dt)
        kl.fused_shrink_matmul(x, w, None, a, b, 2.0)

    def shrink_then_fused(case, dt):
        x, w, a, b = inputs(dt)
        kl.shrink_then_fused(x, w, None, a, b, 2.0)

    def base(case, dt):
        x, w, _, _ = inputs(dt)
        kl.fused_matmul(x, w, None, None, None, 0.0)
    return {"fused shrink": fused_shrink, "shrink + fused": shrink_then_fused, "base GEMM": base}


def _multi_lora(case: Case, dt, segments: bool | None = None):
    """SGMV or BGMV as nn.multi_lora routes the batch on a GPU (`segments` None), or as told."""
    from ..ops.adapter_batch import AdapterBatch
    T, K, N, r, U = (case.dims[k] for k in ("T", "K", "N", "r", "U"))
    batch = AdapterBatch.build(torch.arange(T) % U, U, device=torch.device("meta"))
    a, b = _meta(U, r, K, dtype=dt), _meta(U, N, r, dtype=dt)
    x, base, scal = _meta(T, K, dtype=dt), _meta(T, N, dtype=dt), _meta(U, dtype=torch.float32)
    if batch.prefers_segments() if segments is None else segments:
        s = _face("sgmv_shrink")(x, a, *batch.routing)
        _face("sgmv_expand")(base, s, b, scal, *batch.routing)
    else:
        s = _face("bgmv_shrink")(x, a, batch.adapter_ids)
        _face("bgmv_expand")(base, s, b, scal, batch.adapter_ids)


def _phm(case: Case, dt):
    M, K, N, n, rank = (case.dims[k] for k in ("M", "K", "N", "n", "rank"))
    x, rule, bias = _meta(M, K, dtype=dt), _meta(n, n, n, dtype=dt), _meta(N, dtype=dt)
    factors = ((_meta(n, N // n, K // n, dtype=dt), None, None) if rank is None else
               (None, _meta(n, N // n, rank, dtype=dt), _meta(n, rank, K // n, dtype=dt)))
    _face("phm_linear_fwd")(x, rule, *factors, bias)
    _face("phm_linear_bwd")(_meta(M, N, dtype=dt), x, rule, *factors)


def _dense(case: Case, dt):
    M, K, N = (case.dims[k] for k in "MKN")
    _face("dense_linear")(_meta(M, K, dtype=dt), _meta(N, K, dtype=dt), None)


def _adapter_block(case: Case, dt):
    M, D, R, act = (case.dims[k] for k in ("M", "D", "R", "act"))
    x, wd, bd, wu, bu = _meta(M, D, dtype=dt), _meta(R, D, dtype=dt), _meta(R, dtype=dt), _meta(D, R, dtype=dt), \
        _meta(D, dtype=dt)
    _face("adapter_block_fwd")(x, x, wd, bd, wu, bu, 1.0, act)
    if case.training:
        _face("adapter_block_bwd")(_meta(M, D, dtype=dt), x, wd, bd, wu, 1.0, act)


def _dora(case: Case, dt):
    M, K, N, r = (case.dims[k] for k in "MKNr")
    x, w, a, b = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(r, K, dtype=dt), _meta(N, r, dtype=dt)
    magnitude, norm_sq = _meta(N, dtype=dt), _meta(N, dtype=torch.float32)
    y, s, z, norm = _face("dora_linear_fwd")(x, w, None, a, b, magnitude, norm_sq, 2.0, None)
    if case.training:
        _face("dora_linear_bwd")(_meta(M, N, dtype=dt), x, w, a, b, magnitude, s, z, norm, 2.0, None)


# op -> (case) -> {label: plan}: launches of plans the launcher does not take at the case, compiled
# and estimated beside its own (rows labelled with the variant; the launcher's own plan repeated
# under its label is dropped).
VARIANTS = {"lora_linear": _lora_variants}

PLANS = {"dense_linear": _dense, "dora_linear": _dora, "nf4_matmul": _nf4, "lora_linear": _lora,
         "multi_lora": _multi_lora, "phm_linear": _phm, "adapter_block": _adapter_block}

# bench groups that time no single kernel, so there is no launch to compile: what they measure is
# host work per call (overhead) or whole models (e2e)
NOT_KERNELS = {"overhead": "per-call host cost of tiny layers", "e2e": "whole-model generation and training"}


def record_case(op: str, case: Case, arch: int) -> list[aot.Launch]:
    """The Triton launches op `op` makes for `case`, its tiles chosen for sm_`arch` (none for a bench
    op without a plan here: :func:`bench_cases` names it)."""
    from .variants import DTYPES
    if op not in PLANS:
        return []
    with aot.target_arch(arch), aot.record_launches() as launches:
        PLANS[op](case, DTYPES[case.dtype])
    def plan_of(recorded):  # kernels, grids and constants: the same plan launches the same code
        return [(launch.name, launch.grid, sorted(launch.kwargs.items())) for launch in recorded]
    own = plan_of(launches)
    for label, plan in VARIANTS.get(op, lambda c: {})(case).items():
        with aot.target_arch(arch), aot.record_launches() as more:
            plan(case, DTYPES[case.dtype])
        if plan_of(more) != own:
            launches += [dataclasses.replace(launch, variant=label) for launch in more]
    return launches


def bench_cases(quick: bool = False):
    """(op name, case) of every GPU bench case; a bench op this module has no launch plan for is
    reported once on stderr (it then has no row and no compile)."""
    import sys
    missing = [name for name in OPS if name not in PLANS and name not in NOT_KERNELS]
    if missing:
        print(f"static model: no launch plan for bench op(s) {', '.join(missing)} (fastpeft/bench/static.py PLANS)",
              file=sys.stderr)
    return [(name, case) for name, bench_op in OPS.items() for case in bench_op.cases("cuda", quick)]


# ---------------------------------------------------------------- reading the machine code

_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def load_width(opcode: str) -> int:
    """Bytes one thread requests with a global load opcode (LDG.E.128: 16; LDGSTS.E.U8: 1...)."""
    parts = opcode.split(".")
    for p in parts[1:]:
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16"):
            return 2
        if p == "64":
            return 8
        if p == "128":
            return 16
    return 4


@dataclass
class Sass:
    instructions: int = 0      # in the main loop's body
    ldg_bytes: int = 0         # per thread per iteration, into registers
    ldgsts_bytes: int = 0      # per thread per iteration, copies into shared memory
    ldg_ops: int = 0
    ldgsts_ops: int = 0
    streaming_bytes: int = 0   # of ldg_bytes: loads marked L1::no_allocate (LDG.E.NA: data used once)
    int_ops: int = 0           # integer/address arithmetic among the instructions
    mma_ops: int = 0


_INT_PREFIXES = ("IMAD", "IADD", "LEA", "SHF", "LOP", "ISETP", "IABS", "SEL", "PRMT", "IMNMX", "BMSK", "SGXT")


def read_sass(cubin: bytes, function: str | None = None) -> tuple[Sass, dict]:
    """The main loop's counts, and the resource usage (REG, LOCAL, SHARED...) of the cubin, or of
    its first function whose (mangled) name matches the regular expression `function`."""
    return read_functions(cubin, (function,))[function]


def read_functions(cubin: bytes, functions) -> dict:
    """:func:`read_sass` for each of `functions` (None: the whole cubin), disassembling once."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage_text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                    text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    out = {}
    for function in functions:
        usage_part, sass_part = usage_text, sass
        if function is not None:
            usage_part = _section(usage_text, r"Function (\S+):", function)
            sass_part = _section(sass, r"Function : (\S+)", function)
        usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage_part)}
        out[function] = (main_loop(sass_part), usage)
    return out


def main_loop(sass: str) -> Sass:
    """The counts of a SASS listing's main loop: the backward branch whose body requests the most
    global bytes (the fewest instructions among equals)."""
    code = [(int(a, 16), op, rest) for a, _, op, rest in _INSTR.findall(sass)]
    loops = []
    for addr, op, rest in code:
        m = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    best = Sass()
    for start, end in loops:
        body = [(op, rest) for a, op, rest in code if start <= a <= end]
        s = Sass(instructions=len(body))
        for op, _ in body:
            if op.startswith("LDGSTS"):
                s.ldgsts_bytes += load_width(op)
                s.ldgsts_ops += 1
            elif op.startswith("LDG"):
                s.ldg_bytes += load_width(op)
                s.ldg_ops += 1
                if ".NA." in op or op.endswith(".NA"):
                    s.streaming_bytes += load_width(op)
            elif op.startswith(_INT_PREFIXES):
                s.int_ops += 1
            elif op.startswith(("HMMA", "HGMMA", "IMMA")):
                s.mma_ops += 1
        key = (s.ldg_bytes + s.ldgsts_bytes, -s.instructions)
        if key > (best.ldg_bytes + best.ldgsts_bytes, -best.instructions if best.instructions else -10**9):
            best = s
    return best


def _section(text: str, header: str, function: str) -> str:
    """The part of a cuobjdump listing that belongs to the first function matching `function`."""
    marks = [(m.start(), m.group(1)) for m in re.finditer(header, text)]
    for i, (start, name) in enumerate(marks):
        if re.search(function, name):
            return text[start:marks[i + 1][0] if i + 1 < len(marks) else len(text)]
    raise LookupError(f"no function matching {function!r} in the cubin (functions: {[n for _, n in marks]})")


# ---------------------------------------------------------------- the model

def occupancy(arch: int, regs: int, shared: int, warps: int) -> tuple[int, str]:
    """CTAs per SM and what limits them."""
    m = MACHINES[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by = {"regs": 65536 // (per_warp * warps), "smem": m["smem_per_sm"] // (shared + 1024),
          "warps": m["max_warps"] // warps, "ctas": m["max_ctas"]}
    limit = min(by, key=by.get)
    return by[limit], limit


def _bound_args(launch: aot.Launch) -> dict:
    names = launch.kernel.arg_names
    bound = dict(zip(names, launch.args))
    bound.update(launch.kwargs)
    return bound


def unique_bytes(launch: aot.Launch) -> int:
    """Bytes of every distinct tensor the launch is given: read or written once, the least it moves."""
    seen, total = set(), 0
    for v in _bound_args(launch).values():
        if isinstance(v, torch.Tensor):
            key = (v.untyped_storage().nbytes(), v.data_ptr(), tuple(v.shape))
            if key not in seen:
                seen.add(key)
                n = 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride()) if s > 0) if v.numel() else 0
                total += n * v.element_size()
    return total


def _cdiv(a, b):
    return -(-a // b)


def trips_and_flops(launch: aot.Launch) -> tuple[int | None, float]:
    """Main-loop trips per CTA and the MMA FLOPs of a launch, for the kernels whose main loop is known."""
    a = _bound_args(launch)
    name = launch.name
    if name == "_nf4_matmul_kernel":
        return _cdiv(a["K_RED"], a["BLOCK_K"]), 2.0 * a["M"] * a["N_OUT"] * a["K_RED"]
    if name == "_nf4_gemv_kernel":  # the MMAs it issues: BLOCK_M·SPLIT rows, whatever M is
        split = a["SPLIT"]
        return (_cdiv(a["K_PART"], a["BLOCK_K"]),
                2.0 * a["BLOCK_M"] * split * _cdiv(a["N_OUT"], a["BLOCK_N"]) * a["BLOCK_N"] * split * a["K_PART"])
    if name == "_fused_matmul_kernel":
        return _cdiv(a["K"], a["BLOCK_K"]), 2.0 * a["M"] * a["N"] * (a["K"] + a["R"])
    if name == "_fused_shrink_matmul_kernel":  # x·Aᵀ recomputed by every program, at the MMA's BLOCK_R width
        programs = _cdiv(a["M"], a["BLOCK_M"]) * _cdiv(a["N"], a["BLOCK_N"] * a["N_GROUP"])
        return (a["N_GROUP"] * _cdiv(a["K"], a["BLOCK_K"]),
                2.0 * a["M"] * a["N"] * (a["K"] + a["R"]) + 2.0 * programs * a["BLOCK_M"] * a["K"] * a["BLOCK_R"])
    if name == "_shrink_kernel":  # each program reduces one part of K
        return _cdiv(min(a["K_PART"], a["K"]), a["BLOCK_K"]), 2.0 * a["M"] * a["R"] * a["K"]
    if name == "_adapter_block_fwd_kernel":
        return _cdiv(a["R"], a["BLOCK_R"]) * _cdiv(a["K"], a["BLOCK_K"]), 2.0 * a["M"] * a["R"] * (a["K"] + a["N"])
    if name == "_adapter_block_bwd_kernel":
        return _cdiv(a["R"], a["BLOCK_R"]) * _cdiv(a["N"], a["BLOCK_N"]), 2.0 * a["M"] * a["R"] * (2 * a["K"] + a["N"])
    if name == "_bgmv_shrink_kernel":  # each program reduces one part of K
        return _cdiv(min(a["K_PART"], a["K"]), a["BLOCK_K"]), 0.0
    if name == "_sum_parts_kernel":
        return _cdiv(a["PARTS"], a["BLOCK_P"]), 0.0
    if name == "_bgmv_expand_kernel":
        return _cdiv(a["R"], a["BLOCK_R"]), 0.0
    if name == "_sgmv_shrink_kernel":  # each program reduces one part of K
        return _cdiv(min(a["K_PART"], a["K"]), a["BLOCK_K"]), 2.0 * a["T"] * a["R"] * a["K"]
    if name == "_sgmv_expand_kernel":
        return _cdiv(a["R"], a["BLOCK_R"]), 2.0 * a["T"] * a["R"] * a["N"]
    if name == "_phm_mix_kernel":
        n = a["NPHM"]
        return n * n * _cdiv(a["D"], a["BLOCK_D"]), 2.0 * a["M"] * n * n * a["P"] * a["D"]
    if name == "_phm_grad_factor_kernel":  # each program reduces one part of the tokens
        n = a["NPHM"]
        return _cdiv(min(a["M_PART"], a["M"]), a["BLOCK_M"]) * n, 2.0 * a["M"] * n * n * a["C"] * a["D"]
    return None, 0.0


def useful_flops(launch: aot.Launch) -> float:
    """The product's own FLOPs (a GEMV's padding rows excluded), for the roofline ideal."""
    a = _bound_args(launch)
    if launch.name == "_nf4_gemv_kernel":
        return 2.0 * a["M"] * a["N_OUT"] * a["K_PART"] * a["SPLIT"]
    if launch.name == "_fused_shrink_matmul_kernel":  # x·Aᵀ once
        return 2.0 * a["M"] * a["N"] * (a["K"] + a["R"]) + 2.0 * a["M"] * a["K"] * a["R"]
    return trips_and_flops(launch)[1]


@dataclass
class Row:
    op: str
    case: str
    arch: int
    kernel: str
    config: str
    grid: int
    regs: int
    spill: int
    shared: int
    smem_limit: int
    ctas_per_sm: int
    limited_by: str
    waves: float
    loop_instr: int
    loop_bytes_cta: int        # bytes requested per main-loop iteration per CTA
    in_flight_sm: int          # bytes per SM
    instr_per_byte: float      # warp-instructions per byte requested, main loop
    est_us: float
    ideal_us: float
    gemv: bool
    problems: list
    sm_waves: float = 0.0      # programs / SMs: below 1, SMs sit idle for the whole launch
    short_grid_reason: str | None = None   # the launcher's, for a grid below one wave
    variant: str = ""          # a plan the launcher did not take at this case (VARIANTS), or ""

    def record(self) -> dict:
        return dataclasses.asdict(self)


def grid_problem(grid: int, arch: int, reason: str | None) -> str | None:
    """The check's complaint about a grid of `grid` programs (Triton) or blocks (CUDA) on sm_`arch`:
    fewer than SMs (SMs idle for the whole launch) with no reason noted by the launcher (a Triton
    launcher's note_short_grid; for a CUDA launch, its plan here, mirroring the C++ launcher's
    comment); None when it passes."""
    sms = MACHINES[arch]["sms"]
    if grid >= sms or reason:
        return None
    return f"grid of {grid} programs below one wave of {sms} SMs, and the launcher noted no reason"


def compile_and_read(spec: aot.Spec, arch: int) -> tuple[int, Sass, dict]:
    """(shared memory, main loop, resource usage) of a spec compiled for sm_`arch`."""
    kernel = aot.compile_spec(spec, arch)
    sass, usage = read_sass(kernel.asm["cubin"])
    return kernel.metadata.shared, sass, usage


def analyse(op: str, case: Case, arch: int, launch: aot.Launch, compiled: dict) -> Row:
    spec = aot.jit_spec(launch, arch)
    shared, sass, usage = compiled[(spec, arch)]
    m = MACHINES[arch]
    opts = dict(spec.options)
    warps, stages = opts.get("num_warps", 4), opts.get("num_stages", 3)
    threads = 32 * warps
    ctas, limiter = occupancy(arch, usage.get("REG", 0), shared, warps)
    grid = math.prod(launch.grid) if isinstance(launch.grid, tuple) else 0
    resident = max(1, min(ctas, _cdiv(grid, m["sms"]))) if ctas else 0
    sms_used = min(m["sms"], grid) if grid else m["sms"]
    loop_bytes = (sass.ldg_bytes + sass.ldgsts_bytes) * threads
    in_flight = (sass.ldg_bytes + max(stages - 1, 1) * sass.ldgsts_bytes) * threads * resident
    instr_per_byte = sass.instructions * warps / loop_bytes if loop_bytes else float("nan")
    # the estimate
    nbytes = unique_bytes(launch)
    trips, flops = trips_and_flops(launch)
    bandwidth = min(m["bandwidth"], in_flight * sms_used / DRAM_LATENCY_S) if in_flight else m["bandwidth"] / 8
    t_mem = nbytes / bandwidth
    t_issue = (sass.instructions * warps * trips * grid / (sms_used * 4 * m["clock"])) if trips else 0.0
    t_mma = flops / (m["flops"] * sms_used / m["sms"])   # a short grid leaves tensor cores idle too
    waves = grid / (ctas * m["sms"]) if ctas else float("inf")
    est = max(t_mem, t_issue, t_mma) * max(1.0, math.ceil(waves) / waves if 1 <= waves < math.inf else 1.0)
    ideal = max(nbytes / m["bandwidth"], useful_flops(launch) / m["flops"])
    blocks = {k: v for k, v in spec.constexprs if k.startswith("BLOCK_")}
    config = "x".join(str(v) for v in blocks.values()) + f" w{warps} s{stages}"
    gemv = op in ("nf4_matmul", "lora_linear") and case.dims.get("M", 99) <= GEMV_M and \
        launch.name in ("_nf4_matmul_kernel", "_nf4_gemv_kernel", "_fused_matmul_kernel")
    problems = []
    if usage.get("LOCAL", 0):
        problems.append(f"spills {usage['LOCAL']} B/thread")
    if shared > aot.SMEM_PER_BLOCK_OPTIN[arch]:
        problems.append(f"shared memory {shared} B > {aot.SMEM_PER_BLOCK_OPTIN[arch]} B per block")
    if gemv and in_flight < MIN_IN_FLIGHT and arch in (80, 90):
        problems.append(f"GEMV with {in_flight / 1024:.1f} KB in flight per SM < {MIN_IN_FLIGHT // 1024} KB")
    short = grid_problem(grid, arch, launch.short_grid_reason)
    if short:
        problems.append(short)
    return Row(op, f"{case.label} {case.mode} {case.shape} {case.dtype}", arch, launch.name, config, grid,
               usage.get("REG", 0), usage.get("LOCAL", 0), shared, aot.SMEM_PER_BLOCK_OPTIN[arch], ctas, limiter,
               round(waves, 2), sass.instructions, loop_bytes, in_flight, round(instr_per_byte, 3),
               est * 1e6, ideal * 1e6, gemv, problems, round(grid / m["sms"], 2), launch.short_grid_reason,
               launch.variant)


# ---------------------------------------------------------------- the C++ CUDA faces

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


@dataclass(frozen=True)
class CudaLaunch:
    """A launch of a C++ CUDA face's kernel, as its launcher in csrc/cuda/<source> makes it."""

    source: str        # file under csrc/cuda
    function: str      # regular expression matching the instantiation's mangled name
    label: str         # the kernel and its template arguments, for the table
    grid: int          # CTAs
    threads: int       # per CTA
    trips: int         # main-loop iterations per thread
    nbytes: int        # unique bytes read and written
    flops: float = 0.0
    short_grid_reason: str | None = None   # why the grid is below one wave, as the launcher's comment says
    # global loads per thread per trip of the source loop, when known: the SASS loop unrolled u times
    # issues u times as many, so it runs trips / u times (ldg_ops / loads_per_trip = u)
    loads_per_trip: int | None = None


def nvcc_cubin(source: str, arch: int, csrc: str = CSRC) -> bytes:
    """csrc/cuda/`source` compiled to a cubin for sm_`arch` as the extension's build compiles it
    (setup.py: -O3, torch's half/bfloat16 and constexpr flags, the headers of torch and its CUDA wheels)."""
    import glob
    import importlib.util

    from torch.utils import cpp_extension
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    includes = [os.path.join(csrc)] + cpp_extension.include_paths("cuda") + \
        sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")))
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernel.cubin")
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "--expt-relaxed-constexpr",
                        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                        *(f"-I{d}" for d in includes), os.path.join(csrc, "cuda", source), "-o", out],
                       check=True, capture_output=True, text=True)
        with open(out, "rb") as f:
            return f.read()


def read_cuda(source: str, arch: int, functions: tuple[str, ...], csrc: str = CSRC) -> dict:
    """{function pattern: (main loop, resource usage)} of one .cu compiled for sm_`arch`."""
    return read_functions(nvcc_cubin(source, arch, csrc), functions)


# dtype -> (its C++ type as mangled in a template argument list, bytes)
_CUDA_T = {"bf16": ("N3c108BFloat16E", 2), "fp16": ("N3c104HalfE", 2), "fp32": ("f", 4)}


def _cuda_nf4(case: Case, arch: int) -> list[CudaLaunch]:
    """csrc/cuda/nf4_matmul.cu, launch_gemv: the decode GEMV (M == 1, K % 32 == 0); other shapes
    dequantise the weight for cuBLAS (not modelled)."""
    M, K, N = (case.dims[k] for k in "MKN")
    mangled, size = _CUDA_T[case.dtype]
    if M != 1 or K % 32:
        return []
    # packed bytes, one uint8 absmax code per 64 weights, x, y
    nbytes = N * K // 2 + N * K // 64 + (M * K + M * N) * size
    # the bench weights are double-quantised (QLoRA's): the kNested = true instantiation
    return [CudaLaunch("nf4_matmul.cu", f"nf4_gemv_kernelI{mangled}Li1ELb1E", f"nf4_gemv_kernel<{case.dtype}, 1, nested>",
                       _cdiv(N, NF4_CUDA_GEMV["rows_per_cta"]), NF4_CUDA_GEMV["threads"],
                       _cdiv(K, NF4_CUDA_GEMV["weights_per_trip"]), nbytes)]


def _cuda_lora(case: Case, arch: int) -> list[CudaLaunch]:
    """csrc/cuda/lora_linear.cu, launch_lora_gemv: the fused decode GEMV (M <= 16; s = x·Aᵀ by
    cuBLAS before it, not modelled); other shapes are ATen/cuBLAS."""
    M, K, N, r = (case.dims[k] for k in "MKNr")
    mangled, size = _CUDA_T[case.dtype]
    if M > LORA_CUDA_GEMV["max_rows"]:
        return []
    vec = 16 // size
    nbytes = (N * K + M * K + M * N + N * r + M * r) * size
    rows = 1 if M == 1 else LORA_CUDA_GEMV["max_rows"]
    return [CudaLaunch("lora_linear.cu", f"lora_gemv_kernelI{mangled}Li{vec}ELi{rows}E",
                       f"lora_gemv_kernel<{case.dtype}, {vec}, {rows}>", _cdiv(N, LORA_CUDA_GEMV["rows_per_cta"]),
                       LORA_CUDA_GEMV["threads"], _cdiv(K, 32 * vec * LORA_CUDA_GEMV["loads_per_trip"]), nbytes)]


def _cuda_bgmv(case: Case, arch: int) -> list[CudaLaunch]:
    """csrc/cuda/bgmv.cu: shrink (a block of kShrinkThreads per (token, rank) pair, K shared by its
    threads), expand (a thread per (token, feature), expand_threads per block, the rank in 16-byte
    steps), at the bench shape whichever of BGMV and SGMV the batch routes to (the CUDA face is
    BGMV's)."""
    T, K, N, r, U = (case.dims[k] for k in ("T", "K", "N", "r", "U"))
    mangled, size = _CUDA_T[case.dtype]
    sms = MACHINES[arch]["sms"]
    vec = 16 // size
    threads = BGMV_CUDA["shrink_threads"]
    shrink = CudaLaunch("bgmv.cu", f"bgmv_shrink_kernelI{mangled}Li{vec}E", f"bgmv_shrink_kernel<{case.dtype}, {vec}>",
                        T * r, threads, _cdiv(K, threads * vec), (T * K + U * r * K + T * r) * size,
                        loads_per_trip=2, short_grid_reason=None if T * r >= sms else (
                            f"a block per (token, rank) pair: {T} x {r}, K shared by its {threads} threads (a split "
                            "across blocks would need a second launch to add the parts)"))
    expand_threads = BGMV_CUDA["expand_threads"]
    while expand_threads > 32 and T * _cdiv(N, expand_threads) < sms:
        expand_threads //= 2
    expand_vec = vec if r % vec == 0 else 1
    expand_blocks = T * _cdiv(N, expand_threads)
    expand = CudaLaunch("bgmv.cu", f"bgmv_expand_kernelI{mangled}Li{expand_vec}E",
                        f"bgmv_expand_kernel<{case.dtype}, {expand_vec}>", expand_blocks, expand_threads,
                        _cdiv(r, expand_vec), (2 * T * N + U * N * r + T * r) * size + 4 * U, loads_per_trip=1,
                        short_grid_reason=None if expand_blocks >= sms else (
                            f"{T} token(s) x {_cdiv(N, expand_threads)} blocks of one warp, a thread per output "
                            "feature"))
    return [shrink, expand]


CUDA_PLANS = {"nf4_matmul": _cuda_nf4, "lora_linear": _cuda_lora, "multi_lora": _cuda_bgmv}
# The launch geometry of the CUDA GEMVs, as csrc/cuda/nf4_matmul.cu and lora_linear.cu set it
# (kept in step by hand: the launchers are C++): kWarps·kRowsPerWarp features per CTA, every row
# in one pass (LoRA: M <= 16; NF4: M == 1), kUnroll 16-byte chunks per row per lane per trip of the
# main loop.
NF4_CUDA_GEMV = dict(rows_per_cta=16, threads=256, weights_per_trip=32 * 32 * 4)
LORA_CUDA_GEMV = dict(max_rows=16, rows_per_cta=16, threads=256, loads_per_trip=4)
# csrc/cuda/bgmv.cu: kShrinkThreads per (token, rank) block; expand blocks of kExpandThreads, halved
# (expand_threads, down to a warp) while the grid is below a wave of the device's SMs.
BGMV_CUDA = dict(shrink_threads=128, expand_threads=256)


def analyse_cuda(op: str, case: Case, arch: int, launch: CudaLaunch, compiled: dict) -> Row:
    sass, usage = compiled[(launch.source, arch)][launch.function]
    m = MACHINES[arch]
    warps = launch.threads // 32
    shared = usage.get("SHARED", 0)
    ctas, limiter = occupancy(arch, usage.get("REG", 0), shared, warps)
    resident = max(1, min(ctas, _cdiv(launch.grid, m["sms"])))
    sms_used = min(m["sms"], launch.grid)
    # A kernel that marks its streamed operand L1::no_allocate (the CUDA GEMVs' weight) re-reads the
    # rest (x, the level table) from cache: only the streamed loads reach DRAM.
    loop_bytes = (sass.streaming_bytes or sass.ldg_bytes) * launch.threads
    in_flight = loop_bytes * resident
    instr_per_byte = sass.instructions * warps / loop_bytes if loop_bytes else float("nan")
    bandwidth = min(m["bandwidth"], in_flight * sms_used / DRAM_LATENCY_S) if in_flight else m["bandwidth"] / 8
    t_mem = launch.nbytes / bandwidth
    trips = launch.trips
    if launch.loads_per_trip and sass.ldg_ops > launch.loads_per_trip:   # an unrolled loop
        trips = _cdiv(trips, sass.ldg_ops // launch.loads_per_trip)
    t_issue = sass.instructions * warps * trips * launch.grid / (sms_used * 4 * m["clock"])
    waves = launch.grid / (ctas * m["sms"]) if ctas else float("inf")
    est = max(t_mem, t_issue) * max(1.0, math.ceil(waves) / waves if 1 <= waves < math.inf else 1.0)
    ideal = max(launch.nbytes / m["bandwidth"], launch.flops / m["flops"])
    gemv = op in ("nf4_matmul", "lora_linear")
    problems = []
    if usage.get("LOCAL", 0):
        problems.append(f"spills {usage['LOCAL']} B/thread")
    if gemv and in_flight < MIN_IN_FLIGHT and arch in (80, 90):
        problems.append(f"GEMV with {in_flight / 1024:.1f} KB in flight per SM < {MIN_IN_FLIGHT // 1024} KB")
    short = grid_problem(launch.grid, arch, launch.short_grid_reason)
    if short:
        problems.append(short)
    return Row(op, f"{case.label} {case.mode} {case.shape} {case.dtype}", arch, "cuda " + launch.label,
               f"{launch.threads} threads", launch.grid, usage.get("REG", 0), usage.get("LOCAL", 0), shared,
               aot.SMEM_PER_BLOCK_OPTIN[arch], ctas, limiter, round(waves, 2), sass.instructions, loop_bytes,
               in_flight, round(instr_per_byte, 3), est * 1e6, ideal * 1e6, gemv, problems,
               round(launch.grid / m["sms"], 2), launch.short_grid_reason)


def cuda_launches(archs, ops=None, quick: bool = False) -> list[tuple[str, Case, int, CudaLaunch]]:
    """(op, case, arch, launch) of every CUDA launch of the GPU bench cases (of `ops`), its geometry
    planned for sm_`arch`'s SM count as the C++ launcher plans it for the device's."""
    return [(op, case, arch, launch) for op, case in bench_cases(quick) if (ops is None or op in ops)
            and op in CUDA_PLANS for arch in archs for launch in CUDA_PLANS[op](case, arch)]


def model(archs=(90, 80), quick: bool = False, ops: list[str] | None = None, workers: int | None = None) -> list[Row]:
    """A row per launch of every GPU bench case (of `ops`) for every architecture; the distinct
    kernels compiled in parallel, one process per core."""
    launches = [(op, case, arch, launch) for op, case in bench_cases(quick) if ops is None or op in ops
                for arch in archs for launch in record_case(op, case, arch)]
    cuda = cuda_launches(archs, ops, quick) if shutil.which("nvcc") or os.environ.get("CUDA_HOME") else []
    return analyse_all(launches, cuda, workers)


def analyse_all(launches, cuda, workers: int | None = None) -> list[Row]:
    """Rows of recorded Triton launches ``(op, case, arch, launch)`` and CUDA ones, each distinct
    kernel compiled once, in parallel (one process per core)."""
    import concurrent.futures as cf

    keys = list(dict.fromkeys((aot.jit_spec(launch, arch), arch) for _, _, arch, launch in launches))
    functions: dict = {}
    for _, _, arch, launch in cuda:
        functions.setdefault((launch.source, arch), set()).add(launch.function)
    cuda_keys = list(functions)
    with cf.ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        cuda_jobs = [pool.submit(read_cuda, source, arch, tuple(sorted(functions[(source, arch)])))
                     for source, arch in cuda_keys]   # the slowest first: nvcc parses ATen's headers
        compiled = dict(zip(keys, pool.map(compile_and_read, *zip(*keys)))) if keys else {}
        compiled.update(zip(cuda_keys, (job.result() for job in cuda_jobs)))
    return [analyse(op, case, arch, launch, compiled) for op, case, arch, launch in launches] + \
        [analyse_cuda(op, case, arch, launch, compiled) for op, case, arch, launch in cuda]


# ---------------------------------------------------------------- BGMV against SGMV by token count

ROUTE_TOKENS = (8, 16, 32, 64)
ROUTE_ADAPTERS = (1, 8, 64)


def route_estimates(archs=(90, 80), tokens=ROUTE_TOKENS, adapters=ROUTE_ADAPTERS,
                    workers: int | None = None) -> list[tuple[int, int, int, float, float, float]]:
    """(T, U, arch, BGMV on Triton µs, BGMV on CUDA µs, SGMV on Triton µs): ESTIMATES of both routes
    of a mixed batch at the multi_lora bench's layer (K = N = 4096, rank 16, bf16), T tokens over
    min(U, T) adapters, each route's launches summed (launch cost left out, as everywhere here).
    What ``SEGMENT_MIN_TOKENS_GPU`` (fastpeft/ops/adapter_batch.py) is read from."""
    from .multi_lora import dims
    cases = [Case("route", "fwd", "bf16", dims(T, 4096, 4096, 16, min(U, T))) for T in tokens for U in adapters]
    cases = list({c.shape: c for c in cases}.values())   # U = T reached twice is one case
    launches, cuda = [], []
    for case in cases:
        for arch in archs:
            for segments, op in ((False, "bgmv"), (True, "sgmv")):
                with aot.target_arch(arch), aot.record_launches() as recorded:
                    _multi_lora(case, torch.bfloat16, segments)
                launches += [(op, case, arch, launch) for launch in recorded]
            cuda += [("bgmv", case, arch, launch) for launch in _cuda_bgmv(case, arch)]
    rows = analyse_all(launches, cuda, workers)
    totals = {(op, case, arch, face): est for op, case, arch, face, est, _ in case_totals(rows)}
    out = []
    for case in cases:
        for arch in archs:
            label = f"{case.label} {case.mode} {case.shape} {case.dtype}"
            out.append((case.dims["T"], case.dims["U"], arch, totals[("bgmv", label, arch, "triton")],
                        totals.get(("bgmv", label, arch, "cuda"), float("nan")), totals[("sgmv", label, arch, "triton")]))
    return out


def routes_table(estimates) -> str:
    lines = ["| T | U | sm | BGMV triton µs | BGMV cuda µs | SGMV triton µs |", "|" + "---|" * 6]
    lines += [f"| {T} | {U} | {arch} | {bt:.2f} | {bc:.2f} | {st:.2f} |" for T, U, arch, bt, bc, st in estimates]
    return "\n".join(lines)


def known_issue(row: Row, problem: str) -> str | None:
    for (op, kernel, what), issue in KNOWN.items():
        if row.op == op and row.kernel == kernel and what in problem:
            return issue
    return None


def format_table(rows: list[Row]) -> str:
    head = ("| op | case | sm | kernel | tile (BLOCK_*, warps, stages) | grid (waves of SMs) | regs | spill B | "
            "smem KB | CTAs/SM (limit) | loop instr | loop B/CTA | in flight KB/SM | instr/B | **estimate µs** | "
            "ideal µs |")
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        short = "†" if r.short_grid_reason else ""
        lines.append(f"| {r.op} | {r.case} | {r.arch} | {r.kernel.strip('_')} | {r.config} | "
                     f"{r.grid} ({r.sm_waves:.2f}){short} | {r.regs} | "
                     f"{r.spill} | {r.shared / 1024:.0f} | {r.ctas_per_sm} ({r.limited_by}) | {r.loop_instr} | "
                     f"{r.loop_bytes_cta} | {r.in_flight_sm / 1024:.1f} | {r.instr_per_byte:.2f} | "
                     f"**{r.est_us:.1f}** | {r.ideal_us:.1f} |")
    return "\n".join(lines)


def face_of(row: Row) -> str:
    """The face a row's launch belongs to: the C++ CUDA kernels or the Triton ones, a plan the
    launcher did not take labelled apart (alternatives, never summed together)."""
    if row.kernel.startswith("cuda "):
        return "cuda"
    return f"triton: {row.variant}" if row.variant else "triton"


def case_totals(rows: list[Row]) -> list[tuple[str, str, int, str, float, float]]:
    """(op, case, arch, face, estimated µs, ideal µs) summed over each case's launches by one face."""
    out: dict = {}
    for r in rows:
        key = (r.op, r.case, r.arch, face_of(r))
        est, ideal = out.get(key, (0.0, 0.0))
        out[key] = (est + r.est_us, ideal + r.ideal_us)
    return [(*k, *v) for k, v in out.items()]


def check(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(failures, known failures): every problem of every row, known ones with their issue."""
    failures, known = [], []
    for r in rows:
        for p in r.problems:
            line = f"sm_{r.arch} {r.op} [{r.case}] {r.kernel} {r.config}: {p}"
            issue = known_issue(r, p)
            (known if issue else failures).append(line + (f" (known: {issue})" if issue else ""))
    return failures, known


def estimates_table(rows: list[Row]) -> str:
    lines = ["| op | case | sm | face | launches | **estimated µs** | ideal µs | estimate / ideal |",
             "|" + "---|" * 8]
    count: dict = {}
    for r in rows:
        key = (r.op, r.case, r.arch, face_of(r))
        count[key] = count.get(key, 0) + 1
    for op, case, arch, face, est, ideal in case_totals(rows):
        lines.append(f"| {op} | {case} | {arch} | {face} | {count[(op, case, arch, face)]} | **{est:.1f}** | "
                     f"{ideal:.1f} | {est / ideal:.1f}x |")
    return "\n".join(lines)


def lora_paths_table(rows: list[Row]) -> str:
    """The LoRA forward's ways at each case above the CUDA GEMV's rows: the compiled-code estimate
    of each Triton plan (MMA at the dense peak) beside the launchers' cost rule
    (``fastpeft.kernels.lora_linear.fwd_estimates``: MMA at MMA_EFFICIENCY of the peak), the rule's
    cuBLAS paths, each over the rule's cuBLAS base GEMM (what the bench's 1.05x target divides by),
    and what the rule picks."""
    from ..kernels import lora_linear as kl
    from .variants import DTYPES
    totals: dict = {}
    for op, case, arch, face, est, _ in case_totals([r for r in rows if r.op == "lora_linear"]):
        totals[(case, arch, face)] = est
    own_mode = {}
    for r in rows:
        if r.op == "lora_linear" and not r.variant and r.kernel.startswith("_fused"):
            own_mode[(r.case, r.arch)] = "fused shrink" if r.kernel == "_fused_shrink_matmul_kernel" else \
                "shrink + fused"
    lines = ["| case | sm | path | compiled-code estimate µs | **cost-rule estimate µs** | rule / cuBLAS base GEMM | "
             "taken |", "|" + "---|" * 7]
    for op, case in bench_cases():
        M = case.dims.get("M", 0)
        if op != "lora_linear" or case.training or M <= GEMV_M:
            continue
        label = f"{case.label} {case.mode} {case.shape} {case.dtype}"
        K, N, r = (case.dims[k] for k in "KNr")
        for arch in sorted({a for (c, a) in own_mode if c == label}, reverse=True):
            with aot.target_arch(arch):
                est = kl.fwd_estimates(M, N, K, r, DTYPES[case.dtype])
                mode = kl.fwd_mode(M, N, K, r, DTYPES[case.dtype])
                face = kl.fastest_fwd_face(M, N, K, r, DTYPES[case.dtype], torch.device("cuda"))
            base = est["base"]

            def compiled(variant):
                face_label = "triton" if own_mode[(label, arch)] == variant else f"triton: {variant}"
                value = totals.get((label, arch, face_label))
                return "–" if value is None else f"{value:.1f}"
            for name, key, variant in (("Triton: shrink, then fused GEMM", "shrink_then_fused", "shrink + fused"),
                                       ("Triton: fused shrink (one launch)", "fused_shrink", "fused shrink"),
                                       ("cuBLAS: s·Bᵀ (+ bias), then addmm_ with it as C", "cublas", None),
                                       ("cuBLAS: base GEMM x·Wᵀ alone", "base", None),
                                       ("Triton: base GEMM alone", None, "base GEMM")):
                rule = est.get(key) if key else None
                taken = ("yes" if (key == mode and face == "triton") or (key == "cublas" and face == "cuda") else "")
                lines.append(f"| {label} | {arch} | {name} | {compiled(variant) if variant else '–'} | "
                             + (f"**{rule * 1e6:.1f}** | {rule / base:.3f}x" if rule is not None else "– | –")
                             + f" | {taken} |")
    return "\n".join(lines)


def report(rows: list[Row]) -> str:
    failures, known = check(rows)
    archs = sorted({r.arch for r in rows}, reverse=True)
    names = ", ".join(f"sm_{a} ({MACHINES[a]['gpu']})" for a in archs)
    head = (f"Static model (ESTIMATES from the compiled code, not measurements) for "
            f"{names}: each launch compiled as the JIT "
            f"compiles it; in flight = bytes requested by the main loop's loads (one iteration into "
            f"registers, num_stages - 1 of cp.async copies) x CTAs resident per SM; instr/B = warp-instructions "
            f"of the main loop per byte it requests; estimate = max(unique bytes / bandwidth kept busy by those "
            f"bytes in flight, main-loop issue, MMA FLOPs / peak); ideal = max(unique bytes / "
            f"{MACHINES[archs[0]]['bandwidth'] / 1e12:.1f} TB/s, FLOPs / {MACHINES[archs[0]]['flops'] / 1e12:.0f} "
            f"TFLOP/s) on sm_{archs[0]}.")
    reasons = list(dict.fromkeys(f"sm_{r.arch} {r.kernel.strip('_')} [{r.case}]: {r.short_grid_reason}"
                                 for r in rows if r.short_grid_reason))
    out = [head, "", format_table(rows), ""] + [f"† below one wave: {line}" for line in reasons] + \
        ["", estimates_table(rows), "", "LoRA forward above the GEMV rows: every path (ESTIMATES)", "",
         lora_paths_table(rows), ""]
    out += [f"FAILED {f}" for f in failures] + [f"known failure: {k}" for k in known]
    out.append(f"static checks: {len(failures)} failures, {len(known)} known failures "
               f"(spills, shared memory over a block's limit, NF4/LoRA GEMV under {MIN_IN_FLIGHT // 1024} KB in flight "
               f"per SM, a grid below one wave of SMs with no reason)")
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m fastpeft.bench.static [--arch 90,80] [--op ...] [--check] [--json FILE]``."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="fastpeft bench --static", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--op", action="append", choices=list(OPS), help="only these ops (repeatable)")
    p.add_argument("--check", action="store_true", help="exit 1 on a failure that is not a known one")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    p.add_argument("--routes", action="store_true",
                   help="only BGMV against SGMV by token count at the multi_lora bench's layer (estimates)")
    args = p.parse_args(argv)
    if args.routes:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("unset TRITON_INTERPRET: the static model compiles the kernels the interpreter replaces")
        print("ESTIMATES (static model), launches of each route summed, launch cost left out:")
        print(routes_table(route_estimates(tuple(int(a) for a in args.arch.split(",")))))
        return 0
    return run(tuple(int(a) for a in args.arch.split(",")), args.op, args.check, args.json)


def run(archs, ops=None, check_exit: bool = False, json_path: str | None = None) -> int:
    import json
    import time

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the static model compiles the kernels the interpreter replaces")
    t0 = time.time()
    rows = model(archs, ops=ops)
    print(report(rows))
    print(f"({len(rows)} launches, {time.time() - t0:.0f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([r.record() for r in rows], f, indent=1)
    failures, _ = check(rows)
    return 1 if check_exit and failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
