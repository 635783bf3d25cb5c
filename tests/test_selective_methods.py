"""BitFit, layer freezing and full fine-tuning: the parameters each trains, learning, checkpoints, refusals."""

import os

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.bitfit import BitFitConfig
from fastpeft.methods.full_finetune import FullFinetuneConfig
from fastpeft.methods.layer_freezing import LayerFreezingConfig

from conftest import assert_close
from models import model_inputs, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tiny models train far faster on one thread than on contended cores."""


def rebuilt(kind: str, seed: int = 0, **changes):
    """The tiny model of tests/models.py built again from its config with `changes`."""
    model = tiny_model(kind)
    torch.manual_seed(seed)
    return type(model)(type(model.config)(**{**model.config.to_dict(), **changes})).eval()


def bitfit_model(kind: str, **changes):
    """Llama has no biases: BitFit runs on the same architecture built with them (attention_bias, mlp_bias)."""
    return rebuilt(kind, attention_bias=True, mlp_bias=True, **changes) if kind == "llama" else rebuilt(kind, **changes)


def learnable_model(kind: str, config):
    """For the learning tests: initialised at std 0.1 rather than 0.02, since with a frozen 32-wide
    output layer of std 0.02 no logit can move by more than about 0.6 whatever the method trains."""
    return (bitfit_model if isinstance(config, BitFitConfig) else rebuilt)(kind, initializer_range=0.1)


def lookup_task_batches(steps: int, batch: int = 16, seq: int = 8, seed: int = 0):
    """A learnable task: after each token x in [4, 20) comes perm[x] (a fixed random permutation),
    so the loss can fall from ln(VOCAB) toward 0; labels hold perm[x] at the next position."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(16, generator=g) + 4
    for _ in range(steps):
        ids = torch.randint(4, 20, (batch, seq), generator=g)
        labels = torch.cat([torch.full((batch, 1), -100), perm[ids[:, :-1] - 4]], 1)
        yield ids, labels


def train_losses(model, steps: int, lr: float, extra_loss=None, param_groups=None) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(param_groups or [p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids, labels in lookup_task_batches(steps):
        loss = model(input_ids=ids, labels=labels).loss
        total = loss + extra_loss(model) if extra_loss else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def names_with_grad(model) -> set[str]:
    model.train()
    ids, labels = next(lookup_task_batches(1))
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- only the intended parameters train

def test_full_finetune_trains_everything():
    for kind in ("llama", "gpt2"):
        model = fastpeft.get_peft_model(tiny_model(kind), FullFinetuneConfig())
        assert trainable(model) == {n for n, _ in model.named_parameters()}
        assert names_with_grad(model) == trainable(model)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_bitfit_trains_the_biases_only(kind):
    model = fastpeft.get_peft_model(tiny_model(kind), BitFitConfig())
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases and trainable(model) == biases
    # qwen2's only biases are q/k/v's; gpt2 has them in every linear and layer norm
    assert all(".q_proj." in n or ".k_proj." in n or ".v_proj." in n for n in biases) or kind == "gpt2"
    assert names_with_grad(model) <= biases


def test_bitfit_trains_a_classification_head_as_well():
    model = fastpeft.get_peft_model(tiny_model("bert"), BitFitConfig())
    assert {n for n in trainable(model) if not n.endswith(".bias")} == {"classifier.weight"}
    model = fastpeft.get_peft_model(tiny_model("bert"), BitFitConfig(train_task_head=False))
    assert all(n.endswith(".bias") for n in trainable(model))
    # a named module trains fully (and a causal LM's vocabulary projection only when named)
    model = fastpeft.get_peft_model(tiny_model("gpt2"), BitFitConfig(modules_to_train=["ln_f"]))
    assert "transformer.ln_f.weight" in trainable(model)


@pytest.mark.parametrize("kind, layer", [("llama", "model.layers.1."), ("gpt2", "transformer.h.1.")])
def test_layer_freezing_trains_the_top_layers(kind, layer):
    model = fastpeft.get_peft_model(tiny_model(kind), LayerFreezingConfig(num_trainable_layers=1))
    expected = {n for n, _ in model.named_parameters() if n.startswith(layer)}
    assert expected and trainable(model) == expected
    assert names_with_grad(model) == expected
    both = fastpeft.get_peft_model(tiny_model(kind), LayerFreezingConfig(num_trainable_layers=2))
    assert {n.split(".")[2] for n in trainable(both)} == {"0", "1"}


def test_layer_freezing_named_modules_and_tied_head():
    model = fastpeft.get_peft_model(tiny_model("llama"), LayerFreezingConfig(1, modules_to_train=["norm"]))
    assert "model.norm.weight" in trainable(model) and "model.layers.0.mlp.up_proj.weight" not in trainable(model)
    # GPT-2's lm_head is tied to the input embedding: naming it trains the shared tensor
    model = fastpeft.get_peft_model(tiny_model("gpt2"), LayerFreezingConfig(0, modules_to_train=["lm_head"]))
    assert trainable(model) == {"transformer.wte.weight"}


# ---------------------------------------------------------------- learning

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config, lr", [(FullFinetuneConfig(), 1e-2), (LayerFreezingConfig(1), 1e-2),
                                        (BitFitConfig(), 3e-2)], ids=["full", "layerfreeze", "bitfit"])
