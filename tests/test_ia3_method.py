"""(IA)³: the layer against its definition, PEFT's default targets, what trains, learning, checkpoints
both ways with PEFT, mixed-adapter batches in an AdapterPool, bad configs."""

import json

import pytest
import torch

import fastpeft
from fastpeft.methods.ia3 import IA3Linear

from conftest import DTYPES, assert_close
from models import tiny_model
from test_prompt_tuning import randomise_, sharp_model, subset_task, train_with_base_frozen, user_inputs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

KINDS = ["llama", "gpt2"]
# PEFT's defaults for these families: (output-scaled layer suffixes, input-scaled (feed-forward) suffixes)
PEFT_DEFAULTS = {"llama": ({"self_attn.k_proj", "self_attn.v_proj"}, {"mlp.down_proj"}),
                 "gpt2": ({"attn.c_attn"}, {"mlp.c_proj"})}


def vectors(model):
    return {n: m.ia3_l for n, m in model.named_modules() if isinstance(m, IA3Linear)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_equals_its_definition_forward_and_backward(feedforward, layer_kind, dtype):
    """y = base(x) * l (keys, values), or base(x * l) (feed-forward), l broadcast over rows."""
    torch.manual_seed(0)
    in_f, out_f = 24, 40
    if layer_kind == "linear":
        base = torch.nn.Linear(in_f, out_f).to(dtype)
    else:
        base = transformers.pytorch_utils.Conv1D(out_f, in_f).to(dtype)
        torch.nn.init.normal_(base.weight)
    layer = IA3Linear(base, feedforward, in_f, out_f, init_ones=False)
    assert layer.ia3_l.shape == ((1, in_f) if feedforward else (out_f, 1)) and layer.ia3_l.dtype == dtype
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    l_ref = layer.ia3_l.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = base(x * l_ref.flatten()) if feedforward else base(x) * l_ref.flatten()
    assert_close(y, y_ref, dtype)
    g = torch.randn_like(y)
    grad_x, grad_l = torch.autograd.grad(y, (x, layer.ia3_l), g)
    grad_x_ref, grad_l_ref = torch.autograd.grad(y_ref, (x, l_ref), g)
    assert_close(grad_x, grad_x_ref, dtype)
    assert_close(grad_l, grad_l_ref, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_are_peft_defaults_and_start_as_the_base_model(kind):
    ours = fastpeft.get_peft_model(tiny_model(kind), fastpeft.IA3Config())
    ref = peft.get_peft_model(tiny_model(kind), peft.IA3Config())
    ref_vectors = {n.replace("base_model.model.", "").replace(".ia3_l.default", ""): tuple(p.shape)
                   for n, p in ref.named_parameters() if "ia3_l" in n}
    assert {n: tuple(v.shape) for n, v in vectors(ours).items()} == ref_vectors
    scaled_out, feedforward = PEFT_DEFAULTS[kind]
    for name, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, IA3Linear)):
        suffix = ".".join(name.split(".")[-2:])
        assert suffix in (feedforward if layer.is_feedforward else scaled_out), name
    ids, mask = user_inputs()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits,
                           tiny_model(kind)(input_ids=ids, attention_mask=mask).logits)  # vectors of ones


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_vectors_train_and_the_loss_falls(kind):
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(sharp_model(kind), fastpeft.IA3Config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.ia3_l" for n in vectors(model)}
    assert len(trainable) == {"llama": 2 * 3, "gpt2": 2 * 2}[kind]  # per layer: k, v, down / c_attn, mlp.c_proj
    losses = train_with_base_frozen(model, subset_task(), lr=0.1)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_peft_reads_what_fastpeft_writes(kind, tmp_path):
    torch.manual_seed(2)
    ours = fastpeft.get_peft_model(tiny_model(kind), fastpeft.IA3Config(init_ia3_weights=False))
    fastpeft.save_adapter(ours, str(tmp_path / "ia3"))
    saved = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert saved["feedforward_modules"] == (["down_proj"] if kind == "llama" else ["mlp.c_proj"])
    ref = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "ia3"))
    ids, mask = user_inputs(pad_first=2)
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask, labels=ids)
        y_ref = ref(input_ids=ids, attention_mask=mask, labels=ids)
    assert_close(y.logits, y_ref.logits)
    assert_close(y.loss, y_ref.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_fastpeft_loads_what_peft_writes(kind, tmp_path):
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_model(kind), peft.IA3Config(init_ia3_weights=False))
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"))
    assert not any(p.requires_grad for p in ours.parameters())
    ids, mask = user_inputs()
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_equals_peft(dtype, tmp_path):
    torch.manual_seed(4)
    ours = fastpeft.get_peft_model(tiny_model("llama").to(dtype), fastpeft.IA3Config(init_ia3_weights=False))
    assert all(v.dtype == dtype for v in vectors(ours).values())
    fastpeft.save_adapter(ours, str(tmp_path / "ia3"))
    ref = peft.PeftModel.from_pretrained(tiny_model("llama").to(dtype), str(tmp_path / "ia3"))
    ids, mask = user_inputs()
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits,
                     dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    torch.manual_seed(5)
    config = fastpeft.IA3Config(target_modules="all-linear", feedforward_modules=".*(down_proj|mlp.c_proj)")
    model = fastpeft.get_peft_model(tiny_model(kind), config)
    for v in vectors(model).values():
        randomise_(torch.nn.ParameterList([v]), seed=v.numel())
    fastpeft.save_adapter(model, str(tmp_path / "ia3"))
    loaded = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "ia3"), is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {f"{n}.ia3_l" for n in vectors(model)}
    ids, mask = user_inputs(pad_first=1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_in_an_adapter_pool_gives_each_row_its_own_adapter(kind, tmp_path):
    """Two (IA)3 adapters written by fastpeft, served side by side (and beside the base model)."""
    for name, seed in (("a", 6), ("b", 7)):
        torch.manual_seed(seed)
        model = fastpeft.get_peft_model(tiny_model(kind), fastpeft.IA3Config(init_ia3_weights=False))
        fastpeft.save_adapter(model, str(tmp_path / name))
    served = tiny_model(kind)
    pool = fastpeft.AdapterPool(served, max_adapters=2, max_rank=4)
    pool.load("a", str(tmp_path / "a"))
    pool.load("b", str(tmp_path / "b"))
    ids, mask = user_inputs(batch=4, seq=5)
    names = ["b", None, "a", "b"]
    with torch.no_grad():
        mixed = served(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = tiny_model(kind)
            if name is not None:
                alone = fastpeft.load_adapter(alone, str(tmp_path / name))
            assert_close(mixed[row:row + 1], alone(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits,
                         msg=f"row {row} ({name})")
        assert not torch.allclose(mixed[0], mixed[2])


def test_targets_given_without_feedforward_modules_take_the_down_projection():
    config = fastpeft.IA3Config(target_modules=["v_proj", "down_proj"])
    model = fastpeft.get_peft_model(tiny_model("llama"), config)
    assert config.feedforward_modules == ["down_proj"]  # resolved in place, as PEFT does, and saved so
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert sorted(n.split(".")[-1] for n in layers) == ["down_proj", "down_proj", "v_proj", "v_proj"]
    assert all(m.is_feedforward == n.endswith("down_proj") for n, m in layers.items())


def _untouched(model, before):
    assert not any(isinstance(m, IA3Linear) for m in model.modules()) and not hasattr(model, "fastpeft_config")
    assert [n for n, _ in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(target_modules=["k_proj", "nonexistent_proj"]), ValueError, "entry 'nonexistent_proj' matches no module"),
    (dict(target_modules="nonexistent_proj"), ValueError, "matched no module of the model"),
    (dict(target_modules=".*mlp"), TypeError, "is a LlamaMLP"),
    (dict(target_modules=["k_proj", "v_proj", "down_proj"], exclude_modules=["k_proj", "v_proj", "down_proj"]),
     ValueError, "matched no module"),
])
def test_targets_that_do_not_fit_the_model_change_nothing(kw, exc, pattern):
    model = tiny_model("llama")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(exc, match=pattern):
        fastpeft.get_peft_model(model, fastpeft.IA3Config(**kw))
    _untouched(model, before)


def test_models_without_key_value_projections_need_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="none of the usual key/value projections"):
        fastpeft.get_peft_model(model, fastpeft.IA3Config())


@pytest.mark.parametrize("kw, pattern", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "are not in target_modules"),
    (dict(target_modules=[]), "empty list"),
    (dict(target_modules=[3]), "must be a regex string or a list of names"),
])
def test_bad_configs_are_refused(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastpeft.IA3Config(**kw)

