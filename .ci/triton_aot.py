"""Compile every Triton kernel configuration fastpeft launches, for sm_80 and sm_90, without a GPU.

Each module in kernels/ lists its launch configurations in ``aot_configs()``; a compile error in
any of them (a bad tile shape, an op the target lacks) fails CI here instead of on a user's GPU.
"""

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

ARCHS = (80, 90)


def main() -> int:
    failures, count, t0 = [], 0, time.time()
    for mod_info in pkgutil.iter_modules(fastpeft.kernels.__path__):
        module = importlib.import_module(f"fastpeft.kernels.{mod_info.name}")
        if not hasattr(module, "aot_configs"):
            continue
        for kernel, signature, constexprs, options in module.aot_configs():
            for arch in ARCHS:
                name = f"{mod_info.name}.{kernel.__name__} sm_{arch} {constexprs} {options}"
                src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                constexprs=constexprs)
                try:
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    assert compiled.asm.get("cubin"), "no cubin produced"
                    count += 1
                except Exception as e:  # report every failure, not just the first
                    failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"triton AOT: compiled {count} kernel configurations for sm_{', sm_'.join(map(str, ARCHS))} "
          f"in {time.time() - t0:.0f} s; {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
