"""The ``fastpeft`` command line: help, --version, and bad values refused in one line, exit 2,
before any work starts."""

import argparse
import json
import importlib.util
import re

import pytest

import fastpeft
from fastpeft import bench, cli, compare, finetune
from fastpeft.bench.variants import speed_faces

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work replaced by a failure: a refusal must come before any of it."""
    def started(*args, **kwargs):
        raise AssertionError("the command started its work before refusing its arguments")
    monkeypatch.setattr(finetune, "run", started)
    monkeypatch.setattr(compare, "run", started)
    monkeypatch.setattr(bench, "run", started)


def refusal(argv, capsys) -> str:
    """The error line of a refused command line (argparse's usage is printed above it)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastpeft")
    line = err.rstrip("\n").splitlines()[-1]
    assert ": error: " in line
    return line


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastpeft {fastpeft.__version__}"


@pytest.mark.parametrize("argv, says", [
    (["finetune", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["finetune", "--r", "0"], "argument --r: must be at least 1, got 0"),
    (["finetune", "--batch-size", "-3"], "argument --batch-size: must be at least 1, got -3"),
    (["finetune", "--lr", "0"], "argument --lr: must be a finite number above 0"),
    (["finetune", "--target-sparsity", "1"], "argument --target-sparsity: must be in [0, 1)"),
    (["finetune", "--steps", "ten"], "argument --steps: invalid positive_int value: 'ten'"),
    (["finetune", "--method", "bitfit", "--compare", "peft"], "--compare peft trains lora, qlora, dora only, not bitfit"),
    (["finetune", "--model", "/nonexistent"], "argument --model: /nonexistent: neither a model fastpeft knows"),
    (["compare", "--model", "/nonexistent"], "argument --model: /nonexistent: neither a model fastpeft knows"),
    (["finetune", "--model", "minilm"], "argument --model: minilm is an encoder"),
    (["compare", "--methods", "lora,bogus"], "argument --methods: unknown method(s) bogus; choose from icl0,icl,lora"),
    (["compare", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["compare", "--json", "/missing/dir/x.json"], "argument --json: /missing/dir/x.json: folder /missing/dir"),
    (["bench", "--plot", "/missing/dir/x.png"], "argument --plot: /missing/dir/x.png: folder /missing/dir does not"),
    (["bench", "--op", "nf4"], "argument --op: invalid choice: 'nf4'"),
])
def test_bad_values_are_one_line_errors_before_any_work(argv, says, capsys, no_work):
    line = refusal(argv, capsys)
    assert line.startswith(f"fastpeft {argv[0]}: error: ") and says in line, line


def test_a_model_folder_without_a_config_is_refused_without_the_hub(tmp_path, capsys, no_work):
    (tmp_path / "weights.bin").write_bytes(b"")
    line = refusal(["finetune", "--model", str(tmp_path)], capsys)
    assert f"{tmp_path}: no config.json in it" in line


def test_every_option_says_its_default():
    top, commands = cli.parsers()
    formatter = cli.DefaultsInHelp("fastpeft")
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            help_text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in help_text, (name, action.option_strings, help_text)
    assert cli.parsers()[1]["compare"].get_default("steps") == compare.CompareSettings.steps == 150
    assert cli.parsers()[1]["finetune"].get_default("steps") == finetune.FinetuneSettings.steps


def test_the_methods_list_is_parsed(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(compare, "run", lambda settings, **kw: seen.setdefault("methods", settings.methods))
    assert cli.main(["compare", "--methods", "lora, ia3", "--no-progress"]) == 0
    assert seen["methods"] == ["lora", "ia3"]


def test_info_and_a_quick_bench_with_its_chart(tmp_path, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "lora_linear_fwd" in out
    ext = fastpeft.backends.extension()
    if ext is not None:  # the CPU's features, the kernels' level, and the NF4 path of each shape
        assert f"CPU kernels: {ext.cpu_isa()}" in out and "NF4 CPU paths" in out
        assert all(f" {name}" in out for name in ext.cpu_features())
        assert ext.nf4_cpu_path(1, 4096, 64, "bfloat16") in out and ext.nf4_cpu_path(64, 4096, 64, "float32") in out
        dense = out.split("dense_linear CPU paths", 1)[1]
        assert f"M = 1       {ext.dense_cpu_path(1, 'float32'):<20}" in dense and "M = 5       aten" in dense
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--quick", "--no-progress", "--json", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["op"] for r in rows} == set(bench.OPS) | set(bench.MODEL_OPS)  # e2e on a tiny Llama when quick
    assert all(r["modules"] == "eval" for r in rows if r["op"] == "nf4_matmul")  # the peer at its best: eval mode
    assert all(r["times_ms"]["fastpeft"] > 0 and any(k.startswith("fastpeft/") for k in r["ratios"]) for r in rows)
    # the face is the one that ran: multi_lora's names its kernels' face and family
    multi = next(r for r in rows if r["op"] == "multi_lora")
    assert set(multi["faces_taken"]) <= {"bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand"}
    face = set(multi["faces_taken"].values()).pop()
    family = next(iter(multi["faces_taken"])).split("_")[0]
    assert multi["auto_face"] == f"{face} ({family})"
    # a table per op, each with its own variants' columns only
    for op in bench.OPS:
        assert f"\n{op}\n" in f"\n{out}"
    nf4_columns = re.split(r"\s{2,}", out.split("nf4_matmul\n", 1)[1].splitlines()[0])
    assert nf4_columns == ["case", "shape", "dtype", "mode", "face", "linear ms", "fastpeft ms"] + [
        f"fastpeft[{f}] ms" for f in speed_faces("cpu")] + (
        ["bitsandbytes ms", "fastpeft/linear", "fastpeft/bitsandbytes"] if HAS_BNB else ["fastpeft/linear"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["bench", "--quick", "--no-progress", "--op", "nf4_matmul", "--op", "phm_linear",
                     "--json", str(path)]) == 0
    assert {r["op"] for r in json.loads(path.read_text())["results"]} == {"nf4_matmul", "phm_linear"}


def test_bench_case_runs_only_the_cases_of_that_label(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--no-progress", "--op", "e2e", "--case", "4-bit generation",
                     "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["label"] for r in rows] == ["4-bit generation"]
    with pytest.raises(SystemExit, match="--case: no case is labelled 'prefil' among the chosen ops' cases here "
                                         "\\('quick'\\)"):
        cli.main(["bench", "--quick", "--no-progress", "--op", "lora_linear", "--case", "prefil"])
