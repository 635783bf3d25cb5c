"""The device check (benchmarks/device_check.sh) in its CPU stand-in mode, and what it relies on:
benchmarks/smoke.py's records, and `fastpeft bench --json` keeping every finished case's row when a
run is stopped part way. These run where no GPU is, so the script cannot rot between the rare
sessions that have one."""

import datetime
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from fastpeft import bench, cli
from fastpeft.bench import AT_MOST, BenchOp, Case, Target

ROOT = pathlib.Path(__file__).resolve().parents[1]


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_device_checks_smoke_run_works_on_the_cpu(tmp_path):
    """benchmarks/smoke.py, the device check's first step, in its CPU stand-in mode."""
    smoke = benchmark_script("smoke")
    out = tmp_path / "smoke.jsonl"
    assert smoke.main(["--device", "cpu", "--quick", "--op", "nf4_matmul", "--op", "multi_lora",
                       "--jsonl", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    faces = {r["face"] for r in records}
    assert {"triton"} <= faces and all(r["ok"] for r in records) and {r["op"] for r in records} == {"nf4_matmul",
                                                                                                  "multi_lora"}


def test_the_face_sweep_works_on_the_cpu(tmp_path):
    """benchmarks/face_sweep.py, the device check's crossover step, on the quick shapes: a row per M
    and op, each with wall times and kernel times of the same variants, every forced face among them."""
    face_sweep = benchmark_script("face_sweep")
    out = tmp_path / "sweep.json"
    assert face_sweep.main(["--device", "cpu", "--quick", "--op", "nf4_matmul", "--op", "lora_linear",
                            "--rows", "1,3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "partial" not in data
    rows = data["results"]
    assert [(r["op"], r["M"]) for r in rows] == [("nf4_matmul", 1), ("nf4_matmul", 3), ("lora_linear", 1),
                                                 ("lora_linear", 3)]
    for row in rows:
        assert set(row["kernel_us"]) == set(row["times_ms"]) and "fastpeft[cpu]" in row["times_ms"]
        assert all(v > 0 for v in row["kernel_us"].values())


class Stopped(Exception):
    """Stands for the device check's timeout killing a bench part way."""


def stopping_op(stop_at: str | None) -> BenchOp:
    """Three cases, c1 c2 c3, each held to a target on fastpeft/slow; the variants of case `stop_at`
    raise Stopped."""
    target = Target("fastpeft/slow", AT_MOST, 1.0, "toy", "this test")

    def cases(device, quick):
        return [Case(f"c{i}", "fwd", "fp32", dict(M=i), (target,)) for i in (1, 2, 3)]

    def variants(case, device):
        def call():
            if case.label == stop_at:
                raise Stopped(case.label)
        return {"slow": call, "fastpeft": call}
    return BenchOp("toy", cases, variants, baseline="slow", reference=None)


def test_bench_json_keeps_the_finished_cases_when_a_run_stops_part_way(tmp_path, monkeypatch):
    """The results file is rewritten after every case, marked partial, so an op stopped at its third
    case (the device check's per-op timeout) keeps the first two rows; a run that ends writes the
    file as before, without the mark; the side file of each rewrite is renamed away."""
    path = tmp_path / "bench-toy.part"
    monkeypatch.setitem(bench.ALL_OPS, "toy", stopping_op("c3"))
    with pytest.raises(Stopped):
        cli.main(["bench", "--device", "cpu", "--quick", "--no-progress", "--op", "toy", "--json", str(path)])
    stopped = json.loads(path.read_text())
    assert stopped["partial"] is True and stopped["environment"]["device"] == "cpu"
    assert [r["label"] for r in stopped["results"]] == ["c1", "c2"]
    assert all(r["times_ms"]["fastpeft"] > 0 for r in stopped["results"])
    assert all([t["ratio"] for t in r["targets"]] == ["fastpeft/slow"] and r["targets"][0]["value"] is not None
               for r in stopped["results"])  # checked against what each row measured
    tables = bench.format_tables(stopped["results"])  # the report reads it as it is
    assert "\nc1 " in tables and "\nc2 " in tables and "\nc3 " not in tables
    assert os.listdir(tmp_path) == [path.name]

    monkeypatch.setitem(bench.ALL_OPS, "toy", stopping_op(None))
    assert cli.main(["bench", "--device", "cpu", "--quick", "--no-progress", "--op", "toy", "--json", str(path)]) == 0
    ended = json.loads(path.read_text())
    assert set(ended) == {"environment", "results"} and [r["label"] for r in ended["results"]] == ["c1", "c2", "c3"]
    assert os.listdir(tmp_path) == [path.name]


def test_bench_rows_are_handed_over_as_each_case_ends():
    """runner.run: `on_case` sees each row when its case ends, before the next case starts; the
    rows returned are the same dicts, completed."""
    seen, order = [], []
    op = stopping_op(None)
    timed = op.variants

    def variants(case, device):
        order.append(f"start {case.label}")
        return timed(case, device)
    op = BenchOp(op.name, op.cases, variants, op.baseline, reference=None)
    rows = bench.run([op], "cpu", quick=True, on_case=lambda row: (seen.append(row), order.append(f"end {row['label']}")))
    assert order == ["start c1", "end c1", "start c2", "end c2", "start c3", "end c3"]
    assert all(a is b for a, b in zip(seen, rows)) and len(seen) == 3


# ---------------------------------------------------------------- the script, end to end on the CPU

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="the device check is a bash script that times its steps with timeout(1)")
def test_device_check_script_leaves_every_file_under_out_when_a_step_times_out(tmp_path):
    """benchmarks/device_check.sh in its CPU stand-in mode, on two ops (about 70 s on the 2-vCPU
    machine): versions, the extension's stand-in build, the smoke records of each op (Triton, then
    the C++ faces), the bench an op at a time merged into one results file, pytest last. multi_lora's
    bench is given 1 s and times out; in $OUT before it starts lie a bench part a killed run left
    unreadable and one a timed-out bench left after its first case: the rest must be there all the
    same, the unreadable part left and named, the cut one merged and the results marked partial."""
    out = tmp_path / "out"
    out.mkdir()
    broken = out / "bench-broken.part"
    broken.write_text('{"environment": {}, "results": [{"op": "nf4_ma')
    cut = {"environment": {"device": "cpu"}, "results": [{"op": "lora_linear", "label": "decode"}], "partial": True}
    (out / "bench-lora_linear.part").write_text(json.dumps(cut))  # what a bench stopped after one case leaves
    env = dict(os.environ, FASTPEFT_DEVICE_CHECK_CPU="1", OUT=str(out), PYTHON=sys.executable,
               FASTPEFT_DEVICE_CHECK_OPS="nf4_matmul multi_lora", FASTPEFT_DEVICE_CHECK_LIMITS="bench-multi_lora=1",
               FASTPEFT_DEVICE_CHECK_SECONDS="300")
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=400)
    log = (out / "device_check.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    [results] = [name for name in files if name.endswith("-cpu.json")]  # <date>-<gpu>.json
    datetime.date.fromisoformat(results[:-len("-cpu.json")])
    assert files == sorted(["device_check.log", "build.log", "smoke.jsonl", "bench.txt", results, "tests.txt",
                            "pytest.xml", "bench-broken.part"]), files
    assert len(files) <= 8  # what the device tool brings back

    # versions, then the stand-in build (nothing rebuilt in the tree), every step logged to the end
    import torch
    import triton
    assert f"torch {torch.__version__}" in log and f"triton {triton.__version__}" in log and "python 3." in log
    assert (out / "build.log").read_text().splitlines()[-1] == "build exit 0"
    spread = all(importlib.util.find_spec(name) for name in ("xdist", "pytest_timeout"))
    assert ("pytest: 8 processes (pytest-xdist), 60 s a test" in log) == spread
    assert ("pytest-xdist or pytest-timeout missing: the tests run in one process" in log) != spread
    assert log.rstrip().splitlines()[-1].startswith("=== done")

    # smoke: each op's Triton face, then the C++ faces of both, every record read back
    records = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert {(r["op"], r["face"]) for r in records} >= {(op, face) for op in ("nf4_matmul", "multi_lora")
                                                       for face in ("triton", "cpu")}
    assert all(r["ok"] is not False for r in records), [r for r in records if r["ok"] is False]
    assert f"smoke: {len(records)} records" in log

    # the bench: nf4_matmul's rows merged; multi_lora timed out before its first case; the
    # unreadable part left as it was, and named
    assert "bench multi_lora: exit 124" in log and "bench: no rows from multi_lora" in log
    merged = json.loads((out / results).read_text())
    assert merged["environment"]["device"] == "cpu" and merged["partial"] is True
    ops = [r["op"] for r in merged["results"]]   # the ops run first, in their order; then any other part
    assert ops[-1:] == ["lora_linear"] and set(ops[:-1]) == {"nf4_matmul"} and merged["results"][-1] == cut["results"][0]
    assert "cut short by a timeout (the cases that finished): lora_linear" in log
    assert "\nnf4_matmul\n" in f"\n{(out / 'bench.txt').read_text()}"
    assert broken.read_text() == '{"environment": {}, "results": [{"op": "nf4_ma'
    assert f"bench: left unread in {out}: bench-broken.part (JSONDecodeError" in log

    # pytest last: its output and its junit XML
    tests = (out / "tests.txt").read_text()
    assert tests.rstrip().splitlines()[-1] == "pytest exit 0" and " deselected" in tests
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0
