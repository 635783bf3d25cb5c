"""DoRA as a LoRA option (issue 17): equality with PEFT's DoRA on tiny Llama, GPT-2 (Conv1D) and
BERT models, checkpoints both ways, from_peft, merging, the ‖Wᵢ‖² cache, QDoRA, the pool's refusal
and a training step's memory."""

import copy
import json
import random

import pytest
import torch

import fastpeft
from fastpeft import LoraConfig
from fastpeft.nn import Linear4bit, LoRALinear, MultiLoRALinear
from fastpeft.ops import record_faces
from fastpeft.ops.dora_linear import row_norms_sq

from conftest import assert_close, peak_cpu_bytes_above_start
from models import TARGETS, model_inputs, output_of, tiny_model

peft = pytest.importorskip("peft")

KINDS = ["llama", "gpt2", "bert"]


def random_config(kind: str, seed: int) -> dict:
    """A random DoRA config for `kind`: rank, alpha, rsLoRA, a subset of its targets, random
    (non-zero) B so that the direction differs from W."""
    rng = random.Random(seed)
    targets, to_save = TARGETS[kind]
    chosen = rng.sample(targets, rng.randint(1, len(targets)))
    return dict(r=rng.choice([1, 2, 4, 8]), lora_alpha=rng.choice([1, 4, 16]), use_rslora=rng.random() < 0.5,
                target_modules=chosen, modules_to_save=to_save, init_lora_weights=False, use_dora=True)


def peft_dora(kind: str, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(**config))
    with torch.no_grad():  # magnitudes away from their init, so that g = m / norm is not 1
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model


def dora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.uses_dora()]


def trainable_grads(model, prefix=""):
    return {prefix + n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def logits_and_grads(model, inputs, seed=1):
    """Logits, and the gradients of a fixed random projection of them. In eval mode: the models'
    own dropout (GPT-2's, BERT's) would differ between the two runs."""
    model.eval()
    y = output_of(model, inputs)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)))
    return y


# ---------------------------------------------------------------- equality with PEFT

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_and_gradients_equal_pefts_dora(kind, seed, tmp_path):
    """Random configs: PEFT's DoRA model saved; fastpeft loads the file into a fresh model; logits
    and the gradient of every trainable tensor (A, B, magnitudes, heads) equal PEFT's."""
    config = random_config(kind, seed)
    ref = peft_dora(kind, config, seed)
    ref.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"), is_trainable=True)
    assert dora_layers(ours) and ours.fastpeft_config["default"].use_dora
    inputs = model_inputs(kind)
    with record_faces() as taken:
        y = logits_and_grads(ours, inputs)
    assert {op for op, _ in taken} == {"dora_linear_fwd", "dora_linear_bwd"}
    y_ref = logits_and_grads(ref, inputs)
    assert_close(y, y_ref)
    ref_grads = trainable_grads(ref)
    ours_grads = trainable_grads(ours, "base_model.model.")
    assert set(ours_grads) == set(ref_grads) and any("lora_magnitude_vector" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, ref_grads[name], msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_init_is_pefts(kind):
    """PEFT's init: m = ‖W + s·B·A‖ per row, for random A and B (fastpeft's from the expansion,
    PEFT's from the formed sum)."""
    config = random_config(kind, 3)
    ref = peft_dora(kind, config)
    ours = fastpeft.from_peft(copy.deepcopy(ref))
    for layer, (name, ref_layer) in zip(dora_layers(ours), ((n, m) for n, m in ref.named_modules()
                                                           if hasattr(m, "lora_magnitude_vector") and
                                                           len(m.lora_magnitude_vector))):
        delta = ref_layer.lora_B["default"].weight @ ref_layer.lora_A["default"].weight
        want = ref_layer.lora_magnitude_vector["default"].get_weight_norm(
            ref_layer.get_base_layer().weight, delta, ref_layer.scaling["default"])
        assert_close(layer.weight_norm(), want, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_reads_what_fastpeft_writes(kind, tmp_path):
    torch.manual_seed(5)
    config = random_config(kind, 7)
    ours = fastpeft.get_peft_model(tiny_model(kind), LoraConfig(**config))
    with torch.no_grad():
        for layer in dora_layers(ours):
            layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)  # PEFT's key, no ".weight"
    ref = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "ours"))
    inputs = model_inputs(kind)
    ours.eval()
    assert_close(output_of(ours, inputs), output_of(ref, inputs))
    for n, p in ref.named_parameters():
        if "lora_magnitude_vector" in n:  # loaded, not re-initialised by PEFT
            own = ours.get_parameter(n.removeprefix("base_model.model."))
            assert torch.equal(p, own), n


