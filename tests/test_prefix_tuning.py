"""Prefix tuning: what trains, learning, grouped-query attention, folding the projection, generate(),
cache continuation, checkpoints both ways with PEFT, bad configs."""

import json

import pytest
import torch

import fastpeft
from fastpeft.methods.prefix_tuning import PrefixEncoder, fold_prefix_projection
from fastpeft.methods.prompt_tuning import ENCODER_ATTRIBUTE

from conftest import assert_close
from models import VOCAB, tiny_model
from test_prompt_tuning import (assert_generate_is_greedy, assert_untouched, no_eos, randomise_, sharp_model,
                                subset_task, train_with_base_frozen, user_inputs)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

KINDS = ["llama", "gpt2"]
N_VIRTUAL = 3
PROJECTIONS = [False, True]


def config(projection=False, **kw):
    return fastpeft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, prefix_projection=projection,
                                       encoder_hidden_size=12 if projection else None, **kw)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_the_prefix_trains_and_the_loss_falls(kind, projection):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(sharp_model(kind), config(projection))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{ENCODER_ATTRIBUTE}.embedding.weight"}
    if projection:
        expected |= {f"{ENCODER_ATTRIBUTE}.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert trainable == expected
    losses = train_with_base_frozen(model, subset_task(), lr=0.01 if projection else 0.1)
    assert losses[-1] < 0.85 * losses[0], losses


def test_prefix_from_real_tokens_equals_prepending_them_grouped_query_attention():
    """An independent reference: a prefix made of the keys/values the base model computes for real
    tokens t must give the base model's output on [t, user tokens] (user positions only). The tiny
    Llama has 4 query heads sharing 2 key/value heads."""
    base = tiny_model("llama")
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    lead = torch.randint(0, VOCAB, (1, N_VIRTUAL), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = base(lead, use_cache=True).cache
        rows = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # each [1, kv_heads, k, head_dim]
        table = torch.cat([t[0].permute(1, 0, 2).reshape(N_VIRTUAL, -1) for t in rows], dim=1)
    model = fastpeft.get_peft_model(tiny_model("llama"), config())
    resolved = model.fastpeft_config["default"]
    assert (resolved.token_dim, resolved.num_attention_heads) == (2 * 8, 2)  # key/value heads x head_dim
    with torch.no_grad():
        model.fastpeft_prompt_encoder.embedding.weight.copy_(table)
        ids, mask = user_inputs(batch=2, seq=5)
        expected = base(torch.cat([lead.expand(2, -1), ids], dim=1)).logits[:, N_VIRTUAL:]
        assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)
        assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_reads_what_fastpeft_writes(kind, projection, tmp_path):
    torch.manual_seed(2)
    ours = fastpeft.get_peft_model(tiny_model(kind), config(projection))
    fastpeft.save_adapter(ours, str(tmp_path / "pre"))
    saved = json.loads((tmp_path / "pre" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_layers"] == 2
    assert (saved["token_dim"], saved["num_attention_heads"]) == ((16, 2) if kind == "llama" else (32, 4))
    ref = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "pre"))
    ids, mask = user_inputs(pad_first=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask, labels=labels)
        y_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert y.logits.shape == (*ids.shape, VOCAB)
    assert_close(y.logits, y_ref.logits)
    assert_close(y.loss, y_ref.loss)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_fastpeft_loads_what_peft_writes(kind, projection, tmp_path):
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_model(kind), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=projection, encoder_hidden_size=12))
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "peft"))
    assert not ours.fastpeft_prompt_encoder.projected  # checkpoints hold the folded table
    ids, mask = user_inputs()
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_equals_peft(dtype, tmp_path):
    torch.manual_seed(4)
    ours = fastpeft.get_peft_model(tiny_model("llama").to(dtype), config())
    fastpeft.save_adapter(ours, str(tmp_path / "pre"))
    ref = peft.PeftModel.from_pretrained(tiny_model("llama").to(dtype), str(tmp_path / "pre"))
    ids, mask = user_inputs()
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask).logits
        assert y.dtype == dtype
        assert_close(y, ref(input_ids=ids, attention_mask=mask).logits, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_folding_the_projection_keeps_outputs_and_checkpoint(kind, tmp_path):
    torch.manual_seed(5)
    model = fastpeft.get_peft_model(tiny_model(kind), config(projection=True))
    randomise_(model.fastpeft_prompt_encoder)
    ids, mask = user_inputs(pad_first=1)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    fastpeft.save_adapter(model, str(tmp_path / "projected"))
    fold_prefix_projection(model)
    encoder = model.fastpeft_prompt_encoder
    assert not encoder.projected and encoder.transform is None
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert encoder.embedding.weight.shape == (N_VIRTUAL, 2 * 2 * model.fastpeft_config["default"].token_dim)
    with torch.no_grad():
        assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    fastpeft.save_adapter(model, str(tmp_path / "folded"))
    loaded = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "projected"))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    torch.manual_seed(6)
    model = fastpeft.get_peft_model(tiny_model(kind), config())
    fastpeft.save_adapter(model, str(tmp_path / "pre"))
    loaded = fastpeft.load_adapter(tiny_model(kind), str(tmp_path / "pre"), is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [f"{ENCODER_ATTRIBUTE}.embedding.weight"]
    ids, mask = user_inputs(pad_first=1)
    with torch.no_grad():
        y = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, y)
        assert not torch.allclose(tiny_model(kind)(input_ids=ids, attention_mask=mask).logits, y)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_a_manual_greedy_loop(kind):
    torch.manual_seed(7)
    model = no_eos(fastpeft.get_peft_model(tiny_model(kind), config()))
    ids, mask = user_inputs(batch=2, seq=5)
    out = assert_generate_is_greedy(model, ids, mask, 6)
    base = no_eos(tiny_model(kind)).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                             pad_token_id=0)
    assert not torch.equal(out, base)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_the_model_filled_continues_the_sequence(kind):
    """Callers pass masks over their own tokens; the cache already holds the prefix."""
    torch.manual_seed(8)
    model = fastpeft.get_peft_model(tiny_model(kind), config())
    ids, mask = user_inputs(batch=2, seq=6, pad_first=2)
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert first.cache.get_seq_length() == N_VIRTUAL + 4
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, cache=first.cache)
        whole = model(input_ids=ids, attention_mask=mask).logits
    assert_close(rest.logits, whole[:, 4:])


@pytest.mark.parametrize("kw, pattern", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
    (dict(), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=2, init_weights="ones"), "init_weights must be None or 'zero'"),
    (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size must be an integer >= 1"),
])
def test_bad_configs_are_refused(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastpeft.PrefixTuningConfig(**kw)


def test_geometry_that_does_not_fit_the_model_changes_nothing():
    model = tiny_model("llama")
    # the hidden size is not the key/value width under grouped-query attention
    with pytest.raises(ValueError, match="token_dim=32 does not fit this model .token_dim should be 16"):
        fastpeft.get_peft_model(model, fastpeft.PrefixTuningConfig(num_virtual_tokens=2, token_dim=32))
    assert_untouched(model)


def test_zero_init_starts_from_zero_keys_and_values():
    model = fastpeft.get_peft_model(tiny_model("llama"), config(projection=True, init_weights="zero"))
    assert isinstance(model.fastpeft_prompt_encoder, PrefixEncoder)
    assert torch.count_nonzero(model.fastpeft_prompt_encoder.table()) == 0
