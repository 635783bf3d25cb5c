"""The static model's checks (fastpeft/bench/static.py, `fastpeft bench --static --check`, which CI
runs): a spill, shared memory over an architecture's limit per block, and an NF4/LoRA GEMV with less
than 20 KB in flight per SM each fail; a known failure passes, named with its issue.

Nothing is compiled: the launches are the ones the NF4 launcher plans for each bench shape
(recorded on meta tensors), and what the compiler would report of them (registers, spills, shared
memory, the main loop's loads) is made up per test, on either side of each rule's line. The
grid rule has its own test (tests/test_grid_waves.py)."""

import dataclasses

import pytest

from fastpeft.bench import nf4_matmul, static
from fastpeft.kernels import aot

DECODE = nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(1, 4096, 14336))   # the Triton NF4 GEMV
ROWS_16 = nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(16, 4096, 14336))
ROWS_17 = nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(17, 4096, 14336))  # the tiled kernel
PREFILL = nf4_matmul.case("prefill", "fwd", "bf16", nf4_matmul.dims(512, 4096, 14336))


def spec_of(launch: aot.Launch) -> aot.Spec:
    """A Spec keyed on what the model reads of it (tiles, warps, stages). Triton's own binder
    (aot.jit_spec) needs the compiled JITFunction, which the interpreter the tests run under replaces."""
    options = tuple((k, v) for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages"))
    constexprs = tuple((k, v) for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages"))
    return aot.Spec(launch.kernel.fn.__module__, launch.name, (), constexprs, (), options)


def analysed(monkeypatch, case, arch=90, *, regs=64, spill=0, shared=16 * 1024, ldg_bytes=16 * 8, ldgsts_bytes=0):
    """The model's row of each launch NF4 makes for `case` on sm_`arch`, had the compiler reported
    `regs` registers, `spill` bytes of local memory per thread, `shared` bytes of shared memory, and
    a main loop loading `ldg_bytes` into registers and `ldgsts_bytes` into shared memory per thread."""
    monkeypatch.setattr(aot, "jit_spec", lambda launch, arch=90: spec_of(launch))
    launches = static.record_case("nf4_matmul", case, arch)
    assert launches, "NF4 launched no Triton kernel"
    sass = static.Sass(instructions=200, ldg_bytes=ldg_bytes, ldgsts_bytes=ldgsts_bytes,
                       ldg_ops=max(1, ldg_bytes // 16))
    compiled = {(spec_of(launch), arch): (shared, sass, {"REG": regs, "LOCAL": spill}) for launch in launches}
    return [static.analyse("nf4_matmul", case, arch, launch, compiled) for launch in launches]


def problems(rows, what):
    return [p for row in rows for p in row.problems if what in p]


@pytest.mark.parametrize("arch", [90, 80])
def test_a_spill_fails(monkeypatch, arch):
    spilled = analysed(monkeypatch, PREFILL, arch, spill=24)
    assert problems(spilled, "spills") == ["spills 24 B/thread"] * len(spilled)
    failures, known = static.check(spilled)
    assert known == [] and len(failures) == len(spilled)
    assert failures[0].startswith(f"sm_{arch} nf4_matmul [prefill fwd") and failures[0].endswith(": spills 24 B/thread")
    clean = analysed(monkeypatch, PREFILL, arch, spill=0)
    assert problems(clean, "spills") == [] and static.check(clean) == ([], [])


@pytest.mark.parametrize("arch", [90, 80, 86, 89])
def test_shared_memory_over_the_architectures_limit_per_block_fails(monkeypatch, arch):
    """One byte over the opt-in limit per block fails, the limit itself passes. One byte over, no
    CTA fits an SM (the limit plus the 1 KB the driver reserves per CTA is the SM's capacity): the
    row is still made, its problem named."""
    limit = aot.SMEM_PER_BLOCK_OPTIN[arch]
    over = analysed(monkeypatch, PREFILL, arch, shared=limit + 1)
    assert problems(over, "shared memory") == [f"shared memory {limit + 1} B > {limit} B per block"] * len(over)
    at = analysed(monkeypatch, PREFILL, arch, shared=limit)
    assert problems(at, "shared memory") == []
    assert {r.smem_limit for r in at} == {limit}


@pytest.mark.parametrize("case", [DECODE, ROWS_16], ids=["M=1", "M=16"])
@pytest.mark.parametrize("arch", [90, 80])
def test_an_nf4_gemv_under_20_kb_in_flight_per_sm_fails(monkeypatch, case, arch):
    """In flight per SM = the main loop's bytes per thread x threads x CTAs resident (register loads
    of one trip, num_stages - 1 trips of shared-memory copies): 4 bytes a thread is far under the
    line, 16 x 16 far over."""
    starved = analysed(monkeypatch, case, arch, ldg_bytes=4)
    assert all(r.gemv and r.in_flight_sm < static.MIN_IN_FLIGHT for r in starved)
    assert problems(starved, "in flight") == [f"GEMV with {r.in_flight_sm / 1024:.1f} KB in flight per SM < 20 KB"
                                              for r in starved]
    assert len(static.check(starved)[0]) == len(starved)
    fed = analysed(monkeypatch, case, arch, ldg_bytes=16 * 16)
    assert all(r.gemv and r.in_flight_sm >= static.MIN_IN_FLIGHT for r in fed)
    assert problems(fed, "in flight") == []
    # copies into shared memory count num_stages - 1 times: the same bytes as cp.async copies pass
    stages = {dict(spec_of(launch).options).get("num_stages", 3) for launch in static.record_case("nf4_matmul", case, arch)}
    copied = analysed(monkeypatch, case, arch, ldg_bytes=0, ldgsts_bytes=16 * 16)
    assert [r.in_flight_sm for r in copied] == [r.in_flight_sm * max(s - 1, 1) for r, s in zip(fed, stages)]


def test_the_in_flight_rule_is_for_gemvs_on_sm_80_and_sm_90_only(monkeypatch):
    """Not for the tiled kernel (M > 16, prefill), whose loads the tensor cores wait on anyway, nor
    for sm_86/sm_89 (the bench's GPUs are the H200 and the A100)."""
    for case in (ROWS_17, PREFILL):
        rows = analysed(monkeypatch, case, 90, ldg_bytes=4)
        assert not any(r.gemv for r in rows) and problems(rows, "in flight") == []
    for arch in (86, 89):
        rows = analysed(monkeypatch, DECODE, arch, ldg_bytes=4)
        assert all(r.gemv and r.in_flight_sm < static.MIN_IN_FLIGHT for r in rows)
        assert problems(rows, "in flight") == []


def cuda_gemv_row(op, loads_per_thread, spill=0, streaming=0):
    """The model's row of a C++ CUDA GEMV on sm_90 (256 threads and 32 registers each: 8 CTAs
    resident per SM; 8 waves of them) whose main loop loads `loads_per_thread` bytes per thread,
    `streaming` of them marked L1::no_allocate."""
    launch = static.CudaLaunch("gemv.cu", "gemv_kernel", "gemv_kernel<bf16>", grid=8 * static.MACHINES[90]["sms"],
                               threads=256, trips=16, nbytes=64 << 20)
    sass = static.Sass(instructions=100, ldg_bytes=loads_per_thread, streaming_bytes=streaming, ldg_ops=1)
    compiled = {("gemv.cu", 90): {"gemv_kernel": (sass, {"REG": 32, "LOCAL": spill})}}
    case = nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(1, 4096, 14336))
    return static.analyse_cuda(op, case, 90, launch, compiled)


@pytest.mark.parametrize("op", ["nf4_matmul", "lora_linear"])
def test_a_cuda_gemv_under_20_kb_in_flight_or_spilling_fails(op):
    """The C++ GEMVs: in flight = 256 threads x 8 CTAs resident x bytes per thread. 8 bytes each is
    16 KB per SM, under; 16 bytes is 32 KB, over; only the streamed loads count when the kernel
    marks any (the rest hits the cache)."""
    under = cuda_gemv_row(op, 8)
    assert under.in_flight_sm == 8 * 256 * 8 and problems([under], "in flight") == ["GEMV with 16.0 KB in flight per "
                                                                                    "SM < 20 KB"]
    assert cuda_gemv_row(op, 16).problems == []
    assert problems([cuda_gemv_row(op, 32, streaming=8)], "in flight")   # 24 of the 32 bytes hit the cache
    assert cuda_gemv_row(op, 16, spill=8).problems == ["spills 8 B/thread"]
    assert cuda_gemv_row("multi_lora", 8).problems == []   # not a GEMV the rule is for


def test_a_known_failure_passes_named_with_its_issue(monkeypatch):
    """check() sorts every problem into failures and known failures: known by (op, kernel, words in
    the problem), each named with the issue that tracks it; the same problem elsewhere still fails."""
    monkeypatch.setitem(static.KNOWN, ("nf4_matmul", "_nf4_gemv_kernel", "spills"), "issue 0 (a test's)")
    gemv = analysed(monkeypatch, DECODE, spill=8)
    failures, known = static.check(gemv)
    assert failures == [] and len(known) == len(gemv)
    assert all(line.endswith("_nf4_gemv_kernel " + row.config + ": spills 8 B/thread (known: issue 0 (a test's))")
               for line, row in zip(known, gemv))
    tiled = analysed(monkeypatch, PREFILL, spill=8)   # another kernel of the op
    failures, known = static.check(tiled)
    assert known == [] and len(failures) == len(tiled) and not any("known" in line for line in failures)
    starved = analysed(monkeypatch, DECODE, ldg_bytes=4)   # another problem of the same kernel
    failures, known = static.check(starved)
    assert known == [] and len(failures) == len(starved) and "in flight" in failures[0]
    # every entry of the table is recognised as written
    for (op, kernel, what), issue in static.KNOWN.items():
        row = dataclasses.replace(gemv[0], op=op, kernel=kernel, problems=[f"a {what} here"])
        assert static.check([row]) == ([], [f"sm_90 {op} [{row.case}] {kernel} {row.config}: a {what} here "
                                             f"(known: {issue})"])


def test_check_exit_is_1_on_a_failure_and_0_on_known_ones_only(monkeypatch, capsys):
    """`fastpeft bench --static --check`'s exit status, which fails CI."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # read only to refuse running under the interpreter
    spilled = analysed(monkeypatch, DECODE, spill=8)
    monkeypatch.setattr(static, "model", lambda archs, ops=None: spilled)
    assert static.run((90,), check_exit=True) == 1
    assert static.run((90,), check_exit=False) == 0
    monkeypatch.setitem(static.KNOWN, ("nf4_matmul", "_nf4_gemv_kernel", "spills"), "issue 0 (a test's)")
    assert static.run((90,), check_exit=True) == 0
    assert "known: issue 0 (a test's)" in capsys.readouterr().out
