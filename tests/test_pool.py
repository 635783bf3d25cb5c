"""AdapterPool: PEFT checkpoints in slots, mixed batches through a whole model, thread safety."""

import threading

import pytest
import torch

import fastpeft
from fastpeft.checkpoint import CheckpointError

from conftest import assert_close
from models import model_inputs, tiny_model

peft = pytest.importorskip("peft")

ADAPTERS = {"a": dict(r=2, lora_alpha=4), "b": dict(r=8, lora_alpha=8, use_rslora=True), "c": dict(r=4, lora_alpha=16)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three LoRA adapters of a tiny Llama with different ranks and targets, written by peft."""
    root = tmp_path_factory.mktemp("adapters")
    targets = {"a": ["q_proj", "v_proj"], "b": "all-linear", "c": ["o_proj", "down_proj"]}
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        m = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=targets[name],
                                                                     init_lora_weights=False, **kw))
        m.save_pretrained(root / name)
    return root


def peft_alone(checkpoints, name, ids):
    model = peft.PeftModel.from_pretrained(tiny_model("llama"), str(checkpoints / name))
    return model(input_ids=ids).logits


def test_mixed_batch_equals_each_request_alone_through_peft(checkpoints):
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=4, max_rank=8)
    for name in ADAPTERS:
        pool.load(name, str(checkpoints / name))
    assert pool.names() == ["a", "b", "c"]
    ids = model_inputs("llama", batch=5, seq=6)["input_ids"]
    names = ["c", None, "a", "b", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = tiny_model("llama")(input_ids=ids[row:row + 1]).logits if name is None else \
                peft_alone(checkpoints, name, ids[row:row + 1])
            assert_close(mixed[row:row + 1], alone, msg=f"row {row} ({name})")
        by_ids = model(input_ids=ids, adapter_ids=torch.tensor([pool.slot_of(n) if n else -1 for n in names])).logits
    assert_close(by_ids, mixed)


def test_pool_errors_leave_it_unchanged(checkpoints, tmp_path):
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=2, max_rank=4)
    with pytest.raises(CheckpointError, match="checkpoint rank 8 .* exceeds the pool's max_rank 4"):
        pool.load("b", str(checkpoints / "b"))
    assert pool.names() == []
    pool.load("a", str(checkpoints / "a"))
    pool.load("c", str(checkpoints / "c"))
    with pytest.raises(RuntimeError, match=r"the adapter pool is full \(2 adapters\)"):
        pool.load("a2", str(checkpoints / "a"))
    pool.unload("c")
    with pytest.raises(ValueError, match="an adapter named 'a' is already loaded"):
        pool.load("a", str(checkpoints / "a"))
    ids = model_inputs("llama", batch=2)["input_ids"]
    with pytest.raises(KeyError, match="no adapter named 'zzz' in the pool"):
        model(input_ids=ids, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="adapter_names has 1 entries for a batch of 2 sequences"):
        model(input_ids=ids, adapter_names=["a"])
    with pytest.raises(ValueError, match="points at an empty slot"):
        model(input_ids=ids, adapter_ids=torch.tensor([0, 1]))  # c was unloaded from slot 1
    # after the refusals the pool still serves
    out = model(input_ids=ids, adapter_names=["a", None]).logits
    assert_close(out[:1], peft_alone(checkpoints, "a", ids[:1]))


def test_load_and_unload_while_other_threads_run_forward(checkpoints):
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load("a", str(checkpoints / "a"))
    ids = model_inputs("llama", batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=["a", None]).logits
    pool.load("b", str(checkpoints / "b"))
    with torch.no_grad():
        expected_b = model(input_ids=ids, adapter_names=["b", None]).logits
    pool.unload("b")
    errors, done, served_b = [], threading.Event(), []

    def serve_b():
        """Requests for "b" while it comes and goes: refused by name, or served whole, never half."""
        try:
            with torch.no_grad():
                while not done.is_set():
                    try:
                        out = model(input_ids=ids, adapter_names=["b", None]).logits
                    except KeyError:
                        continue
                    assert_close(out, expected_b)
                    served_b.append(1)
        except BaseException as e:
            errors.append(e)

    def serve():
        try:
            with torch.no_grad():
                while not done.is_set():
                    assert_close(model(input_ids=ids, adapter_names=["a", None]).logits, expected)
        except BaseException as e:  # reported below
            errors.append(e)

    def churn():
        try:
            for _ in range(15):
                pool.load("b", str(checkpoints / "b"))
                with torch.no_grad():
                    model(input_ids=ids, adapter_names=["b", "a"])
                pool.unload("b")
        except BaseException as e:
            errors.append(e)

    servers = [threading.Thread(target=serve), threading.Thread(target=serve_b)]
    churner = threading.Thread(target=churn)
    for t in servers + [churner]:
        t.start()
    churner.join(timeout=240)
    done.set()
    for t in servers:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert pool.names() == ["a"] and served_b  # "b" was really served while loading and unloading went on


def test_ia3_and_lora_adapters_in_one_mixed_batch(checkpoints, tmp_path):
    torch.manual_seed(7)
    ia3 = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    with torch.no_grad():
        for n, p in ia3.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)  # not the identity
    ia3.save_pretrained(tmp_path / "ia3")
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load("ia3", str(tmp_path / "ia3"))
    pool.load("a", str(checkpoints / "a"))
    ids = model_inputs("llama", batch=3, seq=5)["input_ids"]
    names = ["ia3", "a", None]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone_ia3 = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ia3"))(input_ids=ids[:1]).logits
        assert_close(mixed[:1], alone_ia3)
        assert_close(mixed[1:2], peft_alone(checkpoints, "a", ids[1:2]))
        assert_close(mixed[2:], tiny_model("llama")(input_ids=ids[2:]).logits)
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        generated = model.generate(ids, adapter_names=names, **settings)
        ia3_alone = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ia3"))
        assert torch.equal(generated[0], ia3_alone.generate(ids[:1], **settings)[0])
    pool.unload("ia3")
    with torch.no_grad():
        assert_close(model(input_ids=ids, adapter_names=[None, "a", None]).logits[2:], mixed[2:])


def test_a_pool_routes_layers_that_see_one_token_per_sequence(tmp_path):
    """BERT's pooler reads one token of each sequence: with the default "all-linear" every call failed
    ("routes 18 tokens but x has 3"); the pool routes such a layer by sequence."""
    import transformers as tf

    torch.manual_seed(3)
    trained = tiny_model("bert")
    fastpeft.get_peft_model(trained, fastpeft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    fastpeft.save_adapter(trained, tmp_path / "a")
    model = tiny_model("bert")
    pool = fastpeft.AdapterPool(model, max_adapters=2, max_rank=4)
    assert isinstance(model.bert.pooler.dense, fastpeft.nn.MultiLoRALinear)
    pool.load("a", str(tmp_path / "a"))
    ids = model_inputs("bert", batch=3, seq=6)["input_ids"]
    names = ["a", None, "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        base = tiny_model("bert")(input_ids=ids).logits
        alone = trained(input_ids=ids).logits
    assert isinstance(model, tf.BertForSequenceClassification)
    for row in (0, 2):
        assert_close(mixed[row], alone[row], msg=f"row {row}")
    assert_close(mixed[1], base[1])


def test_loading_and_unloading_between_forward_and_backward(checkpoints):
    """A training step's backward is not disturbed by a load into a free slot (it failed: "modified
    by an inplace operation"), and unloading a slot the step uses waits for its backward."""
    def step(model, names, ids):
        lora = [p for p in model.parameters() if p.requires_grad]
        for p in lora:
            p.grad = None
        return model(input_ids=ids, adapter_names=names).logits.square().mean(), lora

    ids = model_inputs("llama", batch=2, seq=5)["input_ids"]
    reference = tiny_model("llama")
    ref_pool = fastpeft.AdapterPool(reference, max_adapters=3, max_rank=8)
    ref_pool.load("a", str(checkpoints / "a"))
    for layer in ref_pool.layers.values():
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
    loss, params = step(reference, ["a", "a"], ids)
    loss.backward()
    expected = [p.grad.clone() for p in params]

    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load("a", str(checkpoints / "a"))
    for layer in pool.layers.values():
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
    loss, params = step(model, ["a", "a"], ids)
    pool.load("c", str(checkpoints / "c"))  # a free slot, between forward and backward
    unloading = threading.Thread(target=pool.unload, args=("a",))
    unloading.start()
    unloading.join(timeout=0.5)
    assert unloading.is_alive()  # slot "a" is held by the graph until its backward ran
    loss.backward()  # the lease goes with the backward: the loss can stay
    unloading.join(timeout=10)
    assert not unloading.is_alive() and pool.names() == ["c"]
    for got, want in zip(params, expected):
        assert_close(got.grad, want)


def test_writing_a_used_slot_between_forward_and_backward_is_refused():
    """Outside a pool a write into the layer may change what a pending backward computes: autograd
    refuses that backward (the pool writes only slots no graph uses, and keeps backward intact)."""
    from fastpeft.nn import MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(16, 8), max_adapters=2, max_rank=2)
    layer.set_adapter(0, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    layer.lora_a.requires_grad_(True)
    out = layer(torch.randn(3, 16), torch.zeros(3, dtype=torch.long))
    layer.set_adapter(0, torch.randn(2, 16), torch.randn(8, 2), 2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_training_loop_can_unload_after_its_step(checkpoints):
    """After backward the step's lease is gone, even with the loss still alive (a training loop
    keeps it for logging): unload returns at once. Before backward, unloading the slot from the
    thread that holds it is refused rather than waiting forever."""
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("a", str(checkpoints / "a"))
    pool.load("c", str(checkpoints / "c"))
    for layer in pool.layers.values():
        layer.lora_a.requires_grad_(True)
    ids = model_inputs("llama", batch=2, seq=5)["input_ids"]
    loss = model(input_ids=ids, adapter_names=["a", "c"]).logits.square().mean()
    with pytest.raises(RuntimeError, match=r"unload\('a'\): a forward pass of this thread still holds it"):
        pool.unload("a")
    assert pool.names() == ["a", "c"]
    loss.backward()
    pool.unload("a")  # loss is still alive
    assert pool.names() == ["c"] and loss.item() > 0


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_mixed_adapters_equals_each_request_alone(checkpoints, beams):
    """model.generate(ids, adapter_names=[...]) on a pool model, as PEFT's generate takes it (it
    raised "model_kwargs are not used by the model: ['adapter_names']"): KV cache, a batch of
    requests, beams expanding each, every row as its adapter generates it alone."""
    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=3, max_rank=8)
    for name in ("a", "c"):
        pool.load(name, str(checkpoints / name))
    prompts = model_inputs("llama", batch=3, seq=4)["input_ids"]
    names = ["a", None, "c"]
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=beams, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(prompts, adapter_names=names, **settings)
        for row, name in enumerate(names):
            alone = tiny_model("llama") if name is None else \
                peft.PeftModel.from_pretrained(tiny_model("llama"), str(checkpoints / name))
            assert torch.equal(mixed[row], alone.generate(prompts[row:row + 1], **settings)[0]), (row, name)
        plain = model.generate(prompts, **settings)  # no names: the base model
        assert torch.equal(plain, tiny_model("llama").generate(prompts, **settings))
    assert pool.names() == ["a", "c"]
    pool.unload("a")  # nothing holds the slots after generate


def test_generate_builds_each_routing_once_and_holds_its_slots(checkpoints, monkeypatch):
    """Inside one generate, the prompt's forward and the first decode step build the routing; every
    later decode step reuses it (no build, no new lease). Each generation routes by its own
    adapters, row for row as each adapter generates alone; an unload on the generating thread is
    refused as before, and nothing holds a slot afterwards."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from fastpeft.ops.adapter_batch import AdapterBatch

    model = tiny_model("llama")
    pool = fastpeft.AdapterPool(model, max_adapters=3, max_rank=8)
    for name in ("a", "b", "c"):
        pool.load(name, str(checkpoints / name))
    builds, forwards = [], []
    build = AdapterBatch.build.__func__
    monkeypatch.setattr(AdapterBatch, "build", classmethod(lambda cls, ids, *a, **kw: builds.append(ids.numel()) or
                                                            build(cls, ids, *a, **kw)))
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    prompts = model_inputs("llama", batch=3, seq=4)["input_ids"]
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    for names in (["a", None, "c"], ["c", "b", "b"]):
        builds.clear(), forwards.clear()
        with torch.no_grad():
            mixed = model.generate(prompts, adapter_names=names, **settings)
        assert len(forwards) == 6 and builds == [3, 3], (forwards, builds)  # prompt (3 x 4 rows), decode (3 x 1)
        with torch.no_grad():
            for row, name in enumerate(names):
                alone = tiny_model("llama") if name is None else \
                    peft.PeftModel.from_pretrained(tiny_model("llama"), str(checkpoints / name))
                assert torch.equal(mixed[row], alone.generate(prompts[row:row + 1], **settings)[0]), (names, row)
        assert pool._in_flight == [0, 0, 0]

    class UnloadMidway(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompts.shape[1] + 2:
                pool.unload("a")
            return scores

    with torch.no_grad(), pytest.raises(RuntimeError, match=r"unload\('a'\): a forward pass of this thread"):
        model.generate(prompts, adapter_names=["a", "b", None], logits_processor=LogitsProcessorList([UnloadMidway()]),
                       **settings)
    assert pool.names() == ["a", "b", "c"] and pool._in_flight == [0, 0, 0]
    pool.unload("a")
    assert pool.names() == ["b", "c"]
