"""4-bit checkpoints in transformers' sharded layout: save_quantized_model writes shards and an index
as transformers does, and load_quantized_model streams them (transformers + bitsandbytes reading our
shards is tested in test_bnb_checkpoint.py)."""

import json
import os

import pytest
import torch

import fastpeft
from fastpeft import load_quantized_model, save_quantized_model
from fastpeft.nn import Linear4bit

from conftest import peak_cpu_bytes_above_start
from models import model_inputs, tiny_model


def _bigger_4bit_llama(double_quant=True):
    """A Llama whose 4-bit linears are most of its bytes (64-token vocabulary, 4 layers of 256/768)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return fastpeft.quantize_model(tf.LlamaForCausalLM(cfg), double_quant=double_quant).eval()


def _files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors") or f.endswith(".json"))


def test_sharded_save_writes_transformers_layout_and_loads_back(tmp_path):
    model = _bigger_4bit_llama()
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    save_quantized_model(model, tmp_path, max_shard_size=total // 5)
    files = _files(tmp_path)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 5 and all(f == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                    for i, f in enumerate(shards))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == fastpeft.methods.count_parameters(model)[1]
    for shard in shards:  # each at most the limit, unless one tensor alone is bigger
        assert os.path.getsize(tmp_path / shard) <= total // 5 + 4096 or \
            len([k for k, v in index["weight_map"].items() if v == shard]) == 1
    back = load_quantized_model(str(tmp_path))
    assert len([m for m in back.modules() if isinstance(m, Linear4bit)]) == 28
    ids = model_inputs("llama", batch=2, seq=9)["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))

    save_quantized_model(model, tmp_path)  # one file now: the shards and the index go
    assert _files(tmp_path) == ["config.json", "generation_config.json", "model.safetensors"] or \
        _files(tmp_path) == ["config.json", "model.safetensors"]
    save_quantized_model(model, tmp_path, max_shard_size="200KB")  # and back: the single file goes
    assert "model.safetensors" not in _files(tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized_model(str(tmp_path))(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_loading_streams_the_shards(tmp_path, double_quant):
    """The skeleton is built with its parameters on the meta device and the checkpoint read a tensor at
    a time into it: the peak memory of the load is the 4-bit model plus at most one shard (measured:
    the model plus one tensor), never a full-precision copy of the weights or every shard at once."""
    model = _bigger_4bit_llama(double_quant)
    checkpoint = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    save_quantized_model(model, tmp_path, max_shard_size=checkpoint // 6)
    shard = max(os.path.getsize(tmp_path / f) for f in _files(tmp_path) if f.startswith("model-"))
    load_quantized_model(str(tmp_path))  # warm-up: lazily imported and built state is not what is measured
    loaded = []
    peak = peak_cpu_bytes_above_start(lambda: loaded.append(load_quantized_model(str(tmp_path))))
    held = sum(t.numel() * t.element_size() for t in [*loaded[0].parameters(), *loaded[0].buffers()])
    full_precision = sum(m.out_features * m.in_features * 4 for m in loaded[0].modules() if isinstance(m, Linear4bit))
    print(f"load peak {peak} B: 4-bit model {held} B, largest shard {shard} B, checkpoint {checkpoint} B, "
          f"float32 linears {full_precision} B")
    assert peak <= held + shard, (peak, held, shard)


def test_a_tied_output_layer_is_written_once_and_tied_again(tmp_path):
    model = fastpeft.quantize_model(tiny_model("llama", hidden_size=64, intermediate_size=128))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    save_quantized_model(model, tmp_path, max_shard_size="8KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert "lm_head.weight" not in json.load(f)["weight_map"]
    back = load_quantized_model(str(tmp_path))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = model_inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_layers_kept_in_full_precision_are_recorded_for_transformers(tmp_path):
    """A quantised classifier keeps its pooler and head in full precision; the config names them in
    llm_int8_skip_modules, so fastpeft and transformers + bitsandbytes both load them unquantised."""
    import transformers as tf

    model = fastpeft.quantize_model(tiny_model("bert", seed=int(torch.randint(0, 2**31 - 1, ()))))
    save_quantized_model(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["llm_int8_skip_modules"] == ["bert.pooler.dense", "classifier"]
    back = load_quantized_model(str(tmp_path), auto_class=tf.AutoModelForSequenceClassification)
    assert type(back.bert.pooler.dense) is torch.nn.Linear and type(back.classifier) is torch.nn.Linear
    assert isinstance(back.bert.encoder.layer[0].attention.self.query, Linear4bit)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    bnb = pytest.importorskip("bitsandbytes")
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path, device_map="cpu")
    assert type(theirs.bert.pooler.dense) is torch.nn.Linear and type(theirs.classifier) is torch.nn.Linear
    assert isinstance(theirs.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)


def test_a_model_quantised_whole_records_an_empty_skip_list(tmp_path):
    """With the output layer 4-bit too, the config says so ([]), else transformers would expect a
    full-precision lm_head."""
    model = fastpeft.quantize_model(tiny_model("llama", hidden_size=64, intermediate_size=128), skip_modules=[])
    save_quantized_model(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["llm_int8_skip_modules"] == []
    back = load_quantized_model(str(tmp_path))
    assert isinstance(back.lm_head, Linear4bit)
