"""The bench's machinery: one runner (interleaved, seeded order, per-layer times, the face that
ran), targets as data, the report's tables and chart, and bitsandbytes measured at its best."""

import glob
import json
import os

import pytest
import torch

import fastpeft
from fastpeft import bench
from fastpeft.bench import AT_LEAST, AT_MOST, BenchOp, Case, Target, multi_lora, nf4_matmul, runner

RESULTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "*.json")))


def counting_op(calls: list, targets=(), layers=1) -> BenchOp:
    """An op whose three variants note each call; the baseline is 'slow'."""
    def variants(case, device):
        return {name: (lambda name=name: calls.append(name)) for name in ("slow", "fastpeft", "rival")}
    return BenchOp("toy", lambda device, quick: [Case("c", "fwd", "fp32", dict(M=1), tuple(targets), layers)],
                   variants, baseline="slow", peers=("rival",), reference=None)


def test_one_runner_interleaves_in_a_seeded_shuffled_order_and_reports_per_layer(monkeypatch):
    fake_ms = {"slow": 8.0, "fastpeft": 2.0, "rival": 4.0}
    calls = []
    monkeypatch.setattr(runner, "_time_once_ms", lambda fn, device: (fn(), fake_ms[calls[-1]])[1])
    targets = [Target("fastpeft/slow", AT_MOST, 0.2, "x", "issue 0"), Target("rival/fastpeft", AT_LEAST, 2, "y", "z")]
    [row] = runner.run_op(counting_op(calls, targets, layers=4), "cpu", quick=True)
    warmup, rounds = runner.repetitions("cpu", True)
    timed = calls[3 * warmup:]
    assert len(timed) == 3 * rounds
    rounds_order = [tuple(timed[i:i + 3]) for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["fastpeft", "rival", "slow"] for r in rounds_order)
    calls.clear()
    runner.run_op(counting_op(calls, targets, layers=4), "cpu", quick=True)
    assert [tuple(calls[3 * warmup:][i:i + 3]) for i in range(0, 3 * rounds, 3)] == rounds_order  # seeded
    assert row["times_ms"] == {"slow": 2.0, "fastpeft": 0.5, "rival": 1.0}  # per layer
    assert row["ratios"] == {"fastpeft/slow": 0.25, "fastpeft/rival": 0.5}
    assert [(t["value"], t["met"]) for t in row["targets"]] == [(0.25, False), (2.0, True)]
    assert row["targets"][0] == dict(ratio="fastpeft/slow", direction=AT_MOST, limit=0.2, value=0.25, met=False,
                                     compares="x", source="issue 0")


def test_the_rival_order_of_a_round_is_not_a_rotation():
    """Rotating by one kept each variant behind the same one; the shuffle must not."""
    calls = []
    bench.time_variants_ms({n: (lambda n=n: calls.append(n)) for n in "abcd"}, "cpu", warmup=0, rounds=12)
    predecessors = {(calls[i - 1], calls[i]) for i in range(1, len(calls)) if i % 4}
    assert len(predecessors) > 4


def test_target_directions_and_unmeasured_targets():
    at_most, at_least = Target("a/b", AT_MOST, 1.0, "", ""), Target("a/b", AT_LEAST, 1.0, "", "")
    assert at_most.met_by(1.0) and not at_most.met_by(1.01) and at_least.met_by(1.0) and not at_least.met_by(0.99)
    assert at_most.record(None)["met"] is None
    with pytest.raises(ValueError, match="direction"):
        Target("a/b", "below", 1.0, "", "")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_target_says_where_it_comes_from_and_can_be_measured(device, monkeypatch):
    for isa in ("avx512_bf16", "avx2"):  # the NF4 CPU targets depend on the CPU
        monkeypatch.setattr(nf4_matmul, "_cpu_isa_supported", lambda isa=isa: isa)
        for op in bench.OPS.values():
            for case in op.cases(device, quick=False):
                for target in case.targets:
                    assert target.source.startswith("issue ") and target.compares, (op.name, target)
                    derived = {multi_lora.OVERHEAD, multi_lora.VS_ONE_ADAPTER}
                    a, _, b = target.ratio.partition("/")
                    assert target.ratio in derived or {a, b} <= set(op.variant_names), (op.name, target)


