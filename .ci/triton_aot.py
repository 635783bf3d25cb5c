"""Compile the Triton kernel configurations fastpeft launches, for sm_90 and sm_80, without a GPU.

Each module in fastpeft/kernels/ lists its launch configurations in ``aot_configs()``; a compile error in
any of them (a bad tile shape, an op the target lacks) fails CI here instead of on a user's GPU.
Every configuration is compiled for sm_90 (the GPU the project measures on); for sm_80, one per
kernel and pointer signature (dtype), since what differs between architectures is the MMA and
memory instructions a dtype selects, not the constexpr branches (all 470 compiles took 414 s of
a 19-minute CI; this set about half). Compiles run in parallel, one process per core.
"""

import concurrent.futures as cf
import importlib
import os
import pkgutil
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastpeft.kernels  # noqa: E402

ARCHS = (90, 80)


def _modules():
    for info in pkgutil.iter_modules(fastpeft.kernels.__path__):
        module = importlib.import_module(f"fastpeft.kernels.{info.name}")
        if hasattr(module, "aot_configs"):
            yield info.name, module


def compile_one(module_name: str, index: int, arch: int) -> str | None:
    """Compile configuration `index` of `module_name` for sm_`arch`; the error text, or None."""
    module = importlib.import_module(f"fastpeft.kernels.{module_name}")
    kernel, signature, constexprs, options = list(module.aot_configs())[index]
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        if not compiled.asm.get("cubin"):
            return "no cubin produced"
    except Exception as e:  # report every failure, not just the first
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def main() -> int:
    t0 = time.time()
    jobs = []
    for name, module in _modules():
        seen_on_sm80 = set()
        for i, (kernel, signature, _, _) in enumerate(module.aot_configs()):
            jobs.append((name, i, 90))
            key = (kernel.__name__, tuple(sorted(signature.items())))
            if key not in seen_on_sm80:
                seen_on_sm80.add(key)
                jobs.append((name, i, 80))
    failures = []
    with cf.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for job, error in zip(jobs, pool.map(compile_one, *zip(*jobs))):
            if error:
                name, i, arch = job
                module = importlib.import_module(f"fastpeft.kernels.{name}")
                kernel, _, constexprs, options = list(module.aot_configs())[i]
                failures.append(f"{name}.{kernel.__name__} sm_{arch} {constexprs} {options}: {error}")
    print(f"triton AOT: compiled {len(jobs) - len(failures)} of {len(jobs)} kernel configurations for "
          f"sm_{', sm_'.join(map(str, ARCHS))} in {time.time() - t0:.0f} s")
    for f in failures:
        print("FAILED", f)
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