def test_a_dora_checkpoint_without_magnitudes_is_refused(tmp_path):
    model = fastpeft.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.save_adapter(model, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    fresh = tiny_model("llama")
    with pytest.raises(fastpeft.CheckpointError, match=r"missing key .*q_proj\.lora_magnitude_vector"):
        fastpeft.load_adapter(fresh, str(tmp_path / "a"))
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_peft_shares_magnitudes_and_outputs(kind):
    ref = peft_dora(kind, random_config(kind, 2))
    inputs = model_inputs(kind)
    expected = output_of(ref.eval(), inputs).detach()
    magnitudes = {id(p) for n, p in ref.named_parameters() if "lora_magnitude_vector" in n}
    model = fastpeft.from_peft(ref)
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert {id(p) for n, p in model.named_parameters() if "lora_magnitude_vector" in n} == magnitudes
    assert_close(output_of(model, inputs), expected)


def test_from_peft_of_a_merged_dora_model_unmerges_as_peft():
    ref = peft_dora("llama", random_config("llama", 4))
    inputs = model_inputs("llama")
    expected = output_of(ref.eval(), inputs).detach()
    ref.base_model.merge_adapter()
    model = fastpeft.from_peft(ref)
    assert all(layer.merged for layer in dora_layers(model)) and dora_layers(model)
    assert_close(output_of(model, inputs), expected)
    with fastpeft.disable_adapters(model):  # unmerged with PEFT's norms, then the base alone
        base = output_of(model, inputs)
    assert_close(base, output_of(tiny_model("llama"), inputs))


# ---------------------------------------------------------------- the layer

def dora_layer(fan_in_fan_out=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(24, 20)  # weight [in=20, out=24]
        torch.nn.init.normal_(base.weight, std=0.2)
        torch.nn.init.normal_(base.bias)
    else:
        base = torch.nn.Linear(20, 24)
    layer = LoRALinear(base.to(dtype), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.7, 1.3, 24).to(dtype))
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_merge_and_unmerge(fan_in_fan_out):
    layer = dora_layer(fan_in_fan_out)
    assert layer.fan_in_fan_out == fan_in_fan_out
    x = torch.randn(7, 20)
    w0 = layer.weight.detach().clone()
    y = layer(x).detach()
    layer.merge()
    assert layer.merged and not torch.allclose(layer.weight, w0)
    assert_close(layer(x), y)
    assert_close(torch.nn.functional.linear(x, layer.weight.t() if fan_in_fan_out else layer.weight,
                                            layer.bias), y)
    layer.unmerge()
    assert_close(layer.weight, w0)
    assert_close(layer(x), y)


def test_merging_a_second_dora_adapter_uses_the_unmerged_norm_as_peft():
    """PEFT: each merged DoRA adapter's norm is of the unmerged weight, the merges applied in turn."""
    layer = dora_layer()
    layer.add_adapter("other", r=2, lora_alpha=2, init_lora_weights=False, use_dora=True)
    ref = peft.get_peft_model(_holder(copy.deepcopy(layer.base_layer)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    ref.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], use_dora=True))
    ref_layer = ref.base_model.model.proj
    with torch.no_grad():
        for name in ("default", "other"):
            ref_layer.lora_A[name].weight.copy_(layer.lora_A[name].weight)
            ref_layer.lora_B[name].weight.copy_(layer.lora_B[name].weight)
            ref_layer.lora_magnitude_vector[name].weight.copy_(layer.lora_magnitude_vector[name].weight)
    layer.merge(["default"])
    layer.merge(["other"])
    ref_layer.merge(adapter_names=["default", "other"])
    assert layer.merged_adapters == ["default", "other"]
    assert_close(layer.weight, ref_layer.get_base_layer().weight)
    layer.unmerge()
    ref_layer.unmerge()
    assert_close(layer.weight, ref_layer.get_base_layer().weight)


def _holder(linear):
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)
    return Holder()


def test_a_fresh_dora_layer_computes_its_base():
    base = torch.nn.Linear(20, 24)
    layer = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(5, 20)
    assert_close(layer(x), base(x))
    assert_close(layer.lora_magnitude_vector["default"].weight, base.weight.norm(dim=1))


