"""``fastpeft compare``: every PEFT method, and in-context learning, on the same model, data and
budget, in one table: trainable parameters, checkpoint size, peak training memory, step time and
final accuracy, printed, as JSON and as a chart.

The task is a synthetic 4-class review classification the model must learn: a review is five
words, four neutral ones and one that carries the rating (``"awful"``: 1 star ... ``"superb"``:
4 stars), put into the verbalizer template :data:`TEMPLATE`; the answer is the label word after it.
The same task serves both kinds of row:

* ``icl`` (no fine-tuning): few-shot prompts scored by :func:`fastpeft.icl.label_probabilities`;
* every trained method: trained on the filled template with the loss on the label word only, for
  the same number of steps on the same batches, then scored zero-shot by the same scorer (the
  argmax over the label words at the answer position).

The default model is the tiny random Llama of ``fastpeft finetune`` (with biases, so that BitFit
has something to train) and a word-level tokenizer built in memory; ``model=DIR`` takes a local
Hugging Face model and its tokenizer. Each row runs in a fresh process (forked from a server that
has imported the libraries once), so its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from . import finetune, icl

ICL = "icl"
COMPARE_METHODS = (ICL,) + finetune.METHODS
TEMPLATE = "Review: {text}\nOn a 1 to 4 star scale, the reviewer would give {label}"
LABEL_WORDS = ["1", "2", "3", "4"]
# The rating words: a review's label is the class of the one it contains.
RATING_WORDS = [["awful", "terrible", "disgusting"], ["bland", "mediocre", "slow"],
                ["decent", "fine", "pleasant"], ["superb", "excellent", "perfect"]]
NEUTRAL_WORDS = ["food", "service", "table", "staff", "menu", "price", "dinner", "waiter", "room", "wine", "soup",
                 "dessert", "lunch", "music", "view", "bread"]
WORDS_PER_REVIEW = 5


@dataclass
class CompareSettings:
    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    model: str | None = None  # local Hugging Face model directory; None: the tiny default Llama
    steps: int = 150
    batch_size: int = 32
    lr: float | None = None  # None: each method's finetune.DEFAULT_LR
    eval_size: int = 256
    few_shot: int = 3  # demonstrations in the ICL prompts
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch threads per run (None: torch's default)
    progress: bool = True
    fresh_process: bool = True  # False: every row in this process (peak memory then is not per row)


@dataclass
class CompareRow:
    method: str
    trainable_params: int = 0
    total_params: int = 0
    checkpoint_bytes: int = 0  # what save_adapter wrote
    peak_memory_mb: float = 0.0
    step_ms: float = 0.0  # ICL: time to score one example
    accuracy: float = 0.0
    first_loss: float = 0.0
    final_loss: float = 0.0
    seconds: float = 0.0
    memory_kind: str = ""
    error: str = ""


@dataclass
class Task:
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    shots: list[tuple[str, int]]


def reviews(n: int, generator: torch.Generator) -> tuple[list[str], list[int]]:
    """`n` synthetic reviews and their labels (0..3)."""
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(len(RATING_WORDS), (1,), generator=generator))
        words = [NEUTRAL_WORDS[int(i)] for i in torch.randint(len(NEUTRAL_WORDS), (WORDS_PER_REVIEW - 1,),
                                                                 generator=generator)]
        rating = RATING_WORDS[label][int(torch.randint(len(RATING_WORDS[label]), (1,), generator=generator))]
        words.insert(int(torch.randint(WORDS_PER_REVIEW, (1,), generator=generator)), rating)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def synthetic_task(s: CompareSettings) -> Task:
    """Training reviews for every step, a held-out evaluation set and the ICL demonstrations."""
    train = reviews(s.steps * s.batch_size, torch.Generator().manual_seed(s.seed + 1))
    evaluation = reviews(s.eval_size, torch.Generator().manual_seed(s.seed + 2))
    shot_texts, shot_labels = reviews(s.few_shot, torch.Generator().manual_seed(s.seed + 3))
    return Task(*train, *evaluation, list(zip(shot_texts, shot_labels)))


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer over the words of `texts` (whitespace and punctuation split), with
    <pad>, <s> (BOS) and <unk>: built in memory, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


def default_tokenizer():
    words = [w for group in RATING_WORDS for w in group] + NEUTRAL_WORDS + LABEL_WORDS
    return word_tokenizer([TEMPLATE.replace("{text}", " ".join(words)).replace("{label}", "")])


def load_model_and_tokenizer(s: CompareSettings):
    if s.model is None:
        tokenizer = default_tokenizer()
        return finetune.default_model(s.seed, vocab_size=len(tokenizer), bias=True), tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(s.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{s.model}: no tokenizer could be loaded ({e}); compare needs one to build its task"
                         ) from None
    return finetune.load_model(finetune.FinetuneSettings(model=s.model, seed=s.seed)), tokenizer


def training_batches(task: Task, tokenizer, s: CompareSettings):
    """(input_ids, labels, attention_mask) per step: the filled template, loss on the label word only."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, s.steps * s.batch_size, s.batch_size):
        encoded = [icl.encode_labelled(tokenizer, TEMPLATE, text, LABEL_WORDS[label])
                   for text, label in zip(task.train_texts[start: start + s.batch_size],
                                          task.train_labels[start: start + s.batch_size])]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (seq, n_label) in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(seq) - n_label: len(seq)] = ids[row, len(seq) - n_label: len(seq)]
            mask[row, : len(seq)] = 1
        yield ids, labels, (None if bool(mask.all()) else mask)


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_method(method: str, s: CompareSettings) -> dict:
    """One row of the table, in this process."""
    if s.threads:
        torch.set_num_threads(s.threads)
    task = synthetic_task(s)
    model, tokenizer = load_model_and_tokenizer(s)
    model = model.to(s.device)
    row = CompareRow(method)
    if method == ICL:
        from .methods import count_parameters

        row.total_params = count_parameters(model)[1]
        base = finetune._rss_mb()
        start = time.perf_counter()
        row.accuracy = icl.accuracy(model, tokenizer, task.eval_texts, task.eval_labels, TEMPLATE, LABEL_WORDS,
                                    examples=task.shots, batch_size=s.batch_size)
        row.seconds = time.perf_counter() - start
        row.step_ms = 1000 * row.seconds / len(task.eval_texts)
        row.peak_memory_mb = _rss_peak_mb() - base
        row.memory_kind = "process RSS above the loaded model, peak (scoring)"
        return asdict(row)
    fs = finetune.FinetuneSettings(method=method, model=s.model, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                   seed=s.seed, device=s.device, log_every=0, progress=s.progress)
    model = finetune.apply_method(model, fs, "fastpeft")
    result = finetune.train_model(model, training_batches(task, tokenizer, s), fs, leave_bar=False)
    row.trainable_params, row.total_params = result.trainable_params, result.total_params
    row.peak_memory_mb, row.memory_kind = result.peak_memory_mb, result.memory_kind
    row.step_ms, row.seconds = 1000 * result.step_seconds, result.seconds
    row.first_loss, row.final_loss, _ = result.first_and_final_loss()
    row.accuracy = icl.accuracy(model, tokenizer, task.eval_texts, task.eval_labels, TEMPLATE, LABEL_WORDS,
                                batch_size=s.batch_size)
    import fastpeft

    with tempfile.TemporaryDirectory() as tmp:
        fastpeft.save_adapter(model, os.path.join(tmp, "adapter"))
        folder = os.path.join(tmp, "adapter")
        row.checkpoint_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return asdict(row)


