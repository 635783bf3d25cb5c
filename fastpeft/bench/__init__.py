"""Kernel microbenchmarks: each fastpeft face beside the base op, the reference and the peers.

Used by ``fastpeft bench`` (a table per op, JSON, optional chart) and by the pytest-benchmark
harness in ``benchmarks/``. An op's module (``lora_linear``, ``dora_linear``, ``multi_lora``,
``nf4_matmul``, ``phm_linear``, ``adapter_block``) declares its :class:`Case` list per device, the
targets each case is held to and where they were set, and how to build the variants of a case; one runner
(:mod:`.runner`) times every variant of a case interleaved in the same run, so the ratios compare
like with like.
"""

from __future__ import annotations

from . import adapter_block, dora_linear, lora_linear, multi_lora, nf4_matmul, overhead, phm_linear
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target
from .report import environment, format_tables, plot, write_json
from .runner import run, run_op, time_variants_ms

# what `fastpeft bench --op` picks from, in the order the report shows them
OPS: dict[str, BenchOp] = {m.BENCH.name: m.BENCH for m in (lora_linear, dora_linear, multi_lora, nf4_matmul,
                                                          phm_linear, adapter_block, overhead)}


def selected(names: list[str] | None) -> list[BenchOp]:
    """The ops named (all of them for None), in :data:`OPS`' order."""
    return [op for name, op in OPS.items() if names is None or name in names]


def count_cases(device: str, quick: bool, names: list[str] | None = None) -> int:
    return sum(len(op.cases(device, quick)) for op in selected(names))


__all__ = ["OPS", "AT_LEAST", "AT_MOST", "BenchOp", "Case", "Target", "count_cases", "environment", "format_tables",
           "plot", "run", "run_op", "selected", "time_variants_ms", "write_json"]
