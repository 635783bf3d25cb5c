"""What every method answers the same way: disable_adapters and merge_and_unload."""

import pytest
import torch

import fastpeft

from models import model_inputs, tiny_model


def _trained(config, kind="llama"):
    """A tiny model with the method applied and its trainable tensors moved off their init, so an
    adapter that is on shows in the outputs."""
    model = fastpeft.get_peft_model(tiny_model(kind), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


# name -> (config, model kind). On the BERT classifier the head is trained whole too (task_type
# SEQ_CLS, given or, for prompt learning, inferred): disabled, the original head runs.
SWITCHABLE = {
    "prompt": (lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3), "llama"),
    "prefix": (lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3), "llama"),
    "ia3": (lambda: fastpeft.IA3Config(), "llama"),
    "prompt with a head": (lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3), "bert"),
    "prefix with a head": (lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3), "bert"),
    "ia3 with a head": (lambda: fastpeft.IA3Config(task_type="SEQ_CLS"), "bert"),
}


@pytest.mark.parametrize("name", sorted(SWITCHABLE))
def test_disable_adapters_gives_the_base_model_and_back(name):
    config, kind = SWITCHABLE[name]
    inputs = model_inputs(kind, batch=2, seq=6)
    with torch.no_grad():
        base = tiny_model(kind)(**inputs).logits
        model = _trained(config(), kind)
        adapted = model(**inputs).logits
        with fastpeft.disable_adapters(model):
            off = model(**inputs).logits
        again = model(**inputs).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, adapted)


def test_methods_that_cannot_switch_off_or_merge_say_so():
    model = _trained(fastpeft.BitFitConfig(), "gpt2")
    with pytest.raises(TypeError, match="cannot switch a BitFitConfig adapter off"):
        with fastpeft.disable_adapters(model):
            pass
    prompt = _trained(fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="PromptTuningConfig adapter is not a weight delta"):
        fastpeft.merge_and_unload(prompt)


def test_merge_and_unload_of_methods_that_change_weights_keeps_the_outputs():
    inputs = model_inputs("gpt2", batch=2, seq=5)
    for config in (fastpeft.BitFitConfig(), fastpeft.DiffPruningConfig(target_modules=["c_fc"])):
        model = _trained(config, "gpt2")
        with torch.no_grad():
            before = model(**inputs).logits
            merged = fastpeft.merge_and_unload(model)
            after = merged(**inputs).logits
        assert not hasattr(merged, "fastpeft_config")
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_lora_multi_adapter_calls_refuse_a_model_with_another_method(tmp_path):
    model = _trained(fastpeft.IA3Config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_dir = tmp_path / "lora"
    fastpeft.save_adapter(fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(r=2)), lora_dir)
    with pytest.raises(TypeError, match="holds a IA3Config adapter"):
        fastpeft.add_adapter(model, fastpeft.LoraConfig(r=2), "other")
    with pytest.raises(fastpeft.CheckpointError, match="already has adapters"):
        fastpeft.load_adapter(model, lora_dir, "other")
    with pytest.raises(TypeError, match="cannot be removed in place"):
        fastpeft.delete_adapter(model, "default")
    fastpeft.set_adapter(model, "default")  # its one adapter: nothing changes
    with pytest.raises(KeyError):
        fastpeft.set_adapter(model, "other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert list(model.fastpeft_config) == ["default"]
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())