def test_multi_lora_derives_the_adapters_cost_and_the_cost_of_more_adapters():
    shape = dict(T=64, K=8, N=8, r=4)
    rows = [dict(**shape, U=u, times_ms=dict(base=10.0, fastpeft=f, peft=14.0), ratios={})
            for u, f in ((1, 11.0), (8, 12.1))]
    multi_lora.derive_ratios(rows)
    assert rows[0]["ratios"][multi_lora.OVERHEAD] == pytest.approx(0.25)
    assert rows[1]["ratios"][multi_lora.OVERHEAD] == pytest.approx(0.525)
    assert rows[1]["ratios"][multi_lora.VS_ONE_ADAPTER] == pytest.approx(1.1)
    assert multi_lora.VS_ONE_ADAPTER not in rows[0]["ratios"]


def test_the_face_recorded_is_the_face_that_ran():
    [case] = multi_lora.cases("cpu", quick=True)
    variants = multi_lora.variants(case, "cpu")
    with fastpeft.use_backend("torch"), runner.faces_taken() as faces:
        variants["fastpeft"]()
    assert faces and set(faces.values()) == {"torch"}
    family = next(iter(faces)).split("_")[0]
    assert family in ("bgmv", "sgmv") and runner.describe_faces(multi_lora.BENCH, case, faces) == f"torch ({family})"
    with runner.faces_taken() as outside:
        pass
    variants["fastpeft"]()  # after the block, nothing more is recorded
    assert outside == {} and not any("run" in vars(op) for op in fastpeft.ops.all_ops().values())


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_the_report_reads_every_stored_result(path, tmp_path):
    rows = json.load(open(path))["results"]
    tables = bench.format_tables(rows)
    assert tables.count("\ncase ") + tables.startswith("case ") == len({r["op"] for r in rows})
    assert "overhead fastpeft/peft" not in tables.split("nf4_matmul\n", 1)[1]  # each table its own columns
    bench.plot(rows, bench.OPS, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_nf4_bench_runs_bitsandbytes_at_its_best():
    """Inference cases put every layer in eval mode, where bitsandbytes takes its fast CPU path (on an
    AVX512_BF16 CPU: its weight repacked for its bf16 kernel on the first call); the training case
    runs training mode, its only path there."""
    bnb = pytest.importorskip("bitsandbytes")

    for case in (nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(1, 256, 256)),
                 nf4_matmul.case("training", "fwd+bwd", "bf16", nf4_matmul.dims(4, 256, 128))):
        layers = nf4_matmul.build_layers(case, "cpu")
        assert set(layers) == {"linear", "fastpeft", "bitsandbytes"}
        assert all(layer.training == case.training for group in layers.values() for layer in group)
        assert case.modules == ("train" if case.training else "eval")
        nf4_matmul.variants(case, "cpu", layers)["bitsandbytes"]()
        repacked = getattr(layers["bitsandbytes"][0].weight.quant_state, "packing_format_for_cpu", False)
        assert repacked == (not case.training and bool(bnb.functional.has_avx512bf16()))


def test_nf4_decode_times_are_per_layer_of_distinct_weights():
    case = nf4_matmul.cases("cpu", quick=False)[0]
    assert case.layers == nf4_matmul.DECODE_LAYERS and case.shape.endswith(f"x{case.layers} layers")
    small = nf4_matmul.case("decode", "fwd", "bf16", nf4_matmul.dims(1, 64, 32), layers=3)
    layers = nf4_matmul.build_layers(small, "cpu")
    assert all(len(group) == 3 for group in layers.values())
    weights = [layer.weight for layer in layers["linear"]]
    assert not torch.equal(weights[0], weights[1])