def test_the_norm_cache_is_computed_once_and_follows_the_base_weight(monkeypatch):
    """‖Wᵢ‖² is computed on the first forward and reused; a change of the base weight (an in-place
    write, a load, a merge, a new dtype) recomputes it, and the layer still equals the reference."""
    import importlib

    module = importlib.import_module("fastpeft.nn.lora")
    calls = []
    real = module.row_norms_sq
    monkeypatch.setattr(module, "row_norms_sq", lambda w: (calls.append(1), real(w))[1])
    layer = dora_layer()
    calls.clear()  # (the magnitude's init computed it)
    layer.refresh_weight_norm()
    x = torch.randn(6, 20)

    def check():
        with fastpeft.use_backend("torch"):
            want = layer(x)
        assert_close(layer(x), want)

    check()
    layer(x)
    assert len(calls) == 1  # the reference does not read it; the automatic face read it once
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)     # an in-place write: the version counter moves
    check()
    assert len(calls) == 2
    layer.base_layer.load_state_dict({"weight": torch.randn(24, 20), "bias": torch.zeros(24)})
    check()
    assert len(calls) == 3
    layer.merge()
    layer.unmerge()
    check()
    layer.base_layer.weight = torch.nn.Parameter(torch.randn(24, 20), requires_grad=False)  # a new tensor
    check()
    layer.to(torch.bfloat16)
    check()
    assert layer.base_weight_norm_sq().dtype == torch.float32


def test_a_dora_layer_pickles_and_deep_copies():
    """torch.save of a whole layer (its ‖Wᵢ‖² cache holds a weak reference, which pickle refuses)."""
    import io

    layer = dora_layer()
    x = torch.randn(3, 20)
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
        assert_close(other(x), y)
        with torch.no_grad():
            other.base_layer.weight.mul_(2.0)  # the copy's weight, not the original's
        assert_close(layer(x), y)


