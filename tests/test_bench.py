"""The bench's machinery: one runner (interleaved, seeded order, per-layer times, the face that
ran), targets as data, the report's tables and chart, and bitsandbytes measured at its best."""

import glob
import importlib.util
import json
import os

import pytest
import torch

import fastpeft
from fastpeft import backends, bench
from fastpeft.bench import AT_LEAST, AT_MOST, BenchOp, Case, Target, e2e, multi_lora, nf4_matmul, runner

# what `fastpeft bench` wrote; `fastpeft compare`'s tables (named *-compare-*) are test_compare's
RESULTS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "*.json"))
                 if "-compare-" not in os.path.basename(p))


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


def test_an_op_may_set_its_own_repetitions_for_full_runs():
    """A whole model's call takes seconds: an op's own (warm-up, rounds) replace the default in a
    full run; a quick run keeps the quick default."""
    calls = []
    op = counting_op(calls)
    mine = BenchOp(op.name, op.cases, op.variants, op.baseline, op.peers, op.reference, repetitions=(1, 2))
    runner.run_op(mine, "cpu", quick=False)
    assert len(calls) == 3 * (1 + 2)
    calls.clear()
    runner.run_op(mine, "cpu", quick=True)
    assert len(calls) == 3 * sum(runner.repetitions("cpu", True))
    assert runner.repetitions("cpu", False) != (1, 2)


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
        for op in bench.ALL_OPS.values():
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
    if "\nnf4_matmul\n" in f"\n{tables}":  # each table its own columns
        assert "overhead fastpeft/peft" not in tables.split("nf4_matmul\n", 1)[1]
    bench.plot(rows, bench.ALL_OPS, str(tmp_path / "chart.png"))
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


def test_e2e_runs_in_quick_runs_and_in_full_runs_only_when_named():
    """A full run's default leaves the whole-model benchmarks out (they load SmolLM2); a quick run,
    CI's, takes them on a tiny random Llama; --op e2e names them. Their cases are data: listing
    them loads no model."""
    assert e2e.BENCH not in bench.selected(None) and set(bench.selected(None)) == set(bench.OPS.values())
    assert bench.selected(None, quick=True)[-1] is e2e.BENCH
    assert bench.selected(["e2e"]) == [e2e.BENCH] and bench.selected(["e2e", "nf4_matmul"])[0].name == "nf4_matmul"
    before = e2e.model_folder.cache_info().misses
    full = e2e.cases("cpu", quick=False)
    assert e2e.model_folder.cache_info().misses == before
    assert [c.label for c in full] == [e2e.GENERATE, e2e.LORA_GENERATE, e2e.ADAPTER_GENERATE, e2e.QLORA_STEP]
    assert all(c.dims["model"] == "SmolLM2-135M" for c in full)
    assert full[0].dims["new_tokens"] == full[1].dims["new_tokens"] == 64 and full[1].dims["r"] == 16
    assert full[2].dims["adapters"] == full[2].dims["batch"] == 8
    targets = {(t.ratio, t.direction, t.limit) for c in full for t in c.targets}
    assert targets == {("fastpeft/bitsandbytes", AT_MOST, 1.0), ("bf16/fastpeft", AT_LEAST, 1.5),
                       ("peft/fastpeft", AT_LEAST, 1.5)}
    assert all(c.dims["model"] == "tiny-llama" and not c.targets for c in e2e.cases("cpu", quick=True))


