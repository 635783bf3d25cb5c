"""Prompt tuning: what trains, learning, generate(), init schemes, checkpoints both ways with PEFT, bad configs."""

import json

import pytest
import torch

import fastpeft
from fastpeft.methods.prompt_tuning import ENCODER_ATTRIBUTE

from conftest import assert_close
from models import VOCAB, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

KINDS = ["llama", "gpt2"]
N_VIRTUAL = 4


def sharp_model(kind):
    """A tiny model whose (untied) output layer is 10x larger, so a small adapter can move the loss far."""
    model = tiny_model(kind)
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach() * 10)
    return model


def subset_task(batch=8, seq=10, seed=0):
    """Sequences over 8 of the 64 tokens: a model that learns to favour them lowers its loss."""
    return torch.randint(0, 8, (batch, seq), generator=torch.Generator().manual_seed(seed))


def user_inputs(batch=3, seq=6, seed=1, pad_first=0):
    """input_ids and an attention_mask, the first row left-padded by `pad_first` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad_first] = 0
    return ids, mask


def randomise_(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def greedy(model, ids, steps):
    """Greedy decoding by full recomputation, no cache: (tokens, the logits of each step [batch, vocab])."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(ids).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def assert_generate_is_greedy(model, ids, mask, steps):
    """generate() (cached decoding, generate's own position ids) gives the manual loop's tokens and logits."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    tokens, logits = greedy(model, ids, steps)
    assert torch.equal(out.sequences, tokens)
    for step, (got, expected) in enumerate(zip(out.logits, logits)):
        assert_close(got, expected, msg=f"step {step}")
    return out.sequences


def no_eos(model):
    model.generation_config.eos_token_id = None  # decode the full length (the tiny models' eos is a real token)
    return model


def train_with_base_frozen(model, x, lr: float, steps: int = 40) -> list[float]:
    """Adam on the trainable tensors over the fixed batch x (positional input_ids, labels as long
    as the user's input); asserts every frozen tensor kept its values; returns the losses."""
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"{n} changed"
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_prompt_trains_and_the_loss_falls(kind):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(sharp_model(kind), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{ENCODER_ATTRIBUTE}.embedding.weight"}
    prompt_before = model.fastpeft_prompt_encoder.embedding.weight.detach().clone()
    losses = train_with_base_frozen(model, subset_task(), lr=0.3)
    assert losses[-1] < 0.95 * losses[0], losses
    assert not torch.equal(model.fastpeft_prompt_encoder.embedding.weight, prompt_before)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_cover_the_users_tokens_and_equal_peft(kind, tmp_path):
    """fastpeft writes, PEFT reads: same logits on the user's tokens, same loss (PEFT's output has the
    virtual positions in front, which fastpeft drops by design)."""
    torch.manual_seed(2)
    ours = fastpeft.get_peft_model(tiny_model(kind), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    fastpeft.save_adapter(ours, str(tmp_path / "pt"))
    saved = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["task_type"] == "CAUSAL_LM"
    assert saved["token_dim"] == 32 and saved["num_virtual_tokens"] == N_VIRTUAL
    ref = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "pt"))
    ids, mask = user_inputs(pad_first=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask, labels=labels)
        y_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert y.logits.shape == (*ids.shape, VOCAB)
    assert_close(y.logits, y_ref.logits[:, N_VIRTUAL:])
    assert_close(y.loss, y_ref.loss)


def test_a_sequence_classifier_takes_its_labels_as_they_are():
    """A BERT classifier's labels are one per sequence: they are not padded like per-token labels
    (that crashed), and logits and loss equal PEFT's SEQ_CLS prompt tuning with the same prompt."""
    torch.manual_seed(2)
    ours = fastpeft.get_peft_model(tiny_model("bert"), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    ref = peft.get_peft_model(tiny_model("bert"), peft.PromptTuningConfig(task_type="SEQ_CLS",
                                                                          num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(getattr(ours, ENCODER_ATTRIBUTE).embedding.weight)
    ids, mask = user_inputs(pad_first=2)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask, labels=labels)
        y_ref = ref.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert y.logits.shape == (3, 3)
    assert_close(y.logits, y_ref.logits)
    assert_close(y.loss, y_ref.loss)


def test_a_classifiers_prompt_is_saved_for_its_task(tmp_path):
    """A prompt trained on a BERT classifier records task_type SEQ_CLS: PEFT's loaders need it to put
    the prompt in front (with task_type null PEFT ran the model without the prompt)."""
    ours = fastpeft.get_peft_model(tiny_model("bert"), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    fastpeft.save_adapter(ours, str(tmp_path / "pt"))
    assert json.loads((tmp_path / "pt" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    prefix = fastpeft.get_peft_model(tiny_model("bert"), fastpeft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL))
    assert prefix.fastpeft_config["default"].task_type == "SEQ_CLS"
    assert fastpeft.get_peft_model(tiny_model("llama"), fastpeft.PromptTuningConfig(
        num_virtual_tokens=N_VIRTUAL)).fastpeft_config["default"].task_type == "CAUSAL_LM"


@pytest.mark.parametrize("kind", KINDS)
def test_fastpeft_loads_what_peft_writes(kind, tmp_path):
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_model(kind), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="SAMPLE_VOCAB"))
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"))
    assert isinstance(ours.fastpeft_config["default"], fastpeft.PromptTuningConfig)
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False, as in PEFT
    ids, mask = user_inputs()
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                     ref(input_ids=ids, attention_mask=mask).logits[:, N_VIRTUAL:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_equals_peft(dtype, tmp_path):
    torch.manual_seed(4)
    ours = fastpeft.get_peft_model(tiny_model("llama").to(dtype), fastpeft.PromptTuningConfig(num_virtual_tokens=3))
    fastpeft.save_adapter(ours, str(tmp_path / "pt"))
    ref = peft.PeftModel.from_pretrained(tiny_model("llama").to(dtype), str(tmp_path / "pt"))
    ids, mask = user_inputs()
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask).logits
        assert y.dtype == dtype
        assert_close(y, ref(input_ids=ids, attention_mask=mask).logits[:, 3:], dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    torch.manual_seed(5)
    model = fastpeft.get_peft_model(tiny_model(kind), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    randomise_(model.fastpeft_prompt_encoder)
    fastpeft.save_adapter(model, str(tmp_path / "pt"))
    loaded = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "pt"), is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [f"{ENCODER_ATTRIBUTE}.embedding.weight"]
    ids, mask = user_inputs(pad_first=1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
        fresh = tiny_model(kind)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(fresh, model(input_ids=ids, attention_mask=mask).logits)  # the prompt matters


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_a_manual_greedy_loop(kind):
    torch.manual_seed(6)
    model = no_eos(fastpeft.get_peft_model(tiny_model(kind), fastpeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL)))
    ids, mask = user_inputs(batch=2, seq=5)
    out = assert_generate_is_greedy(model, ids, mask, 6)
    base = no_eos(tiny_model(kind)).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                             pad_token_id=0)
    assert not torch.equal(out, base)  # the prompt is really in the generation


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    torch.manual_seed(7)
    model = tiny_model("llama")
    vocabulary = model.get_input_embeddings().weight.detach().clone()
    fastpeft.get_peft_model(model, fastpeft.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    prompt = model.fastpeft_prompt_encoder.embedding.weight
    assert prompt.dtype == torch.float32
    for row in prompt:
        assert (vocabulary == row).all(dim=1).any()


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 64-token vocabulary, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"[UNK]": 0})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("n_virtual", [2, 7])  # text cut to k tokens, and repeated to fill k
def test_text_init_from_a_tokenizer_object_or_a_path(n_virtual, tmp_path):
    tokenizer = tiny_tokenizer()
    text = "w5 w17 w42"
    model = tiny_model("llama")
    expected_ids = ([5, 17, 42] * 3)[:n_virtual]
    expected = model.get_input_embeddings().weight[expected_ids].detach()
    fastpeft.get_peft_model(model, fastpeft.PromptTuningConfig(
        num_virtual_tokens=n_virtual, prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer=tokenizer))
    assert torch.equal(model.fastpeft_prompt_encoder.embedding.weight, expected)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    by_path = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.PromptTuningConfig(
        num_virtual_tokens=n_virtual, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok")))
    assert torch.equal(by_path.fastpeft_prompt_encoder.embedding.weight, expected)
    ref = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n_virtual, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok")))
    assert torch.equal(ref.prompt_encoder["default"].embedding.weight, expected)  # PEFT's TEXT init agrees
    # A prompt initialised through a tokenizer object (no path to record) still gives a config PEFT reads.
    fastpeft.save_adapter(model, str(tmp_path / "pt"))
    peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "pt"))


def test_a_refused_call_leaves_the_model_usable():
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    ids, mask = user_inputs()
    with pytest.raises(ValueError, match="takes a 2-D attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, VOCAB)


def assert_untouched(model):
    """The model as it was before a refused virtual-token method: no encoder, no hooks, nothing frozen."""
    assert not hasattr(model, ENCODER_ATTRIBUTE) and not hasattr(model, "fastpeft_config")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw, pattern", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=-3), "num_virtual_tokens must be an integer >= 1"),
    (dict(), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=2.5), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=4, prompt_tuning_init="VOCAB"), "prompt_tuning_init must be one of"),
    (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"),
     "needs prompt_tuning_init_text"),
    (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="w1"), "needs a tokenizer"),
    (dict(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True}), "tokenizer_kwargs only apply"),
    (dict(num_virtual_tokens=4, num_transformer_submodules=2), "decoder-only"),
])
def test_bad_configs_are_refused(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastpeft.PromptTuningConfig(**kw)


@pytest.mark.parametrize("kw, pattern", [
    (dict(token_dim=48), "token_dim=48 does not fit this model"),
    (dict(num_layers=5), "num_layers=5 does not fit this model"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="zzz", tokenizer=lambda text: {"input_ids": [3, 99]}),
     "outside the model's vocabulary"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=" ", tokenizer=lambda text: {"input_ids": []}),
     "tokenises to no tokens"),
])
def test_configs_that_do_not_fit_the_model_change_nothing(kw, pattern):
    model = tiny_model("llama")
    model.requires_grad_(True)
    with pytest.raises(ValueError, match=pattern):
        fastpeft.get_peft_model(model, fastpeft.PromptTuningConfig(num_virtual_tokens=4, **kw))
    assert_untouched(model)


def test_encoder_decoder_models_are_refused():
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(TypeError, match="encoder-decoder models are not supported"):
        fastpeft.get_peft_model(model, fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    assert_untouched(model)