def _row(method: str, s: CompareSettings) -> CompareRow:
    """run_method, in a fresh process if asked; a failure becomes the row's error, not the run's."""
    try:
        if s.fresh_process:
            return CompareRow(**finetune.in_fresh_process(run_method, method, s, context="forkserver"))
        return CompareRow(**run_method(method, s))
    except Exception as e:  # e.g. a method whose config is not importable yet
        message = str(e) if isinstance(e, RuntimeError) and s.fresh_process else f"{type(e).__name__}: {e}"
        return CompareRow(method, error=message.splitlines()[0] if message else type(e).__name__)


def compare(s: CompareSettings) -> list[CompareRow]:
    unknown = [m for m in s.methods if m not in COMPARE_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(COMPARE_METHODS)}")
    if min(s.steps, s.batch_size, s.eval_size) < 1:
        raise ValueError(f"steps, batch_size and eval_size must be >= 1, got {s.steps}, {s.batch_size}, {s.eval_size}")
    if s.fresh_process:
        # the fork server imports the libraries once; every row is a fork of it, clean of the others
        mp.get_context("forkserver").set_forkserver_preload(["fastpeft.compare", "transformers"])
    from tqdm import tqdm

    rows = []
    bar = tqdm(s.methods, desc="fastpeft compare", unit="method", disable=not s.progress)
    for method in bar:
        bar.set_postfix(method=method)
        rows.append(_row(method, s))
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[CompareRow]) -> str:
    header = ("method", "trainable params", "checkpoint", "peak MB", "step ms", "accuracy", "loss first→final")
    lines = [header]
    for r in rows:
        if r.error:
            lines.append((r.method, f"error: {r.error}"[:110], "", "", "", "", ""))
            continue
        share = f" ({100 * r.trainable_params / r.total_params:.2f}%)" if r.total_params else ""
        trained = r.method != ICL
        lines.append((r.method, f"{r.trainable_params:,d}{share}", _size(r.checkpoint_bytes) if trained else "-",
                      f"{r.peak_memory_mb:,.1f}", f"{r.step_ms:.1f}", f"{r.accuracy:.3f}",
                      f"{r.first_loss:.3f}→{r.final_loss:.3f}" if trained else "-"))
    widths = [max(len(row[i]) for row in lines if not row[1].startswith("error")) for i in range(len(header))]
    text = []
    for i, row in enumerate(lines):
        text.append(row[0].ljust(widths[0]) + "  " + row[1] if row[1].startswith("error") else
                    "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    kinds = sorted({r.memory_kind for r in rows if r.memory_kind and r.method != ICL})
    text.append(f"(peak MB: {', '.join(kinds) or 'n/a'}; icl: no training: its step ms is per example scored, "
                "its memory the scoring's; accuracy on held-out reviews, chance 0.25)")
    return "\n".join(text)


def plot(rows: list[CompareRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    names = [r.method for r in ok]
    fig, (mem, acc) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4))
    colors = ["#999999" if n == ICL else "#1f77b4" for n in names]
    mem.bar(names, [r.peak_memory_mb for r in ok], color=colors)
    mem.set_ylabel("peak memory above the model (MB)")
    mem.set_title("peak training memory")
    acc.bar(names, [r.accuracy for r in ok], color=colors)
    acc.axhline(1 / len(LABEL_WORDS), color="#d62728", linestyle="--", linewidth=1, label="chance")
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy")
    acc.set_title("final accuracy (held out)")
    acc.legend(loc="upper right", fontsize=8)
    for ax in (mem, acc):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    failed = [r.method for r in rows if r.error]
    if failed:
        fig.text(0.01, 0.01, f"failed: {', '.join(failed)}", fontsize=7, color="#d62728")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: CompareSettings, json_path: str | None = None, plot_path: str | None = None) -> list[CompareRow]:
    rows = compare(s)
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(settings=asdict(s), template=TEMPLATE, label_words=LABEL_WORDS,
                           rows=[asdict(r) for r in rows]), f, indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    if plot_path:
        plot(rows, plot_path)
        print(f"wrote {plot_path}")
    return rows
