"""A fresh task head trained with every method, not only LoRA: modules_to_save and the task_type's
heads for (IA)3, prompt tuning, prefix tuning, bottleneck adapters and Compacter (one
implementation, fastpeft.methods.heads), in PEFT's checkpoint format. disable_adapters with a head:
tests/test_methods_common.py.

The model is tests/models.py's BERT classifier (num_labels=3): its ``classifier`` is the head.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.nn import ModulesToSaveWrapper

from models import VOCAB, model_inputs, tiny_model

METHODS = {
    "ia3": lambda **kw: fastpeft.IA3Config(**{"task_type": "SEQ_CLS", **kw}),
    "prompt": lambda **kw: fastpeft.PromptTuningConfig(num_virtual_tokens=3, **kw),  # task_type inferred
    "prefix": lambda **kw: fastpeft.PrefixTuningConfig(num_virtual_tokens=3, **kw),  # task_type inferred
    "bottleneck": lambda **kw: fastpeft.BottleneckConfig(**{"task_type": "SEQ_CLS", **kw}),
    "compacter": lambda **kw: fastpeft.CompacterConfig(**{"task_type": "SEQ_CLS", **kw}),
    # no sparsity target: train() here adds no L0 penalty, and eval's projection to 99 % sparsity
    # would drop the deltas the head was trained beside
    "diffpruning": lambda **kw: fastpeft.DiffPruningConfig(**{"task_type": "SEQ_CLS", "target_sparsity": 0.0, **kw}),
}
# PEFT's keys for modules to save: prompt learning's PeftModel holds the transformers model as
# base_model; tuner methods (and fastpeft's bottleneck-style methods, in LoRA's form) one level deeper.
HEAD_PREFIX = {"ia3": "base_model.model.", "prompt": "base_model.", "prefix": "base_model.",
               "bottleneck": "base_model.model.", "compacter": "base_model.model.",
               "diffpruning": ""}  # DiffPruning's own format (PEFT has no such method): keys as the model names them


def bert(head_seed: int | None = None):
    """The tiny BERT classifier; with `head_seed`, the same encoder under another random head."""
    model = tiny_model("bert")
    if head_seed is not None:
        torch.manual_seed(head_seed)
        model.classifier.reset_parameters()
    return model


def task(batch: int = 12, seq: int = 6):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(0, 3, (batch,), generator=g)


def train(model, steps: int = 50, train_head: bool = True) -> float:
    """Adam on the trainable tensors (the head's copy left out unless `train_head`); the last loss."""
    ids, labels = task()
    head = {id(p) for p in model.classifier.modules_to_save.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and (train_head or id(p) not in head)]
    opt = torch.optim.Adam(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def perturbed(model):
    """Every trainable tensor moved off its init, so each shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_head_is_a_trained_copy_and_training_it_beats_the_frozen_random_head(name):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(bert(), METHODS[name]())
    config = model.fastpeft_config["default"]
    assert config.task_type == "SEQ_CLS" and config.modules_to_save == ["classifier", "score"]
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    original = model.classifier.original_module.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    assert trainable == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    start = model.classifier.modules_to_save["default"].weight.detach().clone()
    with_head = train(model)
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, start)  # the head trained
    assert torch.equal(model.classifier.original_module.weight, original)  # the original stayed frozen

    torch.manual_seed(0)
    frozen = fastpeft.get_peft_model(bert(), METHODS[name]())
    frozen_head = train(frozen, train_head=False)
    assert with_head < frozen_head, (with_head, frozen_head)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_checkpoint_holds_the_head_and_reloads_it_onto_another_random_head(name, tmp_path):
    model = perturbed(fastpeft.get_peft_model(bert(), METHODS[name]()))
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    fastpeft.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    prefix = HEAD_PREFIX[name]
    head = model.classifier.modules_to_save["default"]
    torch.testing.assert_close(saved[f"{prefix}classifier.weight"], head.weight, rtol=0, atol=0)
    torch.testing.assert_close(saved[f"{prefix}classifier.bias"], head.bias, rtol=0, atol=0)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier", "score"] and written["task_type"] == "SEQ_CLS"

    other = bert(head_seed=7)
    random_head = other.classifier.weight.detach().clone()
    reloaded = fastpeft.load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)
    assert torch.equal(reloaded.classifier.original_module.weight, random_head)
    assert not any(p.requires_grad for p in reloaded.parameters())  # loaded for inference


def test_modules_to_save_alone_trains_a_head_without_a_task_type(tmp_path):
    """modules_to_save on a config without task_type (the bottleneck methods have no PEFT task class)."""
    model = perturbed(fastpeft.get_peft_model(bert(), fastpeft.BottleneckConfig(modules_to_save=["classifier"])))
    assert model.fastpeft_config["default"].modules_to_save == ["classifier"]
    fastpeft.save_adapter(model, tmp_path / "b")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= \
        set(load_file(tmp_path / "b" / "adapter_model.safetensors"))
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(fastpeft.load_adapter(bert(head_seed=9), tmp_path / "b")(**inputs).logits,
                                   model(**inputs).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- refusals, nothing changed

def untouched(model):
    return (not hasattr(model, "fastpeft_config") and not isinstance(model.classifier, ModulesToSaveWrapper)
            and all(p.requires_grad for p in model.parameters())
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_module_to_save_that_names_nothing_is_refused_before_any_change(name):
    model = bert()
    model.train()
    with pytest.raises(ValueError, match="modules_to_save: no module of the model"):
        fastpeft.get_peft_model(model, METHODS[name](modules_to_save=["nothing_here"], task_type="CAUSAL_LM"))
    assert untouched(model)


@pytest.mark.parametrize("name, config", [
    ("bottleneck", lambda: fastpeft.BottleneckConfig(modules_to_save=["layer.1"])),
    ("compacter", lambda: fastpeft.CompacterConfig(modules_to_save=["layer.0"])),
])
def test_a_block_inside_a_module_to_save_is_refused(name, config):
    model = bert()
    with pytest.raises(ValueError, match="either adapted or trained whole"):
        fastpeft.get_peft_model(model, config())
    assert untouched(model)


def test_ia3_leaves_the_modules_to_save_unscaled_as_peft_does():
    model = fastpeft.get_peft_model(bert(), fastpeft.IA3Config(modules_to_save=["layer.1"]))
    scaled = {n for n, m in model.named_modules() if isinstance(m, fastpeft.methods.ia3.IA3Linear)}
    assert scaled and all(".layer.0." in n for n in scaled)
    assert isinstance(model.bert.encoder.layer[1], ModulesToSaveWrapper)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_checkpoint_without_the_head_or_with_another_head_shape_is_refused(name, tmp_path):
    model = perturbed(fastpeft.get_peft_model(bert(), METHODS[name]()))
    fastpeft.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(path)
    from safetensors.torch import save_file

    key = f"{HEAD_PREFIX[name]}classifier.weight"
    save_file({k: v for k, v in state.items() if k != key}, path)
    target = bert()
    with pytest.raises(fastpeft.CheckpointError, match=f"missing key '{key}'"):
        fastpeft.load_adapter(target, tmp_path / "a")
    assert not hasattr(target, "fastpeft_config") and not isinstance(target.classifier, ModulesToSaveWrapper)
    save_file({**state, key: torch.zeros(5, 32)}, path)
    with pytest.raises(fastpeft.CheckpointError, match=f"'{key}' has shape \\[5, 32\\] but the model expects \\[3, 32\\]"):
        fastpeft.load_adapter(target, tmp_path / "a")
    assert not hasattr(target, "fastpeft_config")


# ---------------------------------------------------------------- PEFT interop, both ways

peft = pytest.importorskip("peft")

PEFT_CONFIGS = {
    "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
    "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
}


def peft_head(ref):
    """The trained copy of the head in a PeftModelForSequenceClassification."""
    inner = ref.base_model if ref.peft_config["default"].is_prompt_learning else ref.base_model.model
    return inner.classifier.modules_to_save["default"]


def same_outputs_or_prefix_tensors(ours, ref, name):
    """Logits equal; for prefix tuning, which PEFT cannot run on BERT (its SEQ_CLS forward raises
    "Model does not support past key values" with transformers 5), the prefix table and the head."""
    if name != "prefix":
        inputs = model_inputs("bert")
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits)
        return
    torch.testing.assert_close(ours.fastpeft_prompt_encoder.embedding.weight,
                               ref.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    for mine, theirs in zip(ours.classifier.modules_to_save["default"].parameters(), peft_head(ref).parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_peft_reads_what_fastpeft_writes(name, tmp_path):
    ours = perturbed(fastpeft.get_peft_model(bert(), METHODS[name]()))
    fastpeft.save_adapter(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(bert(head_seed=7), str(tmp_path / "a")).eval()
    assert type(ref).__name__ == "PeftModelForSequenceClassification"
    same_outputs_or_prefix_tensors(ours, ref, name)


def test_peft_reads_a_prompt_saved_without_a_task_type(tmp_path):
    """The prompt of a BERT classifier saved with no task_type given: fastpeft records SEQ_CLS, which
    makes PEFT's loader require the classifier's keys (it raised KeyError 'base_model.classifier.weight')."""
    ours = perturbed(fastpeft.get_peft_model(bert(), fastpeft.PromptTuningConfig(num_virtual_tokens=3)))
    fastpeft.save_adapter(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(bert(head_seed=7), str(tmp_path / "a")).eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(ref(**inputs).logits, ours(**inputs).logits)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_fastpeft_reads_what_peft_writes(name, tmp_path):
    torch.manual_seed(0)
    ref = peft.get_peft_model(bert(), PEFT_CONFIGS[name]())
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ref.eval().save_pretrained(str(tmp_path / "p"))
    ours = fastpeft.load_adapter(bert(head_seed=7), tmp_path / "p")
    assert isinstance(ours.classifier, ModulesToSaveWrapper)
    same_outputs_or_prefix_tensors(ours, ref, name)