def test_qdora_over_a_4bit_base_matches_dora_on_the_dequantised_weight():
    """QDoRA: the same layer over the NF4 base as over its dequantised weight (what PEFT's DoRA on a
    bitsandbytes base computes); merging requantises, with the warning."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    q_base = Linear4bit.from_linear(linear, 64, double_quant=True)
    dense = torch.nn.Linear(128, 48)
    with torch.no_grad():
        dense.weight.copy_(q_base.dequantized_weight())
        dense.bias.copy_(linear.bias)
    qdora = LoRALinear(q_base, r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    plain = LoRALinear(dense, r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        for t in ("lora_A", "lora_B"):
            getattr(plain, t)["default"].weight.copy_(getattr(qdora, t)["default"].weight)
        plain.lora_magnitude_vector["default"].weight.copy_(qdora.lora_magnitude_vector["default"].weight)
    assert_close(qdora.weight_norm(), plain.weight_norm())
    x = torch.randn(9, 128)
    got, want = [], []
    for layer, out in ((qdora, got), (plain, want)):
        with record_faces() as taken:
            y = layer(x)
            y.backward(torch.ones_like(y))
        out += [y] + [p.grad for p in layer.parameters() if p.requires_grad]
        out.append({op for op, _ in taken})
    assert got[-1] == {"nf4_matmul"} and want[-1] == {"dora_linear_fwd", "dora_linear_bwd"}
    for g, w in zip(got[:-1], want[:-1]):
        assert_close(g, w)
    from fastpeft.quant import quantize_nf4

    g = (qdora.lora_magnitude_vector["default"].weight.float() / qdora.weight_norm())[:, None]
    expected = quantize_nf4(g * (q_base.dequantized_weight().float() + qdora.delta_weight()), 64, True)
    with pytest.warns(UserWarning, match="requantised to NF4"):
        qdora.merge()
    assert torch.equal(q_base.q.packed, expected.packed) and torch.equal(q_base.q.absmax, expected.absmax)


def test_qlora_dora_model_trains():
    model = fastpeft.quantize_model(tiny_model("llama", hidden_size=64, intermediate_size=128), double_quant=True)
    fastpeft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    assert dora_layers(model) and all(layer.quantized for layer in dora_layers(model))
    from models import train_on_own_tokens

    ids = model_inputs("llama", batch=4, seq=12)["input_ids"]
    losses = train_on_own_tokens(model, ids, steps=15)
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------- what refuses DoRA

def test_the_pool_refuses_a_dora_checkpoint(tmp_path):
    model = fastpeft.get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    fastpeft.save_adapter(model, str(tmp_path / "dora"))
    pool = fastpeft.AdapterPool(tiny_model("llama"), max_adapters=2, max_rank=4)
    with pytest.raises(fastpeft.CheckpointError, match=r"is a DoRA adapter \(use_dora: true\)"):
        pool.load("d", str(tmp_path / "dora"))
    assert pool.names() == []


def test_a_pool_layer_refuses_a_dora_base():
    with pytest.raises(TypeError, match=r"holds DoRA adapters \['default'\]"):
        MultiLoRALinear(dora_layer(), max_adapters=2, max_rank=4)
    with pytest.raises(TypeError, match="DoRA"):
        fastpeft.AdapterPool(fastpeft.get_peft_model(tiny_model("llama"), LoraConfig(
            r=2, target_modules=["q_proj"], use_dora=True)), max_adapters=2, max_rank=4)


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_dora must be true or false"):
        LoraConfig(use_dora="yes")
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        LoRALinear(torch.nn.Linear(4, 4), r=2, use_dora=1)


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_a_dora_training_step_allocates_no_out_by_in_temporary(quantized):
    """One layer, wide and short (4096 x 1024 weight, 8 tokens): a W + s·B·A, as PEFT forms each
    step, would be 16 MiB in float32; everything a fused step needs is [tokens, features] or
    [rank, out] sized. The step's peak, and every tensor saved for its backward, stay far below
    one out × in float tensor."""
    torch.manual_seed(0)
    out_f, in_f = 4096, 1024
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    base = Linear4bit.from_linear(linear, 64, double_quant=True) if quantized else linear
    layer = LoRALinear(base, r=8, lora_alpha=16, init_lora_weights=False, use_dora=True)
    x = torch.randn(8, in_f, requires_grad=True)
    saved = []

    def keep_size(t):  # the float tensors saved for backward, but the base weight itself (not a copy)
        saved.append(t.numel() if t.is_floating_point() and t is not linear.weight else 0)
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
            y = layer(x)
        y.sum().backward()

    step()  # warm-up: the cached ‖Wᵢ‖² is computed here, once (a 4-bit base dequantised for it)
    saved.clear()
    peak = peak_cpu_bytes_above_start(step)
    out_by_in = out_f * in_f * 4
    assert saved and max(saved) < out_f * in_f / 8, saved
    # measured here: 0.7 MiB dense (C++ and Triton faces alike), 1.5 MiB over NF4 (its dequantised
    # tiles); the reference face, which forms W + s·B·A, 32 MiB, and PEFT's DoRA layer 52 MiB
    assert peak < 0.25 * out_by_in, (peak, out_by_in)


# ---------------------------------------------------------------- the commands

def test_finetune_dora_with_peft_beside_it_and_peft_reads_the_adapter(tmp_path, capsys):
    """`fastpeft finetune --method dora --compare peft`: both libraries train DoRA (each in its own
    process), counting the same trainable tensors; the adapter saved is PEFT's DoRA format and
    gives PEFT the same logits."""
    from fastpeft import cli
    from fastpeft.finetune import default_model

    report = tmp_path / "run.json"
    cli.main(["finetune", "--method", "dora", "--steps", "6", "--batch-size", "4", "--compare", "peft", "--save",
              str(tmp_path / "a"), "--json", str(report), "--no-progress", "--log-every", "0"])
    out = capsys.readouterr().out
    assert "fastpeft  dora" in out and "peft      dora" in out
    ours, theirs = json.loads(report.read_text())["results"]
    assert ours["trainable_params"] == theirs["trainable_params"]  # the magnitudes counted alike
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    ids = torch.randint(4, 64, (2, 10))
    model = fastpeft.load_adapter(default_model(seed=0), str(tmp_path / "a"))
    ref = peft.PeftModel.from_pretrained(default_model(seed=0), str(tmp_path / "a"))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_the_dora_method_learns():
    from fastpeft.finetune import FinetuneSettings, train

    result = train(FinetuneSettings(method="dora", steps=50, progress=False, log_every=0), "fastpeft")
    first, last, _ = result.first_and_final_loss()
    assert last < 0.8 * first, (first, last)


def test_a_dora_row_in_compare(one_thread):
    from fastpeft import compare

    settings = compare.CompareSettings(methods=["lora", "dora"], steps=3, eval_size=8, fresh_process=False,
                                       progress=False)
    lora, dora = compare.compare(settings)
    assert not lora.error and not dora.error, (lora.error, dora.error)
    magnitudes = dora.trainable_params - lora.trainable_params
    assert magnitudes > 0 and dora.total_params - lora.total_params == magnitudes  # one per output row
    assert dora.checkpoint_bytes > lora.checkpoint_bytes and dora.step_ms > 0


def test_a_dora_layer_compiles_in_one_graph_and_trains_as_eager():
    """LoRALinear with use_dora under torch.compile(fullgraph=True): no graph break (the norm cache's
    version check is not traceable, so a compiled graph computes ‖Wᵢ‖² itself), and the output and
    every trainable gradient equal eager's."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    base = torch.nn.Linear(24, 20)
    results = []
    for compile_ in (False, True):
        torch.manual_seed(seed)  # the same A, B and x both times
        layer = LoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 at init would hide the LoRA term
        x = torch.randn(7, 24)
        fn = torch.compile(layer, fullgraph=True) if compile_ else layer
        y = fn(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad for p in layer.parameters() if p.requires_grad])
    assert len(results[0]) == 4  # y, A, B, the magnitude
    for i, (got, want) in enumerate(zip(*results)):
        assert_close(got, want, msg=f"output {i}")
