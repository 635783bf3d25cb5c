"""Compacter and Compacter++: PHM projections with one rule shared across layers, through the public API."""

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.bottleneck import ADAPTER_ATTR
from fastpeft.nn import PHMLinear

from models import model_inputs, output_of, tiny_model

KINDS = ["llama", "gpt2", "bert"]


def phm_layers(model):
    return [m for m in model.modules() if isinstance(m, PHMLinear)]


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout,points_per_layer", [("houlsby", 2), ("pfeiffer", 1)], ids=["compacter", "compacter++"])
@pytest.mark.parametrize("phm_rank", [1, None], ids=["rank1", "fullB"])
def test_compacter_shares_one_rule_starts_as_identity_and_trains(kind, layout, points_per_layer, phm_rank):
    model = tiny_model(kind)
    inputs = model_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
    config = fastpeft.CompacterConfig(layout=layout, reduction_factor=4, phm_dim=4, phm_rank=phm_rank)
    model = fastpeft.get_peft_model(model, config)
    layers = phm_layers(model)
    assert len(layers) == 2 * 2 * points_per_layer                      # down + up, 2 layers
    assert all(layer.phm_rule is model.fastpeft_phm_rule for layer in layers)
    assert all(layer.phm_rank == phm_rank for layer in layers)
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable.count("fastpeft_phm_rule") == 1 and all(n == "fastpeft_phm_rule" or ADAPTER_ATTR in n
                                                             for n in trainable)
    randomize_adapters(model)
    output_of(model, inputs).square().mean().backward()
    assert model.fastpeft_phm_rule.grad.abs().max() > 0


def test_shared_rule_gradient_is_the_sum_over_every_projection():
    kind = "llama"
    inputs = model_inputs(kind)
    model = fastpeft.get_peft_model(tiny_model(kind), fastpeft.CompacterConfig(reduction_factor=4, phm_dim=2))
    randomize_adapters(model)
    output_of(model, inputs).square().mean().backward()
    shared_grad = model.fastpeft_phm_rule.grad.clone()
    copies = []
    for layer in phm_layers(model):                        # unshare: one copy of the rule per projection
        layer.phm_rule = torch.nn.Parameter(model.fastpeft_phm_rule.detach().clone())
        copies.append(layer.phm_rule)
    output_of(model, inputs).square().mean().backward()
    assert len(copies) == 8
    torch.testing.assert_close(shared_grad, sum(c.grad for c in copies), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["houlsby", "pfeiffer"])
def test_save_load_keeps_the_rule_shared_and_outputs_identical(tmp_path, kind, layout):
    inputs = model_inputs(kind)
    config = fastpeft.CompacterConfig(layout=layout, reduction_factor=4, phm_dim=4, adapter_drop=1 if layout == "houlsby"
                                      else 0)
    model = fastpeft.get_peft_model(tiny_model(kind), config)
    randomize_adapters(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    fastpeft.save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    rule_keys = [k for k in saved if "phm_rule" in k]
    assert rule_keys == ["base_model.model.fastpeft_phm_rule"]           # saved once
    loaded = fastpeft.load_adapter(tiny_model(kind), tmp_path / "adapter", is_trainable=True)
    assert all(layer.phm_rule is loaded.fastpeft_phm_rule for layer in phm_layers(loaded))   # loaded back shared
    assert torch.equal(loaded.fastpeft_phm_rule.detach(), saved["base_model.model.fastpeft_phm_rule"])
    with torch.no_grad():
        assert torch.equal(output_of(loaded, inputs), expected)


def test_unshared_rules_are_saved_per_projection(tmp_path):
    model = fastpeft.get_peft_model(tiny_model("gpt2"), fastpeft.CompacterConfig(
        layout="pfeiffer", reduction_factor=4, shared_phm_rule=False))
    rules = {id(layer.phm_rule) for layer in phm_layers(model)}
    assert len(rules) == 4
    fastpeft.save_adapter(model, tmp_path / "a")
    assert len([k for k in load_file(tmp_path / "a" / "adapter_model.safetensors") if "phm_rule" in k]) == 4


def test_near_identity_init_is_close_but_not_equal():
    inputs = model_inputs("bert")
    model = tiny_model("bert")
    with torch.no_grad():
        base = output_of(model, inputs)
        model = fastpeft.get_peft_model(model, fastpeft.CompacterConfig(reduction_factor=4,
                                                                        init_weights="near_identity", init_std=1e-4))
        out = output_of(model, inputs)
    assert not torch.equal(out, base)
    torch.testing.assert_close(out, base, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(phm_dim=5), "not divisible by phm_dim=5"),                     # hidden 32
    (dict(phm_dim=4, phm_rank=3), r"phm_rank must be an int in \[1, min\(in, out\)/phm_dim = 2\]"),
    (dict(phm_dim=4, bottleneck_size=6), "out_features=6 is not divisible by phm_dim=4"),
    (dict(phm_rank=0), "phm_rank must be a positive int or None"),
    (dict(layout="parallel"), "layout must be one of"),
])
def test_bad_config_is_refused_clearly_with_the_model_unchanged(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):  # at construction, or at apply when it needs the model
        fastpeft.get_peft_model(model, fastpeft.CompacterConfig(reduction_factor=4, **kwargs))
    assert not phm_layers(model) and not hasattr(model, "fastpeft_phm_rule")
    assert all(p.requires_grad for p in model.parameters())
