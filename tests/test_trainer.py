"""The Hugging Face workflow: transformers' Trainer checkpoints and model.save_pretrained of a
fastpeft model are PEFT adapters, read back by fastpeft, PEFT and transformers, and resumable."""

import json
import os

import pytest
import torch

import fastpeft
from models import VOCAB, model_inputs, tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class TokenData(torch.utils.data.Dataset):
    """Fixed random sequences, each its own labels."""

    def __init__(self, n=16, seq=10):
        g = torch.Generator().manual_seed(123)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama saved as a transformers checkpoint (so the model knows its name_or_path)."""
    tiny_model("llama", seed=3).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def lora_model(base_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    return fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              modules_to_save=["lm_head"]))


def trainer(model, out, max_steps):
    args = transformers.TrainingArguments(out, max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
                                          learning_rate=5e-3, logging_steps=1, report_to=[], seed=7,
                                          use_cpu=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData())


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainer_checkpoints_are_peft_adapters_that_both_libraries_read(base_dir, tmp_path):
    model = lora_model(base_dir)
    trainer(model, str(tmp_path / "run"), max_steps=4).train()
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    trained = logits(model, ids)
    ckpt = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "config.json", "pytorch_model.bin"}, files
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base_dir and saved["inference_mode"] is True
    # fastpeft, PEFT and transformers' own PEFT integration all read it into the trained model
    ours = fastpeft.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base_dir), str(ckpt))
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), str(ckpt))
    through_transformers = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt))
    for other in (ours, theirs, through_transformers):
        torch.testing.assert_close(logits(other, ids), trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir), ids), trained)


def test_trainer_resumes_from_an_adapter_checkpoint(base_dir, tmp_path):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted run ends (adapter,
    module to save, optimizer, schedule and data order restored)."""
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    straight = lora_model(base_dir)
    trainer(straight, str(tmp_path / "straight"), max_steps=4).train()
    resumed = lora_model(base_dir)
    before = logits(resumed, ids)
    trainer(resumed, str(tmp_path / "resumed"), max_steps=4).train(
        resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert not torch.allclose(logits(resumed, ids), before)
    torch.testing.assert_close(logits(resumed, ids), logits(straight, ids), rtol=1e-5, atol=1e-5)


def test_save_pretrained_writes_every_adapter_as_peft_does(base_dir, tmp_path):
    model = lora_model(base_dir)
    fastpeft.add_adapter(model, fastpeft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), "other")
    model.save_pretrained(tmp_path / "out")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out" / "other"))
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                                str(tmp_path / "out"))
    peft_model.load_adapter(str(tmp_path / "out" / "other"), "other")
    peft_model.set_adapter("other")
    fastpeft.set_adapter(model, "other")
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_save_pretrained_is_the_models_own_again_once_the_adapters_are_merged(base_dir, tmp_path):
    model = lora_model(base_dir)
    assert "save_pretrained" in vars(model)
    merged = fastpeft.merge_and_unload(model)
    assert "save_pretrained" not in vars(merged)
    merged.save_pretrained(tmp_path / "merged")
    assert "model.safetensors" in os.listdir(tmp_path / "merged")
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    torch.testing.assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids),
                               logits(merged, ids))


def test_other_methods_save_through_save_pretrained_too(base_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    fastpeft.get_peft_model(model, fastpeft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                            str(tmp_path / "ia3"))
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
