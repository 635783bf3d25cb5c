"""Bottleneck adapters: every layout on tiny Llama, GPT-2 and BERT; identity at init; AdapterDrop;
checkpoints; rule-driven placement and its errors."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.bottleneck import ADAPTER_ATTR, AdapterBiasBlock, AdapterBlock, set_adapter_drop

from models import model_inputs, output_of, tiny_model

KINDS = ["llama", "gpt2", "bert"]
# Where each layout puts blocks, per model (layer 0; layer 1 alike).
EXPECTED_POINTS = {
    ("llama", "houlsby"): ["model.layers.0.self_attn", "model.layers.0.mlp"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn", "transformer.h.0.mlp"],
    ("bert", "houlsby"): ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
    ("llama", "pfeiffer"): ["model.layers.0.mlp"],
    ("gpt2", "pfeiffer"): ["transformer.h.0.mlp"],
    ("bert", "pfeiffer"): ["bert.encoder.layer.0.output.dense"],
}
EXPECTED_POINTS.update({(k, "parallel"): EXPECTED_POINTS[(k, "pfeiffer")] for k in KINDS})


def adapted(model):
    return {n[: -len("." + ADAPTER_ATTR)]: m for n, m in model.named_modules() if n.endswith(ADAPTER_ATTR)}


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["houlsby", "pfeiffer", "parallel"])
def test_layout_places_blocks_by_rule_starts_as_identity_and_trains(kind, layout):
    model = tiny_model(kind)
    inputs = model_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
    model = fastpeft.get_peft_model(model, fastpeft.BottleneckConfig(layout=layout, reduction_factor=4))
    blocks = adapted(model)
    layer0 = sorted(n for n in blocks if ".0." in n)
    assert layer0 == sorted(EXPECTED_POINTS[(kind, layout)])
    assert len(blocks) == 2 * len(layer0)                      # both layers
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)      # up-projection zero: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(ADAPTER_ATTR in n for n in trainable)
    output_of(model, inputs).square().mean().backward()
    ups = [b.up.weight for b in blocks.values()]
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in ups)
    assert all(p.grad is None for n, p in model.named_parameters() if ADAPTER_ATTR not in n)
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(output_of(model, inputs), base, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_near_identity_init_is_close_but_not_equal(kind):
    model = tiny_model(kind)
    inputs = model_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
        model = fastpeft.get_peft_model(model, fastpeft.BottleneckConfig(init_weights="near_identity", init_std=1e-3))
        out = output_of(model, inputs)
    assert not torch.equal(out, base)
    torch.testing.assert_close(out, base, atol=1e-3, rtol=0)


def test_bert_houlsby_block_sits_after_the_dense_projection_before_the_layernorm():
    model = tiny_model("bert")
    model = fastpeft.get_peft_model(model, fastpeft.BottleneckConfig(reduction_factor=4))
    randomize_adapters(model)
    self_output = model.bert.encoder.layer[0].attention.output
    h, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        dense = self_output.dense.weight @ h.unsqueeze(-1)
        dense = dense.squeeze(-1) + self_output.dense.bias
        expected = self_output.LayerNorm(self_output.dense.fastpeft_adapter(dense, dense) + residual)
        assert torch.allclose(self_output(h, residual), expected, atol=1e-5)


class TinyStack(nn.Module):
    """Two 'layers' with an mlp each, named as the default rules expect (no transformers)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": nn.Linear(8, 8)}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](x)
        return x


def test_parallel_adapter_reads_the_module_input_and_scales():
    model = fastpeft.get_peft_model(TinyStack(), fastpeft.BottleneckConfig(layout="parallel", bottleneck_size=3,
                                                                          scaling=4.0, non_linearity="tanh"))
    randomize_adapters(model)
    x = torch.randn(5, 8)
    expected = x
    with torch.no_grad():
        for layer in model.layers:
            mlp, block = layer["mlp"], layer["mlp"].fastpeft_adapter
            expected = expected + nn.functional.linear(expected, mlp.weight, mlp.bias) + \
                4.0 * block.up(torch.tanh(block.down(expected)))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_adapter_bias_is_a_per_token_scalar_times_a_vector():
    model = fastpeft.get_peft_model(TinyStack(), fastpeft.BottleneckConfig(layout="pfeiffer", adapter_bias=True))
    blocks = adapted(model)
    assert all(isinstance(b, AdapterBiasBlock) for b in blocks.values())
    x = torch.randn(5, 8)
    mlp = model.layers[0]["mlp"]
    with torch.no_grad():
        assert torch.equal(mlp(x), nn.functional.linear(x, mlp.weight, mlp.bias))   # v = 0: identity at init
    randomize_adapters(model)
    block = model.layers[0]["mlp"].fastpeft_adapter
    with torch.no_grad():
        h = nn.functional.linear(x, model.layers[0]["mlp"].weight, model.layers[0]["mlp"].bias)
        assert torch.allclose(model.layers[0]["mlp"](x), h + block.alpha(h) * block.vector, atol=1e-6)
    assert sum(p.numel() for p in block.parameters()) == 8 + 1 + 8


# ---------------------------------------------------------------- AdapterDrop

