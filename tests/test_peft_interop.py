"""Injection into transformers models, equality with PEFT, checkpoints both ways, merging, compile."""


import pytest
import torch

import fastpeft
from fastpeft.nn import LoRALinear

from conftest import assert_close
from models import TARGETS, model_inputs, output_of, tiny_model

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

KINDS = ["llama", "gpt2", "bert", "qwen2"]


def peft_config(kind, **kw):
    targets, to_save = TARGETS[kind]
    return dict(r=4, lora_alpha=8, target_modules=targets, modules_to_save=to_save, init_lora_weights=False, **kw)


def peft_trained(kind, tmp_path, **kw):
    """A PEFT LoRA model with random (non-zero) adapters, saved by peft to tmp_path/peft."""
    model = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(**peft_config(kind, **kw)))
    if kind == "bert":  # make the trained head differ from the original
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path / "peft")
    return model


def lora_grads_by_peft_name(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_equal_peft(kind, tmp_path):
    ref = peft_trained(kind, tmp_path)
    ours = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"), is_trainable=True)
    assert any(isinstance(m, LoRALinear) for m in ours.modules())
    inputs = model_inputs(kind)
    y_ref, y = output_of(ref, inputs), output_of(ours, inputs)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    ref_grads = lora_grads_by_peft_name(ref)
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_grads) == len(ref_grads) > 0
    for name, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, ref_grads["base_model.model." + name], msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_reads_what_fastpeft_writes(kind, tmp_path):
    torch.manual_seed(3)
    targets, to_save = TARGETS[kind]
    ours = fastpeft.get_peft_model(tiny_model(kind), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, modules_to_save=to_save, init_lora_weights=False))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    ref = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "ours"))
    inputs = model_inputs(kind)
    assert_close(output_of(ours, inputs), output_of(ref, inputs))
    # and back: fastpeft reads its own checkpoint into a fresh model, same outputs
    again = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "ours"))
    assert_close(output_of(again, inputs), output_of(ours, inputs))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_peft_shares_tensors_and_outputs(kind, tmp_path):
    ref = peft_trained(kind, tmp_path)
    inputs = model_inputs(kind)
    expected = output_of(ref, inputs).detach()
    lora_ptrs = {p.data_ptr() for n, p in ref.named_parameters() if "lora_" in n}
    model = fastpeft.from_peft(ref)
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert {p.data_ptr() for n, p in model.named_parameters() if "lora_" in n} == lora_ptrs
    assert_close(output_of(model, inputs), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_keeps_outputs(kind, tmp_path):
    peft_trained(kind, tmp_path)
    model = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"))
    inputs = model_inputs(kind)
    expected = output_of(model, inputs).detach()
    merged = fastpeft.merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, fastpeft.nn.ModulesToSaveWrapper)) for m in merged.modules())
    assert not hasattr(merged, "fastpeft_config")
    assert_close(output_of(merged, inputs), expected)


def test_torch_compile_fullgraph_tiny_llama():
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ids = model_inputs("llama")["input_ids"]
    expected = model(input_ids=ids).logits
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(input_ids=ids).logits, expected)


# ---------------------------------------------------------------- injection rules

def names_of_lora(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def test_matching_rules_follow_peft():
    """Regex strings full-match; lists match names or dotted suffixes; exclusions, layer indices and
    rank/alpha patterns: the adapted set and ranks equal PEFT's for the same config."""
    configs = [
        dict(target_modules=r".*\.(q|v)_proj"),
        dict(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
        dict(target_modules="all-linear", exclude_modules=["k_proj"]),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 2, "layers.0.self_attn.o_proj": 6},
             alpha_pattern={"q_proj": 3}),
    ]
    for kw in configs:
        ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, **kw))
        ours = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(r=4, lora_alpha=8, **kw))
        ref_layers = {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                      for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
        ours_layers = {n: (m.r["default"], m.scaling["default"]) for n, m in ours.named_modules()
                       if isinstance(m, LoRALinear)}
        assert ours_layers == ref_layers, kw


def test_all_linear_skips_the_output_layer_and_counts_parameters(capsys):
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in " ".join(names_of_lora(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    fastpeft.print_trainable_parameters(model)
    out = capsys.readouterr().out
    t, total = fastpeft.methods.count_parameters(model)
    assert f"trainable params: {t:,d} || all params: {total:,d}" in out


@pytest.mark.parametrize("bias,expected", [("none", set()), ("lora_only", {"q_proj"}), ("all", {"q_proj", "k_proj", "v_proj"})])
def test_bias_options(bias, expected):
    model = fastpeft.get_peft_model(tiny_model("qwen2"), fastpeft.LoraConfig(r=2, target_modules=["q_proj"], bias=bias))
    trained = {n.replace(".base_layer", "").split(".")[-2] for n, p in model.named_parameters()
               if p.requires_grad and n.endswith("bias")}
    assert trained == expected


def test_named_adapters_on_a_model(tmp_path):
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base_out = output_of(model, inputs).detach()
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fastpeft.add_adapter(model, fastpeft.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False), "second")
    assert model.fastpeft_active_adapter == "default"
    y_default = output_of(model, inputs).detach()
    fastpeft.set_adapter(model, "second")
    y_second = output_of(model, inputs).detach()
    assert not torch.allclose(y_default, y_second) and not torch.allclose(y_second, base_out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    with fastpeft.disable_adapters(model):
        assert_close(output_of(model, inputs), base_out)
    assert_close(output_of(model, inputs), y_second)
    fastpeft.delete_adapter(model, "second")
    assert model.fastpeft_active_adapter == "default"
    assert not any("v_proj" in n for n in names_of_lora(model))  # v_proj had only "second": unwrapped
    assert_close(output_of(model, inputs), y_default)
    with pytest.raises(KeyError, match="no adapter named 'second'"):
        fastpeft.set_adapter(model, "second")
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        fastpeft.add_adapter(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(target_modules=["nothing_like_this"]), ValueError, r"matched no module of the model"),
    (dict(target_modules=["embed_tokens"]), TypeError, r"'model.embed_tokens' is a Embedding; fastpeft adapts nn.Linear"),
    (dict(target_modules=["q_proj"], modules_to_save=["no_head"]), ValueError,
     r"modules_to_save: no module of the model is named \['no_head'\]"),
])
def test_bad_configs_change_nothing(kw, exc, pattern):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, **kw))
    assert not hasattr(model, "fastpeft_config") and not names_of_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_validation():
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        fastpeft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be one of"):
        fastpeft.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        fastpeft.LoraConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="lora_bias=True is a PEFT feature fastpeft does not support"):
        fastpeft.LoraConfig.from_dict({"peft_type": "LORA", "lora_bias": True})


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_round_trip_with_peft(bias, tmp_path):
    ref = peft.get_peft_model(tiny_model("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj"], bias=bias,
                                                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)  # trained biases differ from the base model's
    ref.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(tiny_model("qwen2"), str(tmp_path / "peft"))
    inputs = model_inputs("qwen2")
    assert_close(output_of(ours, inputs), output_of(ref, inputs))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(tiny_model("qwen2"), str(tmp_path / "ours"))
    assert_close(output_of(back, inputs), output_of(ref, inputs))
