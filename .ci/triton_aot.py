"""Compile, without a GPU, the Triton kernels fastpeft launches, as the JIT compiles them at run time.

What is compiled (fastpeft/kernels/aot.py does the work):

1. every launch the ops make for every GPU bench case (``fastpeft bench``'s cuda cases: decode,
   prefill, training), recorded by running the launchers on meta tensors and specialised by
   Triton's own binder: integers equal to 1 become constants, integers divisible by 16 and 16-byte
   aligned pointers carry ``tt.divisibility`` (vectorised loads, and the shared memory the pipeliner
   really takes). Tiles are chosen per architecture, for its shared memory per block: sm_90,
   sm_80, and the 99 KiB parts sm_86 and sm_89;
2. every configuration each kernel module lists in ``aot_configs()`` (each dtype, flag and tile
   of its table) for sm_90, and one per kernel, tile and dtype for sm_80 and sm_86, specialised like
   the launch of the same kernel in (1) closest to it (the same unit strides, alignment and
   divisibility), so that no constexpr variant is left to fail on a user's GPU. An entry of a
   kernel no bench case launches is compiled as listed (plain ``i32``) and said so.

It fails on a compile error, or on a launch of (1) whose shared memory exceeds its architecture's
limit. Compiles run in parallel, one process per core: 935 compiles before sm_89's listed ones were
dropped took 35 min on 2 cores shared with a load of ~7 (this list: ~790).
"""

import concurrent.futures as cf
import importlib
import os
import pkgutil
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import fastpeft.kernels  # noqa: E402
from fastpeft.bench import static  # noqa: E402
from fastpeft.kernels import aot  # noqa: E402

ARCHS = (90, 80, 86, 89)
# Listed configurations beyond sm_90: one per kernel, tile and dtype for sm_80 and for sm_86, the
# 99 KiB class (sm_89 generates the same code for these kernels; its bench launches are compiled).
LISTED_ALSO_FOR = (80, 86)
# sm_89 launches whose spec sm_86 launches too are compiled once, for sm_86: the same 99 KiB limit,
# and Triton gave both the same PTX and shared memory (12 of 12 sampled launches, Triton 3.6);
# 46 of sm_89's 47 bench launches, ~22 s of CI on 2 cores.
PTX_TWIN_OF = {89: 86}


def _modules():
    for info in pkgutil.iter_modules(fastpeft.kernels.__path__):
        module = importlib.import_module(f"fastpeft.kernels.{info.name}")
        if hasattr(module, "aot_configs"):
            yield info.name, module


def _like(entry: aot.Spec, launched: list) -> aot.Spec | None:
    """`entry` (a listed configuration) specialised as the launched spec of its kernel closest to it."""
    same = [s for s in launched if s.kernel == entry.kernel and s.module == entry.module]
    if not same:
        return None
    want = dict(entry.constexprs)
    template = max(same, key=lambda s: sum(dict(s.constexprs).get(k) == v for k, v in want.items()))
    ones = {k: v for k, v in template.constexprs if k not in want}          # integers equal to 1
    types = dict(entry.signature)
    signature = tuple((name, "constexpr" if name in ones or name in want else
                       (types[name] if types[name].startswith("*") else dict(template.signature)[name]))
                      for name, _ in template.signature)
    return aot.Spec(entry.module, entry.kernel, signature, tuple(ones.items()) + entry.constexprs,
                    template.attrs, entry.options)


def compile_one(spec: aot.Spec, arch: int) -> tuple[str | None, int]:
    """Compile a spec for sm_`arch`: (the error text or None, shared memory in bytes)."""
    try:
        compiled = aot.compile_spec(spec, arch)
        if not compiled.asm.get("cubin"):
            return "no cubin produced", 0
        return None, compiled.metadata.shared
    except Exception as e:  # report every failure, not just the first
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 0


def main() -> int:
    t0 = time.time()
    jobs: dict[tuple, str] = {}   # (spec, arch) -> where it came from
    launched = []
    twins = 0
    for arch in ARCHS:
        for op, case in static.bench_cases():
            for launch in static.record_case(op, case, arch):
                spec = aot.jit_spec(launch, arch)
                launched.append(spec)
                if (spec, PTX_TWIN_OF.get(arch)) in jobs:
                    twins += 1
                    continue
                jobs.setdefault((spec, arch), f"launch {op} [{case}]")
    as_listed = 0
    for name, module in _modules():
        seen = set()
        for kernel, signature, constexprs, options in module.aot_configs():
            entry = aot.spec_from_signature(kernel, signature, constexprs, options)
            spec = _like(entry, launched)
            if spec is None:
                spec, as_listed = entry, as_listed + 1
            jobs.setdefault((spec, 90), f"aot_configs {name}")
            tile = (kernel.__name__, tuple(v for k, v in signature.items() if v.startswith("*")),
                    tuple(sorted((k, v) for k, v in constexprs.items() if k.startswith("BLOCK_") or k == "NB")),
                    tuple(sorted(options.items())))
            if tile not in seen:
                seen.add(tile)
                for arch in LISTED_ALSO_FOR:
                    jobs.setdefault((spec, arch), f"aot_configs {name}")
    failures = []
    keys = list(jobs)
    with cf.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for (spec, arch), (error, shared) in zip(keys, pool.map(compile_one, *zip(*keys), chunksize=4)):
            where = jobs[(spec, arch)]
            if error:
                failures.append(f"{where}: {aot.describe(spec)} sm_{arch}: {error}")
            elif where.startswith("launch") and shared > aot.SMEM_PER_BLOCK_OPTIN[arch]:
                failures.append(f"{where}: {aot.describe(spec)} sm_{arch}: {shared} B of shared memory > "
                                f"{aot.SMEM_PER_BLOCK_OPTIN[arch]} B per block")
    n_launch = sum(1 for w in jobs.values() if w.startswith("launch"))
    print(f"triton AOT: compiled {len(keys) - len(failures)} of {len(keys)} kernel configurations "
          f"({n_launch} bench launches as the JIT specialises them, {len(keys) - n_launch} listed configurations"
          f"{f', {as_listed} of them unspecialised: no bench case launches their kernel' if as_listed else ''}"
          f"{f'; {twins} launches left to their PTX twin' if twins else ''}) "
          f"for sm_{', sm_'.join(map(str, ARCHS))} in {time.time() - t0:.0f} s")
    for f in failures:
        print("FAILED", f)
    return 1 if failures or not keys else 0


if __name__ == "__main__":
    sys.exit(main())
