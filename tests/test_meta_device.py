"""Models built on the meta device and materialised later (``to_empty`` + a state dict load), as big
models are made: every fastpeft module and get_peft_model work there, and compute afterwards what
the same module built on the CPU computes."""

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.nn import Linear4bit, LoRALinear, ModulesToSaveWrapper, PHMLinear, QLoRALinear

from conftest import assert_close
from models import model_inputs, tiny_model


def _materialise(module: nn.Module, state: dict) -> nn.Module:
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_on_meta_then_loaded(bias):
    torch.manual_seed(0)
    real = LoRALinear(nn.Linear(64, 48, bias=bias), r=4, init_lora_weights=False)
    with torch.device("meta"):
        meta = LoRALinear(nn.Linear(64, 48, bias=bias), r=4, init_lora_weights=False)
    x = torch.randn(5, 64)
    out = meta(x.to("meta"))  # shapes known before any weight is
    assert out.is_meta and out.shape == (5, 48)
    _materialise(meta, real.state_dict())
    assert_close(meta(x), real(x))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("assign", [False, True])
def test_linear4bit_on_meta_then_loaded(double_quant, assign):
    """A Linear4bit made on the meta device knows its shapes (the packed bytes, the scales, the
    tables) and holds no data; loading a state dict (after to_empty, or with assign=True straight
    from meta) gives it the weight's bytes and quantisation state."""
    torch.manual_seed(0)
    real = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    with torch.device("meta"):
        meta = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    held = {n: t for n, t in [*meta.named_parameters(), *meta.named_buffers()]}
    assert all(t.is_meta for t in held.values())
    assert {n: (t.shape, t.dtype) for n, t in held.items()} == \
        {n: (t.shape, t.dtype) for n, t in [*real.named_parameters(), *real.named_buffers()]}
    x = torch.randn(5, 96)
    assert meta(x.to("meta")).shape == (5, 40)
    if assign:
        meta.load_state_dict(real.state_dict(), assign=True)
    else:
        _materialise(meta, real.state_dict())
    assert all(t.device.type == "cpu" for t in [*meta.parameters(), *meta.buffers()])
    assert torch.equal(meta(x), real(x))
    assert meta.q.offset == real.q.offset


def test_qlora_layer_on_meta_then_loaded():
    torch.manual_seed(0)
    real = QLoRALinear.from_linear(nn.Linear(64, 48), r=4, init_lora_weights=False)
    with torch.device("meta"):
        meta = QLoRALinear.from_linear(nn.Linear(64, 48), r=4, init_lora_weights=False)
    x = torch.randn(2, 3, 64)
    assert meta(x.to("meta")).shape == (2, 3, 48)
    _materialise(meta, real.state_dict())
    assert torch.equal(meta(x), real(x))
    meta(x).sum().backward()  # trains once loaded
    assert meta.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("make", [lambda: PHMLinear(64, 32, phm_dim=4),
                                  lambda: ModulesToSaveWrapper(nn.Linear(64, 32), "default")],
                         ids=["PHMLinear", "ModulesToSaveWrapper"])
def test_other_modules_on_meta_then_loaded(make):
    torch.manual_seed(0)
    real = make()
    with torch.device("meta"):
        meta = make()
    x = torch.randn(3, 64)
    assert meta(x.to("meta")).shape == (3, 32)
    _materialise(meta, real.state_dict())
    assert_close(meta(x), real(x))


CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "lora+modules_to_save": lambda: fastpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                        init_lora_weights=False),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    "bottleneck": lambda: fastpeft.BottleneckConfig(),
    "compacter": lambda: fastpeft.CompacterConfig(),
    "prompt_tuning": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "diff_pruning": lambda: fastpeft.DiffPruningConfig(),
    "layer_freezing": lambda: fastpeft.LayerFreezingConfig(),
    "full_finetune": lambda: fastpeft.FullFinetuneConfig(),
    "bitfit": lambda: fastpeft.BitFitConfig(),
}


def _peft_model(kind, config, quantized):
    model = tiny_model(kind, hidden_size=64, intermediate_size=128) if kind == "llama" else tiny_model(kind)
    if quantized:
        fastpeft.quantize_model(model, double_quant=True)
    torch.manual_seed(5)
    return fastpeft.get_peft_model(model, config)


def _materialise_model(meta: nn.Module, real: nn.Module, swap: bool = False) -> None:
    """to_empty, then the real twin's state dict; the buffers a state dict does not carry (rotary
    embeddings' inv_freq, which transformers computes at build time) copied from the twin, as a
    loader recomputes them."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    # A parameter that several modules share (Compacter's PHM rule, tied embeddings) stays one
    # parameter through to_empty only when torch swaps tensors in place (swap=True); otherwise each
    # module gets its own copy, as for any torch module (transformers re-ties with tie_weights()).
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        meta.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    missing, unexpected = meta.load_state_dict(real.state_dict(), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        for name, module in meta.named_modules():
            for buffer in module._non_persistent_buffers_set:
                getattr(module, buffer).copy_(real.get_submodule(name).get_buffer(buffer))


@pytest.mark.parametrize("method,quantized", [(m, False) for m in CONFIGS] +
                         [(m, True) for m in ("lora", "lora+modules_to_save", "ia3")])  # methods wrapping linears
def test_get_peft_model_on_a_meta_model_then_loaded(method, quantized):
    """A tiny model built under torch.device("meta") (4-bit: quantize_model there too), the method
    applied there, a forward on meta for shapes; then to_empty + load computes what the model built
    on the CPU computes, and trains."""
    kind = "gpt2" if method == "bitfit" else "llama"  # BitFit needs biases; Llama has none
    real = _peft_model(kind, CONFIGS[method](), quantized)
    with torch.device("meta"):
        meta = _peft_model(kind, CONFIGS[method](), quantized)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    ids = model_inputs(kind)["input_ids"]
    assert meta(input_ids=ids.to("meta")).logits.shape == real(input_ids=ids).logits.shape
    if quantized:
        assert len([m for m in meta.modules() if isinstance(m, Linear4bit)]) == 14
    _materialise_model(meta, real, swap=method == "compacter")
    assert_close(meta(input_ids=ids).logits, real(input_ids=ids).logits)
    trainable = [p for p in meta.parameters() if p.requires_grad]
    assert trainable and len(trainable) == len([p for p in real.parameters() if p.requires_grad])
    meta.train()
    meta(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_multi_lora_linear_on_meta_then_materialised_and_loaded():
    """A pool layer built on meta (its float32 scalings included: to_empty used to fail copying them)
    materialises, and once loaded computes what one built on the CPU computes."""
    from fastpeft.nn import MultiLoRALinear

    torch.manual_seed(0)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    real = MultiLoRALinear(nn.Linear(16, 8), max_adapters=2, max_rank=4)
    real.set_adapter(1, a, b, 0.5)
    with torch.device("meta"):
        layer = MultiLoRALinear(nn.Linear(16, 8), max_adapters=2, max_rank=4)
    assert layer.scalings.is_meta
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(real.state_dict())  # the base weights and the stacks
    layer.set_adapter(1, a, b, 0.5)  # and the slot, as a pool loads it
    assert layer.scalings.dtype == torch.float32 and not layer.scalings.is_meta
    x, ids = torch.randn(5, 16), torch.tensor([1, -1, 1, 1, -1])
    assert_close(layer(x, adapter_ids=ids), real(x, adapter_ids=ids))
