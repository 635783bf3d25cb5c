"""Where a PEFT user swapping one import would meet a difference: each test here failed before the
behaviour it checks was made PEFT's (or, where PEFT is inconsistent, the documented right thing)."""

import json

import pytest
import torch

import fastpeft
from fastpeft import AdapterPool, LoraConfig

from models import model_inputs, tiny_model

METHOD_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear",
                               init_lora_weights="gaussian"),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4),
    "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4),
    "bottleneck": lambda: fastpeft.BottleneckConfig(reduction_factor=4),
    "diffpruning": lambda: fastpeft.DiffPruningConfig(),
}


def _new_modules(model, before):
    return [m for m in model.modules() if id(m) not in before]


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_new_modules_take_the_models_training_mode(method, training):
    """A module a method puts into a model runs in the mode of what it replaces: an adapter added to
    a model in eval mode has its dropout off (PEFT leaves its layers in training mode: a difference
    on purpose, in the README)."""
    model = tiny_model("llama").train(training)
    before = {id(m) for m in model.modules()}
    fastpeft.get_peft_model(model, METHOD_CONFIGS[method]())
    new = _new_modules(model, before)
    assert new and all(m.training == training for m in new), [type(m).__name__ for m in new if m.training != training]


def test_a_pool_on_an_eval_model_is_in_eval_mode():
    model = tiny_model("llama")
    before = {id(m) for m in model.modules()}
    AdapterPool(model, max_adapters=2, max_rank=4)
    assert not any(m.training for m in _new_modules(model, before))


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_loaded_adapter_with_dropout_is_deterministic_for_inference(tmp_path, is_trainable):
    """load_adapter(is_trainable=False) puts the model in eval mode, as PEFT's does; and even a
    trainable load into an eval model adds its layers in eval mode. Before, an adapter trained with
    lora_dropout gave random outputs at inference (two identical calls differed by 0.29)."""
    trained = tiny_model("llama").train()
    fastpeft.get_peft_model(trained, METHOD_CONFIGS["lora"]())
    fastpeft.save_adapter(trained, tmp_path / "a")
    model = tiny_model("llama").train(is_trainable)
    fastpeft.load_adapter(model, tmp_path / "a", is_trainable=is_trainable)
    if is_trainable:
        assert all(m.training for m in model.modules())  # what the user had, kept
        model.eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_empty_batch_backpropagates_an_expanded_gradient(backend):
    """``layer(x).sum().backward()`` with no rows: autograd hands the backward a gradient expanded
    from a scalar (stride 0 everywhere), which every op refused as not contiguous."""
    from fastpeft.nn import LoRALinear, MultiLoRALinear, PHMLinear
    from fastpeft.ops.adapter_block import adapter_block

    if not fastpeft.backends.availability(backend, "cpu").usable:
        pytest.skip(fastpeft.backends.availability(backend, "cpu").reason)
    lin = torch.nn.Linear(16, 8)
    pool_layer = MultiLoRALinear(lin, max_adapters=2, max_rank=2)
    pool_layer.set_adapter(0, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    weights = [torch.randn(4, 16), torch.randn(4), torch.randn(16, 4), torch.randn(16)]
    weights = [w.requires_grad_() for w in weights]
    runs = {
        "lora": lambda x: LoRALinear.from_linear(lin, r=2, lora_alpha=4, init_lora_weights="gaussian")(x),
        "phm": lambda x: PHMLinear(16, 8, 2)(x),
        "pool": lambda x: pool_layer(x, torch.zeros(0, dtype=torch.long)),
        "adapter_block": lambda x: adapter_block(x, x, *weights, 1.0, "relu"),
    }
    with fastpeft.use_backend(backend):
        for name, run in runs.items():
            x = torch.randn(0, 16, requires_grad=True)
            run(x).sum().backward()
            assert x.grad is not None and x.grad.shape == (0, 16), name


def test_fan_in_fan_out_follows_the_layer_type_as_in_peft(tmp_path):
    """PEFT warns and sets fan_in_fan_out to False on nn.Linear (True on Conv1D); fastpeft
    transposed nn.Linear's weight (a non-square k_proj raised a shape error, square ones computed
    other logits)."""
    inputs = model_inputs("llama")
    plain = tiny_model("llama")
    fastpeft.get_peft_model(plain, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    flagged = tiny_model("llama")
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        fastpeft.get_peft_model(flagged, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                                    fan_in_fan_out=True))
    for (name, a), (_, b) in zip(plain.named_parameters(), flagged.named_parameters()):
        assert torch.equal(a, b), name  # the same seed: the same adapters
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, flagged(**inputs).logits)
    fastpeft.save_adapter(flagged, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    gpt2 = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        fastpeft.get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"]))
    assert gpt2.fastpeft_config["default"].fan_in_fan_out is True


def test_target_modules_rules_are_pefts():
    """"all-linear" in any case (PEFT lower-cases it; fastpeft refused "ALL-LINEAR"); a regex
    target_modules with layers_to_transform or layers_pattern, or a layers_pattern without
    indices, raises as in PEFT (fastpeft silently ignored the layer list)."""
    model = tiny_model("llama")
    fastpeft.get_peft_model(model, LoraConfig(r=2, target_modules="ALL-LINEAR"))
    assert len(fastpeft.methods.lora_layers(model)) == 14
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="`layers_pattern` cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=r".*q_proj", layers_pattern="layers")
    with pytest.raises(ValueError, match="`layers_to_transform` must also be"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    diff = tiny_model("llama")
    fastpeft.get_peft_model(diff, fastpeft.DiffPruningConfig(target_modules="All-Linear"))


BAD_CONFIG_FIELDS = {"lora_alpha": "eight", "r": 0, "lora_dropout": float("nan"), "use_rslora": "yes",
                     "target_modules": [1, 2], "layers_to_transform": ["0"], "alpha_pattern": {"q_proj": None},
                     "modules_to_save": "lm_head"}


@pytest.mark.parametrize("field", list(BAD_CONFIG_FIELDS))
def test_a_refused_checkpoint_leaves_the_model_untouched(tmp_path, field):
    """Every field of the config is checked before the model changes, and every bad checkpoint is a
    CheckpointError (lora_alpha "eight" raised TypeError after q_proj.weight was frozen)."""
    trained = tiny_model("llama")
    fastpeft.get_peft_model(trained, LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.save_adapter(trained, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = BAD_CONFIG_FIELDS[field]
    path.write_text(json.dumps(config))
    model = tiny_model("llama").train()
    before = {n: (p.requires_grad, p.clone()) for n, p in model.named_parameters()}
    structure = [type(m) for m in model.modules()]
    with pytest.raises(fastpeft.CheckpointError, match=field if field != "r" else "r must be"):
        fastpeft.load_adapter(model, tmp_path / "a")
    assert [type(m) for m in model.modules()] == structure and model.training
    assert all(p.requires_grad == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    pool = AdapterPool(tiny_model("llama"), max_adapters=2, max_rank=4)
    with pytest.raises(fastpeft.CheckpointError, match=field if field != "r" else "r must be"):
        pool.load("x", tmp_path / "a")
    assert pool.names() == []


def test_loading_from_a_file_path_says_to_pass_the_folder(tmp_path):
    trained = tiny_model("llama")
    fastpeft.get_peft_model(trained, LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.save_adapter(trained, tmp_path / "a")
    with pytest.raises(fastpeft.CheckpointError, match="is a file; pass the adapter's directory"):
        fastpeft.load_adapter(tiny_model("llama"), tmp_path / "a" / "adapter_config.json")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_non_finite_scaling_is_refused(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        fastpeft.nn.LoRALinear.from_linear(torch.nn.Linear(4, 4), r=2, lora_alpha=alpha)


def test_lora_on_a_layer_that_is_not_linear_is_refused_at_once():
    emb = torch.nn.Embedding(10, 4)
    with pytest.raises(TypeError, match="base layer Embedding is not a linear layer"):
        fastpeft.nn.LoRALinear(emb)
    assert emb.weight.requires_grad  # refused before anything was frozen


def test_pool_layers_refuse_bad_arguments_clearly():
    from fastpeft.nn import MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(16, 8), max_adapters=2, max_rank=4)
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(TypeError, match=r"slot must be an int in \[0, 2\), got True"):
        layer.set_adapter(True, a, b, 1.0)
    with pytest.raises(ValueError, match="scaling must be a finite number, got nan"):
        layer.set_adapter(0, a, b, float("nan"))
    with pytest.raises(ValueError, match=r"x must be \[..., in_features = 16\]; got \[3, 12\]"):
        layer(torch.randn(3, 12), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bad", ["segment past the tokens", "slot past the stack", "token index", "max_seg_len"])
def test_bad_sgmv_routing_is_refused_by_every_cpu_face(backend, bad):
    """The reference ignored what the C++ face refused; both refuse it now, before running."""
    T, S = 4, 2
    x, lora_a = torch.randn(T, 16), torch.randn(S, 3, 16)
    routing = dict(sorted_tokens=[0, 1, 2, 3], seg_starts=[0, 2], seg_lens=[2, 2], seg_adapters=[0, 1], max_seg_len=2)
    change, message = {"segment past the tokens": (("seg_lens", [2, 3]), "lies outside the 4 tokens"),
                       "slot past the stack": (("seg_adapters", [0, 2]), "names slot 2, outside"),
                       "token index": (("sorted_tokens", [0, 1, 2, 9]), "holds 9, which is not a token index"),
                       "max_seg_len": (("max_seg_len", 1), "more than max_seg_len = 1")}[bad]
    routing[change[0]] = change[1]
    args = [torch.tensor(routing[k], dtype=torch.int32) for k in ("sorted_tokens", "seg_starts", "seg_lens",
                                                                  "seg_adapters")]
    with fastpeft.use_backend(backend), pytest.raises(ValueError, match=message):
        fastpeft.ops.sgmv_shrink(x, lora_a, *args, routing["max_seg_len"])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, exchange):
    """save_adapter swaps the new folder in; when that fails the old checkpoint stays where it was
    (the second of two renames failing left no checkpoint and the old files in a hidden folder)."""
    import os

    from fastpeft import checkpoint

    model = tiny_model("llama")
    fastpeft.get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    fastpeft.save_adapter(model, tmp_path / "a")
    old = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    real_rename = os.rename

    def rename_failing_into_place(src, dst):  # the new folder cannot move in; undoing still works
        if ".saving-" in str(src):
            raise OSError("disk full")
        return real_rename(src, dst)

    def exchange_failing(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_exchange", exchange_failing if exchange else lambda a, b: False)
    monkeypatch.setattr(os, "rename", rename_failing_into_place)
    with pytest.raises(OSError, match="disk full"):
        fastpeft.save_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging or retired folder left behind
    fastpeft.save_adapter(model, tmp_path / "a")  # and a save that works replaces it
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def _seq_cls_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg).eval()


MODULES_TO_SAVE_CASES = {
    # (model, PEFT LoraConfig kwargs): each was refused or computed otherwise in one direction or both
    "suffix-norm": (lambda: tiny_model("llama"), dict(target_modules=["q_proj"], modules_to_save=["norm"])),
    "bias-all": (lambda: tiny_model("bert"), dict(target_modules=["query"], bias="all",
                                                  modules_to_save=["classifier"])),
    "all-linear": (lambda: tiny_model("bert"), dict(target_modules="all-linear", modules_to_save=["classifier"])),
    "seq-cls-bert": (lambda: tiny_model("bert"), dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "seq-cls-llama": (_seq_cls_llama, dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(MODULES_TO_SAVE_CASES))
def test_modules_to_save_and_task_heads_match_peft_both_ways(tmp_path, case):
    """modules_to_save by PEFT's rules (a name suffix: ["norm"] is every *norm; no adapter inside a
    module to save; bias="all" trains the copy's bias, not the original's), task_type's heads trained
    as PEFT trains them: the same trainable tensors, and each library's checkpoint loads in the other
    with the same logits."""
    peft = pytest.importorskip("peft")
    make, kwargs = MODULES_TO_SAVE_CASES[case]
    inputs = model_inputs("llama")
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs))
    with torch.no_grad():  # a trained-looking head, not the base's copy
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(**inputs).logits

    ours = make()
    fastpeft.load_adapter(ours, tmp_path / "peft", is_trainable=True)
    trainable = {n.replace("base_model.model.", "").replace(".default", "") for n, p in theirs.named_parameters()
                 if p.requires_grad}
    assert {n.replace(".default", "") for n, p in ours.named_parameters() if p.requires_grad} == trainable
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected)
    fastpeft.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, expected)

    fresh = make()  # and get_peft_model itself places what PEFT places
    fastpeft.get_peft_model(fresh, LoraConfig(r=2, lora_alpha=4, **kwargs))
    assert {n.replace(".default", "") for n, p in fresh.named_parameters() if p.requires_grad} == trainable


def test_a_qlora_models_counts_include_its_4bit_weights(capsys):
    """print_trainable_parameters counted a QLoRA model's 4-bit weights as nothing ("81.66 %
    trainable"); it counts them as PEFT counts bitsandbytes' (their number of weights)."""
    model = tiny_model("llama")
    full = sum(p.numel() for p in model.parameters())
    fastpeft.quantize_model(model)
    fastpeft.get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fastpeft.methods.count_parameters(model) == (trainable, full + trainable)
    fastpeft.print_trainable_parameters(model)
    assert f"all params: {full + trainable:,d}" in capsys.readouterr().out


PEFT_CONFIG_PAIRS = ["LoraConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig"]


@pytest.mark.parametrize("name", PEFT_CONFIG_PAIRS)
def test_every_peft_config_field_is_accepted(tmp_path, name):
    """A PEFT recipe passes every field of its config (a LoraConfig with use_dora=False raised
    TypeError: 25 of 42 fields were missing); each is accepted, and a feature fastpeft does not
    implement is refused by name when set."""
    import dataclasses

    peft = pytest.importorskip("peft")
    theirs, ours = getattr(peft, name), getattr(fastpeft, name)
    defaults = {f.name: getattr(theirs(), f.name) for f in dataclasses.fields(theirs)
                if f.init and f.name not in ("task_type", "runtime_config", "target_modules", "feedforward_modules",
                                             "exclude_modules")}
    defaults = {k: str(getattr(v, "value", v)) if k == "peft_type" else v for k, v in defaults.items()
                if k == "peft_type" or not type(v).__module__.startswith("peft.")}
    if "num_virtual_tokens" in defaults:  # PEFT's default is None: a value every recipe sets
        defaults["num_virtual_tokens"] = 4
    config = ours(**defaults)
    path = config.save_pretrained(str(tmp_path / "c"))
    saved = json.loads(open(path).read())
    assert set(saved) >= {k for k in theirs().to_dict() if k != "runtime_config"}  # PEFT's keys, all of them
    assert type(ours.from_pretrained(str(tmp_path / "c"))) is ours


@pytest.mark.parametrize("feature,value", [("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 1]]),
                                           ("loftq_config", {"loftq_bits": 4}), ("ensure_weight_tying", True)])
def test_an_unsupported_lora_feature_is_refused_by_name(feature, value):
    with pytest.raises(ValueError, match=f"{feature}=.* is a PEFT feature fastpeft does not support"):
        LoraConfig(**{feature: value})


def test_a_peft_config_object_is_taken_as_is(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    fastpeft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules={"q_proj", "v_proj"},
                                                   use_dora=False))
    config = model.fastpeft_config["default"]
    assert isinstance(config, LoraConfig) and config.target_modules == ["q_proj", "v_proj"] and config.r == 4
    ia3 = tiny_model("llama")
    fastpeft.get_peft_model(ia3, peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert isinstance(ia3.fastpeft_config["default"], fastpeft.IA3Config)
    fastpeft.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["inference_mode"] is True and saved["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"


def test_review_edge_cases_of_peft_parity(tmp_path):
    """peft.TaskType values work like their strings (str() of the enum gave "TaskType.SEQ_CLS": no
    heads trained, and fastpeft's own checkpoint refused); a modules_to_save suffix naming a target
    is refused as PEFT refuses it (q_proj silently lost its adapter); a checkpoint folder reached
    through a link is saved into."""
    import os

    peft = pytest.importorskip("peft")
    model = tiny_model("bert")
    fastpeft.get_peft_model(model, LoraConfig(r=2, target_modules=["query"], task_type=peft.TaskType.SEQ_CLS))
    assert isinstance(model.classifier, fastpeft.nn.ModulesToSaveWrapper)
    fastpeft.save_adapter(model, tmp_path / "a")
    fastpeft.load_adapter(tiny_model("bert"), tmp_path / "a")
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="modules_to_save names .*q_proj.*a target of target_modules"):
        fastpeft.get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["proj"]))
    assert not fastpeft.methods.lora_layers(llama)
    os.symlink(tmp_path / "a", tmp_path / "link")
    fastpeft.save_adapter(model, tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "link"]


def test_save_swaps_the_folder_in_with_one_exchange_on_linux(tmp_path):
    import sys

    from fastpeft import checkpoint

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "f").write_text("x")
    assert checkpoint._exchange(str(tmp_path / "x"), str(tmp_path / "y"))
    assert (tmp_path / "y" / "f").read_text() == "x" and not (tmp_path / "x" / "f").exists()
