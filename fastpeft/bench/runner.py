"""The one runner: every case of every op timed the same way, into result rows."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Callable

import torch

from .. import backends
from ..ops import all_ops
from .case import BenchOp, Case, Variants


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


@contextlib.contextmanager
def faces_taken():
    """Yields {op name: the face it ran} for every registered op called inside (the first call's
    face each): what the registry picked for this case, as it ran, not a guess from its rule."""
    taken: dict[str, str] = {}
    ops = list(all_ops().values())

    def recording(op):
        run = type(op).run

        def run_and_record(backend, *args):
            taken.setdefault(op.name, backend)
            return run(op, backend, *args)
        return run_and_record

    for op in ops:
        op.run = recording(op)  # shadows the class's method on this object only, until the end
    try:
        yield taken
    finally:
        for op in ops:
            del op.run


def time_variants_ms(variants: Variants, device: str, warmup: int, rounds: int
                     ) -> tuple[dict[str, float], dict, dict[str, str]]:
    """Median milliseconds per call of each variant (CUDA events on the GPU), the faces the
    ``fastpeft`` variant's first warm-up call ran (see :func:`faces_taken`), and the variants that
    were refused, each with the reason: a ``fastpeft[<face>]`` variant forcing a face that one of
    the layer's ops lacks (multi_lora's SGMV ops have no CUDA face) is left out, not fatal.

    Variants run interleaved, one call each per round, so clock and cache drift over the run hits
    them all alike (timing them one after another gave ±20 % swings between identical variants on
    the 2-core CPU). Each round's order is shuffled (seeded): rotating by one left each variant
    behind the same predecessor nearly every round, and what ran before matters (an NF4 decode was
    7 % slower right after the bf16 nn.Linear than after itself)."""
    names, refused = list(variants), {}
    faces: dict[str, str] = {}

    def refusable(name, call):
        try:
            return call()
        except backends.BackendUnavailable as e:
            if not name.startswith("fastpeft["):
                raise
            refused[name] = str(e)
            if device == "cuda":
                torch.cuda.synchronize()  # nothing of the refused call is left in flight

    for name in names:
        for i in range(warmup):
            if name in refused:
                break
            if name == "fastpeft" and i == 0:
                with faces_taken() as faces:
                    variants[name]()
            else:
                refusable(name, variants[name])
    if device == "cuda":
        torch.cuda.synchronize()
    samples = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            if name not in refused:
                ms = refusable(name, lambda: _time_once_ms(variants[name], device))
                if ms is not None:
                    samples[name].append(ms)
    return {name: statistics.median(samples[name]) for name in names if name not in refused}, faces, refused


def repetitions(device: str, quick: bool) -> tuple[int, int]:
    """(warm-up calls, timed rounds) per variant."""
    if quick:
        return 1, 3
    return (10, 100) if device == "cuda" else (2, 15)


def describe_faces(bench_op: BenchOp, case: Case, faces: dict[str, str]) -> str:
    """The face the registry ran for the case: one name when every op call took the same face
    (with the op's detail, NF4's CPU path), else each op's; the kernel family when it is not the
    bench op's own name (multi_lora runs bgmv or sgmv)."""
    if not faces:
        return "none (no registered op ran)"
    distinct = set(faces.values())
    if len(distinct) > 1:
        return ", ".join(f"{op}={face}" for op, face in faces.items())
    face = distinct.pop()
    families = sorted({op.split("_")[0] for op in faces if not op.startswith(bench_op.name)})
    details = [d for d in ["/".join(families), bench_op.face_detail(case, face) if bench_op.face_detail else ""] if d]
    return face + (f" ({', '.join(details)})" if details else "")


def ratio_value(key: str, row: dict) -> float | None:
    """A ratio of the row: one the op derived, or "a/b" of two variants' times; None if not measured."""
    if key in row["ratios"]:
        return row["ratios"][key]
    a, _, b = key.partition("/")
    times = row["times_ms"]
    return times[a] / times[b] if a in times and b in times else None


def chosen_cases(bench_op: BenchOp, device: str, quick: bool, labels: list[str] | None = None) -> list[Case]:
    """The op's cases for the device, only those whose label is one of `labels` when given."""
    cases = bench_op.cases(device, quick)
    return cases if labels is None else [case for case in cases if case.label in labels]


def run_op(bench_op: BenchOp, device: str, quick: bool, progress=None, labels: list[str] | None = None,
           on_case: Callable[[dict], None] | None = None) -> list[dict]:
    """Result rows of every case of one op (of those labelled `labels`, when given), its targets checked.

    ``on_case(row)``, when given, is called as each case finishes, with its row as it stands then:
    the op's derived ratios (:attr:`BenchOp.derive_ratios`, which read all its rows) not yet in it,
    its targets checked against the ratios it has (a target on a derived ratio reads "not measured"
    until the op ends). The same dict is completed in place when the op ends."""
    warmup, rounds = repetitions(device, quick) if quick or bench_op.repetitions is None else bench_op.repetitions
    cases, rows = chosen_cases(bench_op, device, quick, labels), []
    for case in cases:
        variants = bench_op.variants(case, device)
        if progress is not None:
            progress.set_postfix_str(f"{bench_op.name} {case.label} {case.mode}")
        times, faces, refused = time_variants_ms(variants, device, warmup, rounds)
        times = {name: ms / case.layers for name, ms in times.items()}
        ratios = {f"fastpeft/{rival}": times["fastpeft"] / times[rival] for rival in bench_op.rivals if rival in times}
        row = dict(op=bench_op.name, **case.dims, dtype=case.dtype, mode=case.mode, label=case.label,
                   layers=case.layers, shape=case.shape, auto_face=describe_faces(bench_op, case, faces),
                   faces_taken=faces, times_ms=times, ratios=ratios)
        if case.modules:
            row["modules"] = case.modules
        if refused:
            row["refused"] = refused
        row["targets"] = _checked(case, row)
        rows.append(row)
        if on_case is not None:
            on_case(row)
        if progress is not None:
            progress.update(1)
    if bench_op.derive_ratios is not None:
        bench_op.derive_ratios(rows)
    for case, row in zip(cases, rows):
        row["targets"] = _checked(case, row)
    return rows


def _checked(case: Case, row: dict) -> list[dict]:
    return [target.record(ratio_value(target.ratio, row)) for target in case.targets]


def run(ops: list[BenchOp], device: str, quick: bool, progress=None, labels: list[str] | None = None,
        on_case: Callable[[dict], None] | None = None) -> list[dict]:
    """Result rows of the ops' cases (those labelled `labels`, when given: check_labels first);
    `on_case` as :func:`run_op`'s, for every op's cases in turn."""
    return [row for bench_op in ops for row in run_op(bench_op, device, quick, progress, labels, on_case)]


def check_labels(ops: list[BenchOp], device: str, quick: bool, labels: list[str] | None) -> None:
    """Raise ValueError naming every label in `labels` that no case of `ops` has, and the labels they have."""
    if labels is None:
        return
    known = list(dict.fromkeys(case.label for bench_op in ops for case in bench_op.cases(device, quick)))
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"no case is labelled {', '.join(map(repr, unknown))} among the chosen ops' cases here "
                         f"({', '.join(map(repr, known))})")
