"""Adapter checkpoints: safety, clear refusals that leave the model untouched, atomic saves."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.checkpoint import WEIGHTS_NAME, CheckpointError

from conftest import assert_close
from models import model_inputs, output_of, tiny_model

KEY_Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(tmp_path):
    """A fastpeft-written LoRA checkpoint of a tiny Llama (q_proj, v_proj; r = 4), and its directory."""
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    directory = tmp_path / "adapter"
    fastpeft.save_adapter(model, str(directory))
    return model, directory


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            dict(getattr(model, "fastpeft_config", {})))


def assert_unchanged(model, snap):
    state, types, configs = snap
    assert [type(m) for m in model.modules()] == types
    assert dict(getattr(model, "fastpeft_config", {})) == configs
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def edit_weights(directory, fn):
    path = directory / WEIGHTS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


BAD = {
    "missing key": (lambda d: edit_weights(d, lambda t: t.pop(KEY_Q0_A)),
                    rf"missing key '{KEY_Q0_A}' \(expected shape \[4, 32\]\)"),
    "unexpected key": (lambda d: edit_weights(d, lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.ones(2)})),
                       r"unexpected key 'base_model.model.extra.lora_A.weight'"),
    "rank mismatch": (lambda d: edit_config(d, r=8),
                      rf"key '{KEY_Q0_A}' has shape \[4, 32\] but the model expects \[8, 32\] \(rank 8 in adapter_config.json\)"),
    "shape mismatch": (lambda d: edit_weights(d, lambda t: t.update({KEY_Q0_A: torch.ones(4, 31)})),
                       rf"key '{KEY_Q0_A}' has shape \[4, 31\] but the model expects \[4, 32\]"),
    "unsupported peft_type": (lambda d: edit_config(d, peft_type="LOHA"), r"peft_type 'LOHA' is not supported"),
    "unsupported feature": (lambda d: edit_config(d, lora_bias=True), r"lora_bias=True is a PEFT feature fastpeft does not support"),
    "truncated file": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]), r"corrupt or truncated"),
    "corrupt json": (lambda d: (d / "adapter_config.json").write_text("{not json"), r"is not valid JSON"),
    "no weights": (lambda d: os.remove(d / WEIGHTS_NAME), r"no adapter_model.safetensors \(or adapter_model.bin\)"),
    "config targets fewer modules": (lambda d: edit_config(d, target_modules=["q_proj"]),
                                     r"unexpected key .*v_proj.lora_A.weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_refused_and_model_untouched(case, saved):
    _, directory = saved
    corrupt, pattern = BAD[case]
    corrupt(directory)
    model = tiny_model("llama", seed=5)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=pattern):
        fastpeft.load_adapter(model, str(directory))
    assert_unchanged(model, snap)


def test_loading_into_a_model_that_already_has_the_adapter_is_refused(saved):
    model, directory = saved
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="adapter 'default' already exists"):
        fastpeft.load_adapter(model, str(directory))
    assert_unchanged(model, snap)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastpeft-pwned",))


def test_legacy_bin_loads_tensors_but_never_runs_code(saved, tmp_path):
    model, directory = saved
    state = load_file(str(directory / WEIGHTS_NAME))
    os.remove(directory / WEIGHTS_NAME)
    torch.save(state, directory / "adapter_model.bin")
    loaded = fastpeft.load_adapter(tiny_model("llama"), str(directory))
    inputs = model_inputs("llama")
    assert_close(output_of(loaded, inputs), output_of(model, inputs))

    if os.path.exists("/tmp/fastpeft-pwned"):
        os.remove("/tmp/fastpeft-pwned")
    with open(directory / "adapter_model.bin", "wb") as f:
        pickle.dump({KEY_Q0_A: _Boom()}, f)
    fresh = tiny_model("llama")
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        fastpeft.load_adapter(fresh, str(directory))
    assert not os.path.exists("/tmp/fastpeft-pwned")
    assert_unchanged(fresh, snap)


def test_save_is_atomic_and_keeps_other_files(saved, monkeypatch):
    model, directory = saved
    (directory / "tokenizer.json").write_text("{}")
    before = (directory / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fastpeft.save_adapter(model, str(directory))
    assert (directory / WEIGHTS_NAME).read_bytes() == before  # the old checkpoint, whole
    assert sorted(os.listdir(directory.parent)) == ["adapter"]  # no staging left behind
    monkeypatch.undo()
    fastpeft.save_adapter(model, str(directory))
    assert (directory / "tokenizer.json").read_text() == "{}"
    reloaded = fastpeft.load_adapter(tiny_model("llama"), str(directory))
    inputs = model_inputs("llama")
    assert_close(output_of(reloaded, inputs), output_of(model, inputs))


def test_saved_keys_are_peft_keys(saved):
    _, directory = saved
    keys = set(load_file(str(directory / WEIGHTS_NAME)))
    assert KEY_Q0_A in keys and all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
