"""fastpeft.icl: label-word scoring with a verbalizer template, few-shot prompts, left truncation."""

import pytest
import torch

from fastpeft import icl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


TEMPLATE = "Review: {text}\nOn a 1 to 4 star scale, the reviewer would give {label}"
LABELS = ["1", "2", "3", "4"]
RATING = [["awful", "vile"], ["bland", "slow"], ["decent", "fine"], ["superb", "great"]]
NEUTRAL = ["food", "service", "table", "staff", "menu", "price", "wine", "soup"]


def tiny_tokenizer(extra_words=()):
    """A word-level tokenizer built in memory: the template's words, the reviews' words, BOS and pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = ["<pad>", "<s>", "<unk>"] + [w for w, _ in split.pre_tokenize_str(TEMPLATE)]
    words += [w for group in RATING for w in group] + NEUTRAL + LABELS + ["very", "much"] + list(extra_words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 128):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=max_positions)).eval()


def reviews(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(4, (1,), generator=g))
        words = [NEUTRAL[int(i)] for i in torch.randint(len(NEUTRAL), (3,), generator=g)]
        words.insert(int(torch.randint(4, (1,), generator=g)), RATING[label][int(torch.randint(2, (1,), generator=g))])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_probabilities_sum_to_one_and_batching_changes_nothing():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    texts, _ = reviews(7, seed=1)
    probs = icl.label_probabilities(model, tok, texts, TEMPLATE, LABELS, batch_size=3)
    assert probs.shape == (7, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))
    torch.testing.assert_close(icl.label_probabilities(model, tok, texts, TEMPLATE, LABELS, batch_size=28), probs)
    one_by_one = torch.cat([icl.label_probabilities(model, tok, [t], TEMPLATE, LABELS, batch_size=1) for t in texts])
    torch.testing.assert_close(one_by_one, probs)
    assert not model.training


def test_scores_are_summed_label_token_log_probs():
    """Checked against one forward pass over each full sequence, multi-token label words included."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    words = ["4", "very much 1"]  # one token, and three
    text = "food awful wine"
    shots = [("price superb soup", "4")]
    scores = icl.label_log_likelihoods(model, tok, [text], TEMPLATE, words, examples=shots)
    shot = TEMPLATE.replace("{text}", shots[0][0]).replace("{label}", "4") + "\n\n"
    for j, word in enumerate(words):
        prompt = [tok.bos_token_id] + tok(shot + TEMPLATE.replace("{text}", text).replace("{label}", ""),
                                          add_special_tokens=False)["input_ids"]
        label = tok(word, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + label])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        expected = sum(logprobs[len(prompt) - 1 + k, t] for k, t in enumerate(label))
        torch.testing.assert_close(scores[0, j], expected)
    # a few-shot example's label may be given by index
    by_index = icl.label_log_likelihoods(model, tok, [text], TEMPLATE, words, examples=[(shots[0][0], 0)])
    torch.testing.assert_close(by_index, scores)


def test_long_prompts_are_truncated_from_the_left_with_a_warning():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    texts, labels = reviews(3, seed=2)
    shots = list(zip(*reviews(4, seed=5)))
    full = icl.label_log_likelihoods(model, tok, texts, TEMPLATE, LABELS, examples=shots)
    with pytest.warns(UserWarning, match=r"3 of 3 prompts were longer than max_length=40 tokens and were truncated "
                                         "from the left"):
        cut = icl.label_log_likelihoods(model, tok, texts, TEMPLATE, LABELS, examples=shots, max_length=40)
    assert not torch.allclose(cut, full)
    # the same as scoring the last 38 prompt tokens (BOS kept, the label word's token after them)
    prompt = tok("".join(TEMPLATE.replace("{text}", t).replace("{label}", LABELS[y]) + "\n\n" for t, y in shots) +
                 TEMPLATE.replace("{text}", texts[0]).replace("{label}", ""), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id] + prompt[-38:] + tok("2", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits[0, -2].float(), -1)[ids[0, -1]]
    torch.testing.assert_close(cut[0, 1], expected)
    # the model's own context length is the default limit
    short = tiny_llama(len(tok), max_positions=32)
    with pytest.warns(UserWarning, match="max_length=32"):
        icl.label_probabilities(short, tok, texts, TEMPLATE, LABELS, examples=shots)


def test_a_model_trained_for_the_task_picks_the_right_label():
    """A tiny Llama fine-tuned (fully, here) on the filled template knows the answer; the scorer,
    which never saw the training, must find it. (Few-shot prompts are not asked of it: it was
    trained on single reviews, and demonstrations with their own rating words only distract it.)"""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        texts, labels = reviews(16, seed=100 + step)
        encoded = [icl.encode_labelled(tok, TEMPLATE, t, LABELS[y]) for t, y in zip(texts, labels)]
        ids = torch.tensor([e[0] for e in encoded])  # one token per word: every sequence the same length
        targets = torch.full_like(ids, -100)
        targets[:, -1] = ids[:, -1]  # the loss on the label word only
        loss = model(input_ids=ids, labels=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    texts, labels = reviews(64, seed=7)
    before = icl.accuracy(tiny_llama(len(tok), seed=1), tok, texts, labels, TEMPLATE, LABELS)
    probs = icl.label_probabilities(model, tok, texts, TEMPLATE, LABELS)
    assert (probs.argmax(-1) == torch.tensor(labels)).float().mean() >= 0.95, before
    assert probs[torch.arange(64), labels].mean() > 0.8
    assert before < 0.5  # the untrained model does not know it


def test_bad_input_is_refused_clearly():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match=r"must contain \{text\} and \{label\}"):
        icl.label_probabilities(model, tok, ["food"], "Review: {text}", LABELS)
    with pytest.raises(ValueError, match=r"place \{text\} before \{label\}"):
        icl.label_probabilities(model, tok, ["food"], "{label} for {text}", LABELS)
    with pytest.raises(ValueError, match="label_words is empty"):
        icl.label_probabilities(model, tok, ["food"], TEMPLATE, [])
    with pytest.raises(ValueError, match="label word '' encodes to no tokens"):
        icl.label_probabilities(model, tok, ["food"], TEMPLATE, ["1", ""])
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        icl.label_probabilities(model, tok, ["food"], TEMPLATE, ["very much 1"], max_length=4)
