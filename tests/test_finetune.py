"""`fastpeft finetune`: it learns, it compares with PEFT, it saves a PEFT-format adapter."""

import json

import pytest
import torch

import fastpeft
from fastpeft import cli
from fastpeft.finetune import FinetuneSettings, default_model, train

from conftest import assert_close


def test_default_run_learns_the_copy_task():
    result = train(FinetuneSettings(steps=150, progress=False, log_every=0), "fastpeft")
    first, last, _ = result.first_and_final_loss()
    assert first > 3.5  # about ln(60): the copy is unknown at the start
    assert last < 0.7 * first, (first, last)
    assert result.tokens_per_s > 0 and result.trainable_params > 0
    assert result.peak_memory_mb >= 0, "a peak below the run's starting memory"


def test_cli_compare_and_save(tmp_path, capsys):
    pytest.importorskip("peft")
    adapter, report = tmp_path / "adapter", tmp_path / "run.json"
    cli.main(["finetune", "--steps", "12", "--compare", "peft", "--save", str(adapter), "--json", str(report),
              "--no-progress", "--log-every", "6"])
    out = capsys.readouterr().out
    assert "fastpeft  lora" in out and "peft      lora" in out and "tokens/s" in out
    data = json.loads(report.read_text())
    assert [r["library"] for r in data["results"]] == ["fastpeft", "peft"]
    assert all(len(r["losses"]) == 12 and r["tokens_per_s"] > 0 for r in data["results"])

    import peft

    ids = torch.randint(4, 64, (2, 10))
    ours = fastpeft.load_adapter(default_model(seed=0), str(adapter))
    theirs = peft.PeftModel.from_pretrained(default_model(seed=0), str(adapter))
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    # the saved adapter is the trained one, not the initial (B = 0) one
    with fastpeft.disable_adapters(ours):
        assert not torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-3)


def test_cli_takes_a_local_model_directory(tmp_path, capsys):
    from models import tiny_model

    model_dir = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    cli.main(["finetune", "--model", str(model_dir), "--steps", "5", "--batch-size", "4", "--target-modules",
              "c_attn,c_proj", "--no-progress", "--log-every", "0", "--save", str(tmp_path / "a")])
    assert "fastpeft  lora    5" in capsys.readouterr().out
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_first_and_final_loss_never_share_a_step():
    from fastpeft.finetune import RunResult

    def run(losses):
        return RunResult("fastpeft", "lora", len(losses), 1, losses=losses)

    short = run([4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    assert short.first_and_final_loss() == pytest.approx((2.5, 0.225, 4))
    assert run([float(i) for i in range(30)]).first_and_final_loss() == (4.5, 24.5, 10)
    assert run([2.0]).first_and_final_loss() == (2.0, 2.0, 1)


def test_qlora_method_learns_on_an_nf4_base():
    from fastpeft.nn import Linear4bit

    result = train(FinetuneSettings(method="qlora", steps=50, progress=False, log_every=0), "fastpeft")
    first, last, _ = result.first_and_final_loss()
    assert last < 0.8 * first, (first, last)
    model = default_model(seed=0)
    from fastpeft.finetune import apply_method

    apply_method(model, FinetuneSettings(method="qlora"), "fastpeft")
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, Linear4bit)


@pytest.mark.parametrize("method, config", [("bitfit", "BitFitConfig"), ("diffpruning", "DiffPruningConfig"),
                                            ("layerfreeze", "LayerFreezingConfig"), ("full", "FullFinetuneConfig")])
def test_every_method_trains_and_saves(tmp_path, method, config):
    from fastpeft.finetune import load_model

    s = FinetuneSettings(method=method, steps=30, batch_size=8, progress=False, log_every=0, save=str(tmp_path / "a"))
    result = train(s, "fastpeft")
    assert len(result.losses) == 30 and result.step_seconds > 0 and 0 < result.trainable_params <= result.total_params
    model = fastpeft.load_adapter(load_model(s), str(tmp_path / "a")).eval()  # bitfit: the default Llama has biases
    assert type(model.fastpeft_config["default"]).__name__ == config
    ids = torch.randint(4, 64, (2, 10))
    with torch.no_grad():  # what was saved is the trained state (learning itself: tests/test_selective_methods.py)
        assert not torch.allclose(model(input_ids=ids).logits, load_model(s)(input_ids=ids).logits, atol=1e-4)



def test_a_runs_peak_memory_is_its_own():
    """The peak a run reports starts at the run (a larger allocation before it is not its peak) and
    sees what the run allocates and frees again."""
    from fastpeft.finetune import peak_rss_mb, reset_peak_rss, rss_mb

    before = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, then freed: an earlier peak
    del before
    base = rss_mb()
    reset_peak_rss()
    assert peak_rss_mb() - base < 32, "the earlier 64 MiB peak was reported as the run's"
    during = torch.ones(48 * 2**20 // 4)  # 48 MiB touched and freed inside the run
    del during
    assert peak_rss_mb() - base > 40
