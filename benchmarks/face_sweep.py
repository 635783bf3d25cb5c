"""Where one face overtakes another: an op's decode case timed over a range of M, every face forced
in turn beside the peers, and for each variant the time its kernels took on the device (from
torch.profiler) beside the wall time a call took, so a slow face shows whether its kernels or its
Python launch path are slow. The dispatch rules' crossovers (fastpeft/ops/<op>.py) are read off it.

    python benchmarks/face_sweep.py --op nf4_matmul --op lora_linear --json sweep.json

Rows are `fastpeft bench` rows (the same runner, no targets), each with ``kernel_us``: per variant,
the device time of its kernels per layer call, in microseconds. ``--device cpu --quick`` runs the
quick cases' shapes on the CPU: the script's plumbing, not a speed."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from torch.autograd import DeviceType

from fastpeft import bench
from fastpeft.bench import nf4_matmul as nf4_bench
from fastpeft.bench import runner
from fastpeft.bench.case import BenchOp

# The first run on an H200 reached M = 8 of NF4's thirteen values in its 75 s, rebuilding eight
# 4096 x 14336 layers (NF4, bitsandbytes, bf16) for each: the layers are now built once per op,
# and fewer points cover each side of the crossovers.
SWEEP_M = {"nf4_matmul": (1, 2, 4, 8, 16, 17, 64, 512),
           "lora_linear": (1, 8, 16, 17, 64, 512)}
PROFILED_CALLS = 5


def kernel_us(fn, layers: int, device: str) -> float:
    """Device microseconds of the kernels one call of `fn` launches, per layer (torch.profiler; on
    the CPU, the self time of every op)."""
    gpu = device == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU
    fn()
    if gpu:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        if gpu:
            torch.cuda.synchronize()
    if gpu:
        total = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    else:
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return total / PROFILED_CALLS / layers


def sweep(op_name: str, rows: tuple[int, ...], device: str, quick: bool, on_row) -> list[dict]:
    """Rows of `op_name`'s decode case (the quick case with `quick`) at each M of `rows`."""
    bench_op = bench.ALL_OPS[op_name]
    template = next(c for c in bench_op.cases(device, quick) if c.label == ("quick" if quick else "decode")
                    and c.mode == "fwd")
    cases = [dataclasses.replace(template, label="sweep", dims={**template.dims, "M": m}, targets=()) for m in rows]
    built, make = {}, bench_op.variants
    if op_name == "nf4_matmul":  # its weights do not depend on M: quantised once, not per row count
        layers = nf4_bench.build_layers(template, device)

        def make(case, device):
            return nf4_bench.variants(case, device, layers)

    def variants(case, device):
        built[case.dims["M"]] = v = make(case, device)
        return v

    def profiled(row):
        v = built.pop(row["M"])
        row["kernel_us"] = {name: kernel_us(fn, row["layers"], device) for name, fn in v.items()
                            if name in row["times_ms"]}
        on_row(row)

    mine = BenchOp(bench_op.name, lambda device, quick: cases, variants, bench_op.baseline, bench_op.peers,
                   bench_op.reference, repetitions=(2, 3) if quick else (3, 20))
    return runner.run_op(mine, device, quick=False, on_case=profiled)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(SWEEP_M), required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="the quick cases' shapes (plumbing)")
    parser.add_argument("--rows", type=lambda s: tuple(int(m) for m in s.split(",")),
                        help="the values of M, comma-separated (default: each op's SWEEP_M)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("face_sweep: no GPU here (--device cpu --quick runs the plumbing)")
    env, done = bench.environment(args.device), []

    for op_name in args.op:
        def keep(row):
            done.append(row)
            bench.write_json(done, env, args.json, partial=True)
            us = "  ".join(f"{name} {row['times_ms'][name] * 1e3:.1f}/{k:.1f}" for name, k in row["kernel_us"].items())
            print(f"{op_name} M={row['M']} ({row['auto_face']}), wall/kernel us per layer: {us}", flush=True)
        sweep(op_name, args.rows or SWEEP_M[op_name], args.device, args.quick, keep)
    bench.write_json(done, env, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