def test_e2e_quick_runs_each_path_beside_its_peer():
    """The e2e code path on the tiny Llama: every variant timed in one run, generation times also
    per new token, the peers present (bitsandbytes where it is installed), the 4-bit model's body
    4-bit and its output layer not (a DenseLinear), and the pool's requests each routed to their own adapter."""
    rows = runner.run_op(e2e.BENCH, "cpu", quick=True)
    by_label = {row["label"]: row for row in rows}
    assert set(by_label) == {e2e.GENERATE, e2e.LORA_GENERATE, e2e.ADAPTER_GENERATE, e2e.QLORA_STEP}
    has_bnb = "bitsandbytes" in by_label[e2e.GENERATE]["times_ms"]
    assert has_bnb == (importlib.util.find_spec("bitsandbytes") is not None)
    assert {"bf16", "fastpeft", "floor"} <= set(by_label[e2e.GENERATE]["times_ms"])
    generate = by_label[e2e.GENERATE]
    assert generate["ratios"]["bf16/floor"] == generate["times_ms"]["bf16"] / generate["times_ms"]["floor"]
    assert set(by_label[e2e.ADAPTER_GENERATE]["times_ms"]) == set(by_label[e2e.LORA_GENERATE]["times_ms"]) == {
        "bf16", "fastpeft", "peft"}
    assert set(by_label[e2e.QLORA_STEP]["times_ms"]) == {"bf16", "fastpeft"} | ({"peft+bitsandbytes"} if has_bnb else set())
    for row in rows:
        assert all(ms > 0 for ms in row["times_ms"].values())
        assert row["ratios"]["fastpeft/bf16"] == row["times_ms"]["fastpeft"] / row["times_ms"]["bf16"]
        if "new_tokens" in row:
            assert row["ms_per_token"] == {n: ms / row["new_tokens"] for n, ms in row["times_ms"].items()}
        else:
            assert "ms_per_token" not in row
    assert "nf4_matmul" in by_label[e2e.GENERATE]["faces_taken"]
    assert set(by_label[e2e.ADAPTER_GENERATE]["faces_taken"]) & {"bgmv_shrink", "sgmv_shrink"}
    assert "lora_linear_fwd" in by_label[e2e.LORA_GENERATE]["faces_taken"]

    folder = e2e.model_folder(True)
    model = e2e.load_fastpeft_nf4(folder, "cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, fastpeft.nn.Linear4bit)
    assert type(model.lm_head) is fastpeft.nn.DenseLinear
    # the floor: the same layers answer zeros, the output layer is fastpeft's model's
    floor = e2e.load_floor(folder, "cpu")
    quantised = {n for n, m in model.named_modules() if isinstance(m, fastpeft.nn.Linear4bit)}
    assert quantised and quantised == {n for n, m in floor.named_modules() if isinstance(m, e2e.ZeroLinear)}
    assert type(floor.lm_head) is fastpeft.nn.DenseLinear
    x = torch.randn(2, 3, model.config.intermediate_size)
    assert torch.equal(floor.model.layers[0].mlp.down_proj(x), torch.zeros(2, 3, model.config.hidden_size))
    [case] = [c for c in e2e.cases("cpu", quick=True) if c.label == e2e.ADAPTER_GENERATE]
    variants = e2e.adapter_variants(case, "cpu", quick=True)
    base, pool, peft_out = (variants[n]() for n in ("bf16", "fastpeft", "peft"))
    tokens = case.dims["new_tokens"]
    assert pool.shape == peft_out.shape == (case.dims["batch"], base.shape[1]) and base.shape[1] > tokens
    # every request's adapter changes what it generates, and the pool's first token is PEFT's
    assert not torch.equal(pool, base)
    first = base.shape[1] - tokens
    assert torch.equal(pool[:, first], peft_out[:, first])
    # one adapter: fastpeft's LoRA layers on PEFT's checkpoint, and PEFT's own, change the same first token
    [case] = [c for c in e2e.cases("cpu", quick=True) if c.label == e2e.LORA_GENERATE]
    base, lora, peft_out = (e2e.lora_variants(case, "cpu", quick=True)[n]() for n in ("bf16", "fastpeft", "peft"))
    assert not torch.equal(lora, base)
    first = base.shape[1] - case.dims["new_tokens"]
    assert torch.equal(lora[:, first], peft_out[:, first])


def test_a_variant_forcing_a_face_the_layer_lacks_is_left_out_with_its_reason():
    """On the GPU, multi_lora's SGMV ops have no CUDA face: its fastpeft[cuda] variant is refused
    (the first H200 run stopped the op's whole bench there); any other variant's error still raises."""
    def refused():
        raise backends.BackendUnavailable("sgmv_shrink: backend 'cuda' was forced, but it has no cuda kernel")
    calls = []
    variants = {"base": lambda: calls.append("base"), "fastpeft": lambda: calls.append("fastpeft"),
                "fastpeft[cuda]": refused}
    for warmup in (0, 1):
        times, _, why = bench.time_variants_ms(variants, "cpu", warmup=warmup, rounds=3)
        assert set(times) == {"base", "fastpeft"} and "no cuda kernel" in why["fastpeft[cuda]"]
    with pytest.raises(backends.BackendUnavailable):
        bench.time_variants_ms({"fastpeft": refused}, "cpu", warmup=1, rounds=1)
