"""In-context learning: score a classification task with a causal LM, no training.

Each input is put into a verbalizer template and every label word is scored as its continuation::

    probs = fastpeft.icl.label_probabilities(
        model, tokenizer, ["The food was cold and the waiter rude."],
        template="Review: {text}\\nOn a 1 to 4 star scale, the reviewer would give {label}",
        label_words=["1", "2", "3", "4"],
        examples=[("Best meal of my life.", "4")])         # optional few-shot demonstrations
    probs  # tensor [1, 4], each row sums to one

A label word's score is the sum of the log-probabilities of its tokens after the prompt (words of
several tokens are scored whole); the probabilities are those scores normalised over the label
words (a softmax). Few-shot examples are the template filled with their text and label, joined by
``example_separator``, before the prompt. Prompts longer than the model's context are truncated
from the left (the first examples go first) and a warning says how many were.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

# A tokenizer's model_max_length above this is transformers' "no limit" placeholder.
_NO_LIMIT = 10**8


def fill(template: str, text: str, label: str) -> str:
    """`template` with {text} and {label} replaced (plain replacement: braces in `text` are safe)."""
    return template.replace("{text}", text).replace("{label}", label)


def _split_template(template: str) -> str:
    """The part of `template` before {label}: what the label word continues."""
    if "{label}" not in template or "{text}" not in template:
        raise ValueError(f"the template must contain {{text}} and {{label}}, got {template!r}")
    prompt, _, rest = template.partition("{label}")
    if "{text}" not in prompt:
        raise ValueError(f"the template must place {{text}} before {{label}}, got {template!r}")
    return prompt


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where the tokenizer splits context+continuation.
    Whitespace ending the context moves to the continuation (" 4" is one token in BPE vocabularies)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx:
        cont = whole[len(ctx):]
    else:  # the tokenizer merged across the boundary: encode the continuation alone
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"label word {continuation.strip()!r} encodes to no tokens")
    return ctx, cont


def encode_labelled(tokenizer, template: str, text: str, label_word: str, add_bos: bool | None = None
                    ) -> tuple[list[int], int]:
    """Token ids of `template` filled with `text` and `label_word` (BOS first, as the scorer feeds
    it), and how many tokens at the end are the label word's: a training example whose loss is
    taken on those tokens teaches exactly what :func:`label_log_likelihoods` scores."""
    bos = tokenizer.bos_token_id if add_bos or add_bos is None else None
    ctx, cont = _encode_pair(tokenizer, _split_template(template).replace("{text}", text), label_word)
    return ([bos] if bos is not None else []) + ctx + cont, len(cont)


def default_max_length(model: nn.Module, tokenizer) -> int | None:
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < _NO_LIMIT]
    return min(limits) if limits else None


@torch.no_grad()
def label_log_likelihoods(model: nn.Module, tokenizer, texts: Sequence[str], template: str,
                          label_words: Sequence[str], examples: Sequence[tuple[str, str | int]] = (),
                          batch_size: int = 16, max_length: int | None = None, example_separator: str = "\n\n",
                          add_bos: bool | None = None, progress: bool = False) -> torch.Tensor:
    """Summed log-probability of each label word after each prompt: float32 [len(texts), len(label_words)].

    examples: (text, label) pairs, label a label word or its index. max_length: the longest
    sequence (prompt and label word) fed to the model; default the model's max_position_embeddings
    or the tokenizer's model_max_length. add_bos: start each sequence with the tokenizer's BOS
    token (default: when it has one)."""
    if not label_words:
        raise ValueError("label_words is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_template = _split_template(template)
    shots = "".join(fill(template, text, label_words[label] if isinstance(label, int) else label) + example_separator
                    for text, label in examples)
    bos = tokenizer.bos_token_id if add_bos or add_bos is None else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    prefix = [bos] if bos is not None else []
    max_length = max_length or default_max_length(model, tokenizer)

    sequences, truncated = [], set()  # (ids, number of label tokens) per (text, label word); texts cut
    for i, text in enumerate(texts):
        context = shots + prompt_template.replace("{text}", text)
        for word in label_words:
            ctx, cont = _encode_pair(tokenizer, context, word)
            if max_length is not None and len(prefix) + len(ctx) + len(cont) > max_length:
                room = max_length - len(prefix) - len(cont)
                if room < 1:
                    raise ValueError(f"label word {word!r} ({len(cont)} tokens) leaves no room for a prompt in "
                                     f"max_length={max_length}")
                ctx = ctx[-room:]
                truncated.add(i)
            if not prefix and not ctx:
                raise ValueError("the prompt before {label} is empty and the tokenizer has no BOS token to start from")
            sequences.append((prefix + ctx + cont, len(cont)))
    if truncated:
        warnings.warn(f"{len(truncated)} of {len(texts)} prompts were longer than max_length="
                      f"{max_length} tokens and were truncated from the left (their beginning, the first few-shot "
                      "examples, was dropped)", stacklevel=2)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    batches = range(0, len(sequences), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="icl", unit="batch", leave=False)
    try:
        for start in batches:
            chunk = sequences[start: start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (seq, _) in enumerate(chunk):  # right padding: positions of real tokens unchanged
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, (seq, n_label) in enumerate(chunk):
                end = len(seq)
                # logits at position t predict token t + 1; only the label's positions are normalised
                # (a whole [batch, width, vocab] log-softmax in fp32 is gigabytes for a real vocabulary)
                logprobs = torch.log_softmax(logits[row, end - n_label - 1: end - 1].float(), dim=-1).cpu()
                targets = torch.tensor(seq[end - n_label:])
                scores.append(logprobs.gather(1, targets[:, None]).sum())
    finally:
        model.train(was_training)
    return torch.stack(scores).view(len(texts), len(label_words))


def label_probabilities(model: nn.Module, tokenizer, texts: Sequence[str], template: str,
                        label_words: Sequence[str], **kwargs) -> torch.Tensor:
    """Probability of each label word for each text, normalised over the label words: float32
    [len(texts), len(label_words)], rows summing to one. Keyword arguments: see
    :func:`label_log_likelihoods`."""
    return torch.softmax(label_log_likelihoods(model, tokenizer, texts, template, label_words, **kwargs), dim=-1)


def accuracy(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[int], template: str,
             label_words: Sequence[str], **kwargs) -> float:
    """Fraction of texts whose most probable label word is the right one (labels: indices)."""
    probs = label_log_likelihoods(model, tokenizer, texts, template, label_words, **kwargs)
    return (probs.argmax(-1) == torch.as_tensor(labels)).float().mean().item()
