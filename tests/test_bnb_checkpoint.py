"""4-bit models saved by bitsandbytes/transformers load into fastpeft, and fastpeft's load back."""

import json
import os

import pytest
import torch

import fastpeft
from fastpeft.nn import Linear4bit, LoRALinear
from fastpeft import load_quantized_model, save_quantized_model

from conftest import assert_close
from models import model_inputs, tiny_model

bnb = pytest.importorskip("bitsandbytes")
tf = pytest.importorskip("transformers")


def _bnb_config():
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def bnb_saved(tmp_path_factory):
    """A tiny Llama quantised by transformers + bitsandbytes and saved by them; and that model."""
    root = tmp_path_factory.mktemp("bnb")
    tiny_model("llama").save_pretrained(root / "fp32")
    model = tf.AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=_bnb_config(), device_map="cpu")
    model.save_pretrained(root / "nf4")
    return str(root / "nf4"), model


def test_loads_a_bitsandbytes_saved_llama_and_computes_what_bitsandbytes_computes(bnb_saved):
    directory, bnb_model = bnb_saved
    model = load_quantized_model(directory)
    layers = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert layers == {n for n, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and all(m.q.double_quant for m in model.modules() if isinstance(m, Linear4bit))
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        assert_close(model(**inputs).logits, bnb_model(**inputs).logits)


def test_a_fastpeft_saved_model_loads_in_transformers_with_bitsandbytes(bnb_saved, tmp_path):
    directory, bnb_model = bnb_saved
    model = load_quantized_model(directory)
    save_quantized_model(model, tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert isinstance(back.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, bnb_model(**inputs).logits)  # the same bytes: the same model


def test_qlora_on_a_loaded_model_trains(bnb_saved):
    model = load_quantized_model(bnb_saved[0])
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert isinstance(model.model.layers[0].mlp.up_proj, LoRALinear) and model.model.layers[0].mlp.up_proj.quantized
    ids = model_inputs("llama", batch=4, seq=10)["input_ids"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


def test_bad_checkpoints_are_refused(bnb_saved, tmp_path):
    directory = bnb_saved[0]
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit quantization_config"):
        load_quantized_model(str(plain))
    fp4 = tmp_path / "fp4"
    os.makedirs(fp4)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    with open(fp4 / "config.json", "w") as f:
        json.dump(config, f)
    os.link(os.path.join(directory, "model.safetensors"), fp4 / "model.safetensors")
    with pytest.raises(ValueError, match="'fp4' is not supported"):
        load_quantized_model(str(fp4))
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    os.makedirs(broken)
    os.link(os.path.join(directory, "config.json"), broken / "config.json")
    state = load_file(os.path.join(directory, "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.weight.nested_absmax"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match="nested"):
        load_quantized_model(str(broken))