def test_loss_falls(kind, config, lr):
    model = fastpeft.get_peft_model(learnable_model(kind, config), config)
    losses = train_losses(model, 60, lr)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config", [FullFinetuneConfig(), LayerFreezingConfig(1, modules_to_train=["lm_head"]),
                                    BitFitConfig()], ids=["full", "layerfreeze", "bitfit"])
def test_save_load_round_trip(tmp_path, kind, config):
    make = bitfit_model if isinstance(config, BitFitConfig) else tiny_model
    model = fastpeft.get_peft_model(make(kind), config)
    train_losses(model, 3, 1e-2)
    inputs = model_inputs(kind)
    with torch.no_grad():
        expected = model(**inputs).logits
    fastpeft.save_adapter(model, str(tmp_path / "a"))
    saved = load_file(os.path.join(tmp_path, "a", "adapter_model.safetensors"))
    assert set(saved) == trainable(model)  # only what trains is written
    fresh = make(kind)
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).logits, expected, atol=1e-4)  # training changed the model
    loaded = fastpeft.load_adapter(fresh, str(tmp_path / "a"))
    assert type(loaded.fastpeft_config["default"]) is type(config)
    assert not trainable(loaded)  # as in PEFT: frozen unless is_trainable=True
    with torch.no_grad():
        assert_close(loaded(**inputs).logits, expected)
    again = fastpeft.load_adapter(make(kind), str(tmp_path / "a"), is_trainable=True)
    assert trainable(again) == set(saved)


def test_checkpoint_sizes_follow_what_trains(tmp_path):
    sizes = {}
    for name, config in [("full", FullFinetuneConfig()), ("layer", LayerFreezingConfig(1)), ("bitfit", BitFitConfig())]:
        model = fastpeft.get_peft_model(tiny_model("gpt2"), config)
        fastpeft.save_adapter(model, str(tmp_path / name))
        sizes[name] = os.path.getsize(tmp_path / name / "adapter_model.safetensors")
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 4 * n_trainable <= sizes[name] < 4 * n_trainable + 16384  # fp32 tensors plus a header
    assert sizes["bitfit"] < sizes["layer"] < sizes["full"]


# ---------------------------------------------------------------- refusals

def test_bitfit_refuses_a_model_without_biases():
    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="BitFit trains bias terms, and LlamaForCausalLM has none"):
        fastpeft.get_peft_model(model, BitFitConfig())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "fastpeft_config")


def test_bad_configs_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="num_trainable_layers=3 but model.layers holds 2 layers"):
        fastpeft.get_peft_model(tiny_model("llama"), LayerFreezingConfig(num_trainable_layers=3))
    with pytest.raises(ValueError, match="num_trainable_layers must be an integer >= 0"):
        LayerFreezingConfig(num_trainable_layers=-1)
    with pytest.raises(ValueError, match="nothing would train"):
        LayerFreezingConfig(num_trainable_layers=0)
    with pytest.raises(ValueError, match="modules_to_train: no module named 'decoder_head'"):
        fastpeft.get_peft_model(tiny_model("llama"), LayerFreezingConfig(1, modules_to_train=["decoder_head"]))
    with pytest.raises(ValueError, match="BitFitConfig.modules_to_train: no module named 'pooler'"):
        fastpeft.get_peft_model(tiny_model("gpt2"), BitFitConfig(modules_to_train=["pooler"]))
    with pytest.raises(ValueError, match="no nn.ModuleList named 'encoder.block'"):
        fastpeft.get_peft_model(tiny_model("gpt2"), LayerFreezingConfig(1, layers_pattern="encoder.block"))
    # a BitFit checkpoint cannot go into a model without biases; the model is left as it was
    model = fastpeft.get_peft_model(tiny_model("gpt2"), BitFitConfig())
    fastpeft.save_adapter(model, str(tmp_path / "bitfit"))
    llama = tiny_model("llama")
    with pytest.raises(fastpeft.CheckpointError, match="does not fit this model: BitFit trains bias terms"):
        fastpeft.load_adapter(llama, str(tmp_path / "bitfit"))
    assert not hasattr(llama, "fastpeft_config")


def test_a_second_method_on_one_model_is_refused():
    model = fastpeft.get_peft_model(tiny_model("gpt2"), BitFitConfig())
    with pytest.raises(ValueError, match="must be the model's only one"):
        fastpeft.get_peft_model(model, FullFinetuneConfig())
    assert isinstance(model.fastpeft_config["default"], BitFitConfig)
    assert all(n.endswith(".bias") for n in trainable(model))
