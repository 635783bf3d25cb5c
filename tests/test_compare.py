"""`fastpeft compare`: one table over methods and ICL, JSON and chart, failures kept to their row."""

import json

import pytest

from fastpeft import cli, compare, finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest



def test_compare_cli_reduced_budget(tmp_path, capsys):
    report, chart = tmp_path / "compare.json", tmp_path / "compare.png"
    assert cli.main(["compare", "--methods", "icl,bitfit,layerfreeze,full", "--steps", "60", "--eval-size", "64",
                     "--threads", "1", "--json", str(report), "--plot", str(chart), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "accuracy" in out and "error" not in out
    rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["icl", "bitfit", "layerfreeze", "full"]
    icl, bitfit, layer, full = rows.values()
    assert icl["trainable_params"] == 0 and icl["checkpoint_bytes"] == 0 and icl["total_params"] > 0
    assert 0 < bitfit["trainable_params"] < layer["trainable_params"] < full["trainable_params"] == full["total_params"]
    for r in (bitfit, layer, full):
        assert 4 * r["trainable_params"] < r["checkpoint_bytes"] < 4 * r["trainable_params"] + 65536  # fp32 + header
        assert r["peak_memory_mb"] > 0 and r["step_ms"] > 0 and r["final_loss"] < r["first_loss"]
        assert r["memory_kind"] == "process RSS above the loaded model, peak"
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and not r["error"]
    assert full["accuracy"] >= 0.9  # the task is learnable: full fine-tuning learns it within the budget
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000


def test_a_failing_method_is_reported_in_its_row(monkeypatch, tmp_path):
    real = finetune.method_config

    def config_or_missing(s):
        if s.method == "prompt":
            raise ImportError("cannot import name 'PromptTuningConfig' (work in progress)")
        return real(s)

    monkeypatch.setattr(finetune, "method_config", config_or_missing)
    settings = compare.CompareSettings(methods=["prompt", "bitfit"], steps=4, eval_size=8, fresh_process=False,
                                       progress=False)
    rows = compare.compare(settings)
    assert rows[0].method == "prompt" and rows[0].error == ("ImportError: cannot import name 'PromptTuningConfig' "
                                                            "(work in progress)")
    assert not rows[1].error and rows[1].trainable_params > 0
    table = compare.format_table(rows)
    assert "prompt" in table and "error: ImportError" in table and "bitfit" in table
    compare.plot(rows, str(tmp_path / "chart.png"))  # the failed row is named on the chart, not drawn
    assert (tmp_path / "chart.png").exists()


def test_a_child_error_comes_back_as_the_row_error():
    # a broken model directory fails in the child process; the parent gets the message
    settings = compare.CompareSettings(methods=["full"], model="/nonexistent/model", steps=2, progress=False)
    rows = compare.compare(settings)
    assert "no tokenizer could be loaded" in rows[0].error


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown methods \\['adalora'\\]"):
        compare.compare(compare.CompareSettings(methods=["adalora"]))
    with pytest.raises(ValueError, match="steps, batch_size and eval_size must be >= 1"):
        compare.compare(compare.CompareSettings(steps=0))


def test_the_synthetic_task_is_consistent():
    s = compare.CompareSettings(steps=3, batch_size=4, eval_size=16)
    task = compare.synthetic_task(s)
    tok = compare.default_tokenizer()
    for text, label in zip(task.eval_texts, task.eval_labels):
        words = text.split()
        assert len(words) == compare.WORDS_PER_REVIEW
        assert [w for w in words if w not in compare.NEUTRAL_WORDS] in [[w] for w in compare.RATING_WORDS[label]]
        assert tok.unk_token_id not in tok(text)["input_ids"]
    batches = list(compare.training_batches(task, tok, s))
    assert len(batches) == 3
    ids, labels, mask = batches[0]
    assert mask is None and ids.shape[0] == 4
    answers = labels[labels != -100]  # exactly one label token per review: the label word
    assert answers.tolist() == [tok.convert_tokens_to_ids(compare.LABEL_WORDS[y]) for y in task.train_labels[:4]]


def test_a_qlora_row_counts_its_4bit_weights():
    """QLoRA's base is the same model in 4 bits: its total counts the same weights as LoRA's (it
    showed the 4-bit weights as absent, 49.5 % trainable)."""
    settings = compare.CompareSettings(methods=["lora", "qlora"], steps=2, eval_size=8, fresh_process=False,
                                       progress=False)
    lora, qlora = compare.compare(settings)
    assert not lora.error and not qlora.error
    assert qlora.trainable_params == lora.trainable_params and qlora.total_params == lora.total_params
    assert qlora.trainable_params < 0.2 * qlora.total_params