def _ran_blocks(model, inputs, train: bool):
    """Names of the blocks that ran in one forward."""
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, n=n: ran.append(n)) for n, b in adapted(model).items()]
    model.train(train)
    with torch.no_grad():
        output_of(model, inputs)
    for h in handles:
        h.remove()
    return sorted(ran)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_drop_skips_exactly_the_lowest_layers(kind):
    model = fastpeft.get_peft_model(tiny_model(kind), fastpeft.BottleneckConfig(adapter_drop=1, reduction_factor=4))
    inputs = model_inputs(kind)
    layer1 = sorted(n for n in adapted(model) if ".1." in n)
    assert len(layer1) == 2
    assert _ran_blocks(model, inputs, train=False) == layer1
    assert _ran_blocks(model, inputs, train=True) == layer1      # fixed: the same in training
    set_adapter_drop(model, 0)
    assert _ran_blocks(model, inputs, train=False) == sorted(adapted(model))
    set_adapter_drop(model, 2)
    assert _ran_blocks(model, inputs, train=False) == []


def test_adapter_drop_skipped_layers_change_nothing():
    """Dropping layer 0's blocks gives exactly the model whose layer-0 blocks are zero."""
    kind = "llama"
    inputs = model_inputs(kind)
    model = fastpeft.get_peft_model(tiny_model(kind), fastpeft.BottleneckConfig(adapter_drop=1, reduction_factor=4))
    randomize_adapters(model)
    with torch.no_grad():
        dropped = output_of(model, inputs)
        set_adapter_drop(model, 0)
        for name, block in adapted(model).items():
            if ".0." in name:
                block.up.weight.zero_()
                block.up.bias.zero_()
        assert torch.equal(output_of(model, inputs), dropped)


def test_random_adapter_drop_in_training_fixed_at_inference():
    kind = "gpt2"
    inputs = model_inputs(kind)
    config = fastpeft.BottleneckConfig(layout="pfeiffer", adapter_drop=2, adapter_drop_random=True, reduction_factor=4)
    model = fastpeft.get_peft_model(tiny_model(kind), config)
    torch.manual_seed(0)
    seen = {tuple(_ran_blocks(model, inputs, train=True)) for _ in range(30)}
    names = sorted(adapted(model))
    # k in {0, 1, 2} layers skipped: all blocks, layer 1's only, none; never layer 0 without layer 1
    assert seen == {tuple(names), tuple(n for n in names if ".1." in n), ()}
    assert _ran_blocks(model, inputs, train=False) == []        # inference: the fixed k = 2


# ---------------------------------------------------------------- checkpoints and errors

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", [fastpeft.BottleneckConfig(reduction_factor=4),
                                    fastpeft.BottleneckConfig(layout="parallel", scaling=2.0, bottleneck_size=5),
                                    fastpeft.BottleneckConfig(layout="pfeiffer", adapter_bias=True, adapter_drop=1)],
                         ids=["houlsby", "parallel", "adapterbias"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, config):
    inputs = model_inputs(kind)
    model = fastpeft.get_peft_model(tiny_model(kind), config)
    randomize_adapters(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    fastpeft.save_adapter(model, tmp_path / "adapter")
    loaded = fastpeft.load_adapter(tiny_model(kind), tmp_path / "adapter")
    # as every config without a task_type, the saved one records the model class (PEFT's auto_mapping)
    assert dataclasses.replace(loaded.fastpeft_config["default"], auto_mapping=None) == config
    with torch.no_grad():
        assert torch.equal(output_of(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())    # as PEFT: frozen unless is_trainable


def test_load_refuses_a_checkpoint_for_another_model_untouched(tmp_path):
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.BottleneckConfig(reduction_factor=4))
    fastpeft.save_adapter(model, tmp_path / "adapter")
    other = tiny_model("gpt2")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(fastpeft.CheckpointError, match="missing key|unexpected key"):
        fastpeft.load_adapter(other, tmp_path / "adapter")
    assert not adapted(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("kwargs,message", [
    (dict(layout="sideways"), "layout must be one of"),
    (dict(non_linearity="softsign"), "non_linearity must be one of"),
    (dict(init_weights="zeros"), "init_weights must be one of"),
    (dict(positions=["attn", "embeddings"]), "positions must be"),
    (dict(adapter_drop=-1), "adapter_drop must be"),
    (dict(attn_modules=["no_such_module"]), "no module matches the attn insertion point pattern"),
])
def test_bad_config_is_refused_with_the_model_unchanged(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        fastpeft.get_peft_model(model, fastpeft.BottleneckConfig(**kwargs))
    assert not adapted(model) and all(p.requires_grad for p in model.parameters())


def test_patterns_override_the_defaults():
    """Name suffixes instead of the default regexes: blocks after the attention output projection only."""
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.BottleneckConfig(
        positions=["attn"], attn_modules=["o_proj"], reduction_factor=4))
    assert sorted(adapted(model)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert all(isinstance(b, AdapterBlock) for b in adapted(model).values())


def test_adapter_drop_draws_are_per_thread():
    """A random AdapterDrop draw made by one thread's forward is not what another thread's forward uses."""
    import threading

    from fastpeft.methods.bottleneck import AdapterDropState

    state = AdapterDropState(3, random_in_training=True)
    draws = set()
    while len(draws) < 2 or state.current == 3:  # a draw that differs from the default (3 layers)
        state.draw(training=True)
        draws.add(state.current)
    mine = state.current
    seen = []
    thread = threading.Thread(target=lambda: seen.append(state.current))
    thread.start()
    thread.join()
    assert seen == [3] and state.current == mine != 3
