"""fastpeft's CLI as on an AVX2-only x86 CPU, run on a CPU that has AVX-512: an emulation. The cores,
caches, clocks and memory stay this machine's; only the instruction sets the libraries pick are
capped, each where it decides:

* ``FASTPEFT_CPU_ISA=avx2``: fastpeft's C++ kernels (``fastpeft._C.cpu_isa()`` says ``avx2``);
* ``ATEN_CPU_CAPABILITY=avx2``: torch's vectorised kernels (``torch.backends.cpu.get_cpu_capability()``
  says ``AVX2``);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN, which then has no bf16 matmul (its ``avx512_core_bf16``
  brgemm is gone; ``ONEDNN_VERBOSE=1`` shows no matmul), so torch's bf16 matmul takes ATen's own GEMM,
  as on an AVX2 CPU;
* ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL's fp32 GEMMs;
* bitsandbytes decides from CPUID alone (its native ``has_avx512bf16_cpu``), which no variable caps:
  its answer is replaced by False as bitsandbytes loads, so it neither registers its CPU
  ``gemv_4bit`` kernel nor repacks weights in eval mode: its path on an AVX2 CPU (dequantize, then
  matmul). Its native library is one build whose dequantize kernel has AVX-512 instructions in it;
  that cannot be capped, so bitsandbytes' emulated times are if anything flattering.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/avx2_capped.py bench --op e2e --json F.json

takes the arguments of ``fastpeft``; the caps already in the environment are kept as set.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

CAPS = {"FASTPEFT_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


class _BitsandbytesWithoutAvx512Bf16(importlib.abc.MetaPathFinder):
    """Loads bitsandbytes.cextension as usual, then makes its native library answer that the CPU
    lacks AVX512_BF16, before any other bitsandbytes module asks."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_then_cap(module):
            exec_module(module)
            native = getattr(module.lib, "_lib", None)  # absent: no native library, no AVX512_BF16 kernel
            if native is not None:
                native.has_avx512bf16_cpu = lambda: False
        spec.loader.exec_module = exec_then_cap
        return spec


def cap() -> None:
    """Set the caps; must run before torch or bitsandbytes is imported."""
    if "torch" in sys.modules or "bitsandbytes" in sys.modules:
        raise RuntimeError("avx2_capped.cap() must run before torch and bitsandbytes are imported")
    for name, value in CAPS.items():
        os.environ.setdefault(name, value)
    sys.meta_path.insert(0, _BitsandbytesWithoutAvx512Bf16())


if __name__ == "__main__":
    cap()
    from fastpeft.cli import main

    sys.exit(main(sys.argv[1:]))
