"""Kernel microbenchmarks: each fastpeft face beside the base op, the reference and the peers.

Used by ``fastpeft bench`` (a table per op, JSON, optional chart) and by the pytest-benchmark
harness in ``benchmarks/``. An op's module (``lora_linear``, ``dora_linear``, ``multi_lora``,
``nf4_matmul``, ``dense_linear``, ``phm_linear``, ``adapter_block``) declares its :class:`Case` list per device, the
targets each case is held to and where they were set, and how to build the variants of a case; one runner
(:mod:`.runner`) times every variant of a case interleaved in the same run, so the ratios compare
like with like. Whole-model benchmarks (:mod:`.e2e`: generation and a QLoRA step on SmolLM2, each
beside its peer) are in :data:`MODEL_OPS`: a full run takes them only when named (``--op e2e``:
they load a real model), a quick run always (on a tiny random Llama).
"""

from __future__ import annotations

from . import adapter_block, dense_linear, dora_linear, e2e, lora_linear, multi_lora, nf4_matmul, overhead, phm_linear
from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target
from .report import environment, format_tables, plot, write_json
from .runner import check_labels, chosen_cases, run, run_op, time_variants_ms

# what `fastpeft bench --op` picks from, in the order the report shows them
OPS: dict[str, BenchOp] = {m.BENCH.name: m.BENCH for m in (lora_linear, dora_linear, multi_lora, nf4_matmul,
                                                          dense_linear, phm_linear, adapter_block, overhead)}


# whole-model benchmarks: in a full run only when named (they load SmolLM2), in every quick run
MODEL_OPS: dict[str, BenchOp] = {e2e.BENCH.name: e2e.BENCH}
# every name `fastpeft bench --op` takes
ALL_OPS: dict[str, BenchOp] = {**OPS, **MODEL_OPS}


def selected(names: list[str] | None, quick: bool = False) -> list[BenchOp]:
    """The ops named, in :data:`ALL_OPS`' order; for None every kernel op, and the model ops in a
    quick run (a tiny random model stands in for the real one there)."""
    if names is None:
        return list(OPS.values()) + (list(MODEL_OPS.values()) if quick else [])
    return [op for name, op in ALL_OPS.items() if name in names]


def count_cases(device: str, quick: bool, names: list[str] | None = None, labels: list[str] | None = None) -> int:
    return sum(len(chosen_cases(op, device, quick, labels)) for op in selected(names, quick))


__all__ = ["OPS", "MODEL_OPS", "ALL_OPS", "AT_LEAST", "AT_MOST", "BenchOp", "Case", "Target", "check_labels",
           "chosen_cases", "count_cases", "environment", "format_tables",
           "plot", "run", "run_op", "selected", "time_variants_ms", "write_json"]
