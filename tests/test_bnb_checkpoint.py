"""4-bit models saved by bitsandbytes/transformers load into fastpeft, and fastpeft's load back.

Two tiny Llamas: one whose rows are whole NF4 blocks (hidden 64, MLP 128), where bitsandbytes' own
forward is right on every CPU, and the default one whose rows are shorter than a block (hidden 32),
which still tests our side against the format's definition everywhere."""

import json
import os

import pytest
import torch

import fastpeft
from fastpeft.nn import Linear4bit, LoRALinear
from fastpeft import load_quantized_model, save_quantized_model

from conftest import assert_close
from models import model_inputs, tiny_model, train_on_own_tokens

bnb = pytest.importorskip("bitsandbytes")
tf = pytest.importorskip("transformers")
import bitsandbytes.functional as BF  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from nf4_truth import bnb_forward_is_right, decode_quant_state  # noqa: E402

SIZES = {"whole-blocks": dict(hidden_size=64, intermediate_size=128), "short-rows": {}}


def _bnb_config():
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module", params=list(SIZES))
def bnb_saved(request, tmp_path_factory):
    """A tiny Llama quantised by transformers + bitsandbytes and saved by them; that model; its size."""
    root = tmp_path_factory.mktemp("bnb")
    tiny_model("llama", **SIZES[request.param]).save_pretrained(root / "fp32")
    model = tf.AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=_bnb_config(), device_map="cpu")
    model.save_pretrained(root / "nf4")
    return str(root / "nf4"), model


def _bnb_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _dequantized_twin(bnb_model):
    """The bitsandbytes model as a plain fp32 Llama whose weights are its NF4 bytes decoded by the
    format's definition: what a right 4-bit forward computes, up to fp32 rounding."""
    twin = tiny_model("llama", hidden_size=bnb_model.config.hidden_size,
                      intermediate_size=bnb_model.config.intermediate_size)
    state = twin.state_dict()
    for name, module in bnb_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = decode_quant_state(module.weight.data, module.weight.quant_state, torch.float32)
        elif len(list(module.children())) == 0:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    twin.load_state_dict(state)
    return twin


def test_loads_a_bitsandbytes_saved_llama_and_computes_what_its_bytes_mean(bnb_saved):
    directory, bnb_model = bnb_saved
    model = load_quantized_model(directory)
    layers = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert layers == {n for n, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and all(m.q.double_quant for m in model.modules() if isinstance(m, Linear4bit))
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        assert_close(model(**inputs).logits, _dequantized_twin(bnb_model)(**inputs).logits)


def _fresh_bnb_model(directory):
    """bitsandbytes' model loaded anew: its eval-mode forward on an AVX512_BF16 CPU repacks the
    weights in place, for good (the double-quantised absmax becomes bf16), so the shared fixture's
    model is never run."""
    return tf.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")


def test_computes_what_bitsandbytes_computes(bnb_saved):
    directory, _ = bnb_saved
    bnb_model = _fresh_bnb_model(directory)
    right, why = bnb_forward_is_right(_bnb_layers(bnb_model))
    if not right:
        pytest.skip(why)
    model = load_quantized_model(directory)
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        theirs = bnb_model(**inputs).logits
        # On an AVX512_BF16 CPU bitsandbytes' eval forward computes in bf16 with bf16 absmax, whatever
        # the compute dtype: the comparison holds to bf16's tolerance there, to fp32's elsewhere.
        assert_close(model(**inputs).logits, theirs, torch.bfloat16 if BF.has_avx512bf16() else torch.float32)


def test_a_fastpeft_saved_model_loads_in_transformers_with_bitsandbytes(bnb_saved, tmp_path):
    directory, bnb_model = bnb_saved
    model = load_quantized_model(directory)
    save_quantized_model(model, tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert isinstance(back.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(f"{directory}/model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:  # the same bytes: the same model
        assert torch.equal(ours[key].view(torch.uint8), theirs[key].view(torch.uint8)), key
    right, why = bnb_forward_is_right(_bnb_layers(back))
    if not right:
        pytest.skip(f"the bytes are bitsandbytes'; its forward is not compared: {why}")
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, _fresh_bnb_model(directory)(**inputs).logits)


def test_a_sharded_fastpeft_save_loads_in_transformers_with_bitsandbytes(bnb_saved, tmp_path):
    """save_quantized_model(max_shard_size=...) writes shards and model.safetensors.index.json as
    transformers does; transformers + bitsandbytes read them into the same bytes as their own file."""
    directory, _ = bnb_saved
    save_quantized_model(load_quantized_model(directory), tmp_path / "ours", max_shard_size="16KB")
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 2 and not (tmp_path / "ours" / "model.safetensors").exists()
    theirs = load_file(f"{directory}/model.safetensors")
    ours = {}
    for shard in set(weight_map.values()):
        ours.update(load_file(tmp_path / "ours" / shard))
    assert ours.keys() == theirs.keys() == weight_map.keys()
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in theirs)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    reference = _fresh_bnb_model(directory)
    assert len(_bnb_layers(back)) == 14
    for (name, a), b in zip(back.named_modules(), reference.modules()):
        if isinstance(a, bnb.nn.Linear4bit):  # bitsandbytes read our shards into its own bytes and state
            assert torch.equal(a.weight.data.view(torch.uint8), b.weight.data.view(torch.uint8)), name
            assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax), name
    right, why = bnb_forward_is_right(_bnb_layers(back))
    if not right:
        pytest.skip(f"the bytes are bitsandbytes'; its forward is not compared: {why}")
    inputs = model_inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, reference(**inputs).logits)


def test_qlora_on_a_loaded_model_trains(bnb_saved):
    model = load_quantized_model(bnb_saved[0])
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert isinstance(model.model.layers[0].mlp.up_proj, LoRALinear) and model.model.layers[0].mlp.up_proj.quantized
    losses = train_on_own_tokens(model, model_inputs("llama", batch=4, seq=10)["input_ids"], steps=15)
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
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    os.makedirs(broken)
    os.link(os.path.join(directory, "config.json"), broken / "config.json")
    state = load_file(os.path.join(directory, "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.weight.nested_absmax"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match="nested"):
        load_quantized_model(str(broken))
