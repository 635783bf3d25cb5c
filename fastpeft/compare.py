"""``fastpeft compare``: every PEFT method, and in-context learning, on the same model, data and
budget, in one table: trainable parameters, checkpoint size, peak training memory, step time and
final accuracy, printed, as JSON and as a chart.

The model's kind decides the task and how it is scored (:func:`fastpeft.models.kind_of`, a rule on
its config, not its name):

* a pretrained causal LM (SmolLM2, any local ``*ForCausalLM`` folder): the encoder's sentiment task
  below as text to complete, each review put into :data:`SENTIMENT_TEMPLATE` and answered by a
  label word (:data:`SENTIMENT_LABEL_WORDS`); the held-out reviews come from the test templates.
* the default tiny random Llama (its word-level tokenizer knows no English): a synthetic 4-class
  review classification it must learn. A review is five words, four neutral ones and one that
  carries the rating (``"awful"``: 1 star ... ``"superb"``: 4 stars), put into the verbalizer
  template :data:`TEMPLATE`; the answer is the label word after it.
* for both: ``icl`` / ``icl0`` (few- and zero-shot, no fine-tuning) score prompts with
  :func:`fastpeft.icl.label_probabilities`; every trained method trains on the filled template with
  the loss on the label word only, then is scored zero-shot by the same scorer.
* an encoder (a BERT-style model: MiniLM, any local masked-LM family folder): binary sentiment of
  reviews written from templates (:data:`TRAIN_TEMPLATES`; the held-out reviews come from
  :data:`TEST_TEMPLATES`, never seen in training) over several domains' vocabularies, half of them
  negated. The model is loaded as a sequence classifier with a fresh two-way head, which every
  method trains where PEFT trains it (task_type ``SEQ_CLS``: the head is a module to save; BitFit,
  layer freezing and full fine-tuning train it among their parameters). ICL does not fit (an encoder
  classifier has no next-token head to score label words with): its rows say so. ``head`` (the
  frozen body, only the head trained: a linear probe) is the no-adapter baseline.

Every trained row sees the same number of steps on the same batches. The default model is the tiny
random Llama of ``fastpeft finetune`` (with biases, so that BitFit has something to train) and a
word-level tokenizer built in memory; ``model=DIR`` takes a local Hugging Face model and its
tokenizer. Each row runs in a fresh process (forked from a server that has imported the libraries
once), so its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from . import finetune, icl

ICL = "icl"  # few-shot (CompareSettings.few_shot demonstrations)
ICL_ZERO = "icl0"  # zero-shot
ICL_METHODS = (ICL_ZERO, ICL)
HEAD = "head"  # the frozen body, only the task head (or a causal LM's output layer) trained: a linear probe
COMPARE_METHODS = ICL_METHODS + finetune.METHODS + (HEAD,)
HEAD_LR = 1e-2  # AdamW's rate for the head row: one linear layer on frozen features takes large steps
# AdamW's rates for an encoder classifier (finetune.DEFAULT_LR's are for small causal LMs trained
# from their output layer). Measured: LoRA at finetune's 5e-3 left a tiny random BERT at chance (loss
# 0.69 after 250 steps, the training reviews too) where 1e-3 learned it (0.45, held out 0.61); the
# rest are the usual ones for BERT-sized models: soft prompts and scaling vectors take larger
# steps, full fine-tuning and the top layers smaller ones. DiffPruning's deltas span every weight, as
# full fine-tuning's updates do, and take its rate: on MiniLM (50 steps of 8) 1e-3 left it at chance
# (0.515, loss 0.729 -> 0.698), 1e-4 reached 0.770 (loss 0.687 -> 0.365).
ENCODER_LR = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "prompt": 3e-2, "prefix": 1e-2, "ia3": 1e-2,
              "bottleneck": 1e-3, "compacter": 3e-3, "bitfit": 3e-3, "diffpruning": 1e-4, "layerfreeze": 5e-4,
              "full": 1e-4, HEAD: HEAD_LR}
# AdamW's rates for a pretrained causal LM (real weights: SmolLM2 or a model folder; the tiny random
# default keeps finetune.DEFAULT_LR). Its survey at these rates, on the sentiment task (40 steps of
# 8, 100 held out, chance 0.50; README): every method but prefix tuning (0.49) at 0.77-1.00.
# Measured on SmolLM2-135M's earlier 4-class rating task (40 steps of 8, 100 held out, chance 0.25): at DEFAULT_LR's rates (LoRA/QLoRA/DoRA/bottleneck/Compacter/DiffPruning
# 5e-3, full 1e-3) all seven answered one label (0.19-0.22). One run each here: LoRA 5e-4 0.900,
# QLoRA 5e-4 0.890, DoRA 5e-4 0.900, bottleneck 1e-3 1.000, full 5e-5 1.000. Compacter (0.08% of the
# weights) needs larger steps: 3e-3 0.240, 1e-2 1.000. Layer freezing (the top layer): 1e-4 0.350,
# 1e-3 0.710 (the survey's run), 3e-3 0.520: it keeps finetune's 1e-3. DiffPruning 1e-4 drove the
# training loss to 0.002 yet scored 0.210, the untrained model's zero-shot score (at 5e-3: 0.210,
# loss 0.844); the same run scored with its eval gates not projected to the 0.99 sparsity target
# scored 1.000: the rate learns the task, and 40 steps leave the L0 penalty too little time to
# close the gates, so the projection keeps too little of the delta. Prompt, prefix, (IA)3 (0.900)
# and the head keep their rates, and BitFit finetune's (SmolLM2 has no biases: not measured here).
PRETRAINED_CAUSAL_LR = {"lora": 5e-4, "qlora": 5e-4, "dora": 5e-4, "prompt": 3e-2, "prefix": 1e-2, "ia3": 5e-2,
                        "bottleneck": 1e-3, "compacter": 1e-2, "bitfit": 1e-2, "diffpruning": 1e-4,
                        "layerfreeze": 1e-3, "full": 5e-5, HEAD: HEAD_LR}
CAUSAL, ENCODER = "causal", "encoder"
TEMPLATE = "Review: {text}\nOn a 1 to 4 star scale, the reviewer would give {label}"
LABEL_WORDS = ["1", "2", "3", "4"]
# The rating words: a review's label is the class of the one it contains.
RATING_WORDS = [["awful", "terrible", "disgusting"], ["bland", "mediocre", "slow"],
                ["decent", "fine", "pleasant"], ["superb", "excellent", "perfect"]]
NEUTRAL_WORDS = ["food", "service", "table", "staff", "menu", "price", "dinner", "waiter", "room", "wine", "soup",
                 "dessert", "lunch", "music", "view", "bread"]
WORDS_PER_REVIEW = 5

# The encoder's task: binary sentiment (LABEL_NAMES[label]) of reviews from templates. A template's
# {adj} carries the polarity; a negated template flips it. The test templates (and their negations:
# "never", "hardly", "far from") are never seen in training; the vocabularies are shared.
LABEL_NAMES = ["negative", "positive"]
# A third of the reviews are negated: the adjective alone then predicts 2/3 of the labels, and only
# a model that reads the negation gets the rest. (With half negated, an adjective says nothing about
# the label by itself: a tiny random BERT stayed at chance, loss 0.69, after 200 full fine-tuning steps.)
NEGATED_SHARE = 1 / 3
SENTIMENT_WORDS = {  # label -> adjectives
    0: ["terrible", "awful", "dull", "disappointing", "bland", "boring", "poor", "dreadful", "mediocre", "clumsy"],
    1: ["wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "lovely", "impressive",
        "pleasant", "fantastic"],
}
SUBJECTS = ["film", "plot", "acting", "soundtrack", "food", "service", "soup", "dessert", "room", "bed", "view",
            "staff", "phone", "battery", "screen", "book", "story", "ending", "concert", "museum"]
TRAIN_TEMPLATES = [  # (template, negated)
    ("The {noun} was {adj}.", False), ("I found the {noun} {adj}.", False), ("What a {adj} {noun}!", False),
    ("Honestly, the {noun} is {adj}.", False), ("We thought the {noun} was really {adj}.", False),
    ("The {noun} was not {adj}.", True), ("I did not find the {noun} {adj} at all.", True),
    ("Nobody would call the {noun} {adj}.", True), ("The {noun} is not {adj}, whatever you have heard.", True),
    ("We did not think the {noun} was {adj}.", True),
]
TEST_TEMPLATES = [
    ("Everyone agreed the {noun} felt {adj}.", False), ("The {noun} turned out to be {adj}.", False),
    ("In short: a {adj} {noun}.", False), ("The {noun} never seemed {adj} to me.", True),
    ("I would hardly describe the {noun} as {adj}.", True), ("The {noun} was far from {adj}.", True),
]
# The sentiment task for a pretrained causal LM: a review, then its label word after this prompt.
SENTIMENT_TEMPLATE = "Review: {text}\nSentiment: {label}"
SENTIMENT_LABEL_WORDS = ["negative", "positive"]


@dataclass
class CompareSettings:
    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    model: str | None = None  # local Hugging Face model directory; None: the tiny default Llama
    steps: int = 150
    batch_size: int = 32
    lr: float | None = None  # None: each method's usual rate (learning_rate)
    eval_size: int = 256
    few_shot: int = 3  # demonstrations in the ICL prompts
    max_length: int = 64  # encoder: tokens per review at most (the template reviews are shorter)
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
    not_applicable: str = ""  # why the method does not fit this kind of model (then nothing ran)


@dataclass
class Task:
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    shots: list[tuple[str, int]]
    # a causal LM's verbalizer: the prompt a review fills and the word of each label after it
    template: str = TEMPLATE
    label_words: list[str] = field(default_factory=lambda: list(LABEL_WORDS))


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


def sentiment_reviews(n: int, generator: torch.Generator, templates: list[tuple[str, bool]]
                      ) -> tuple[list[str], list[int]]:
    """`n` reviews from `templates` and their sentiment labels (0 negative, 1 positive), balanced in
    expectation: the label is drawn first, then whether the review is negated (NEGATED_SHARE of
    them), a template of that kind, and an adjective of the polarity that, through the negation,
    gives that label."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=generator))
        negated = bool(torch.rand((), generator=generator) < NEGATED_SHARE)
        template = pick([t for t, t_negated in templates if t_negated == negated])
        adjective = pick(SENTIMENT_WORDS[1 - label if negated else label])
        texts.append(template.replace("{noun}", pick(SUBJECTS)).replace("{adj}", adjective))
        labels.append(label)
    return texts, labels


def synthetic_task(s: CompareSettings, kind: str = CAUSAL) -> Task:
    """Training reviews for every step, a held-out evaluation set and the ICL demonstrations: the
    sentiment task (test templates unseen) for an encoder and for a pretrained causal LM (s.model
    set; its verbalizer SENTIMENT_TEMPLATE), the 4-class rating task for the tiny default."""
    if kind == ENCODER or s.model is not None:
        def make(n, seed, templates):
            return sentiment_reviews(n, torch.Generator().manual_seed(seed), templates)
        train = make(s.steps * s.batch_size, s.seed + 1, TRAIN_TEMPLATES)
        evaluation = make(s.eval_size, s.seed + 2, TEST_TEMPLATES)
        if kind == ENCODER:
            return Task(*train, *evaluation, [])
        shots = balanced_shots(*make(8 * s.few_shot, s.seed + 3, TRAIN_TEMPLATES), s.few_shot)
        return Task(*train, *evaluation, shots, SENTIMENT_TEMPLATE, list(SENTIMENT_LABEL_WORDS))
    train = reviews(s.steps * s.batch_size, torch.Generator().manual_seed(s.seed + 1))
    evaluation = reviews(s.eval_size, torch.Generator().manual_seed(s.seed + 2))
    shot_texts, shot_labels = reviews(s.few_shot, torch.Generator().manual_seed(s.seed + 3))
    return Task(*train, *evaluation, list(zip(shot_texts, shot_labels)))


def balanced_shots(texts: list[str], labels: list[int], n: int) -> list[tuple[str, int]]:
    """n (text, label) demonstrations from the pool, the labels taking turns (0, 1, 0, ...; the
    pool's order otherwise): SmolLM2 given three seeded draws that were all negative answered
    "negative" more (3-shot 0.71 against zero-shot 0.76)."""
    queues = {label: [t for t, y in zip(texts, labels) if y == label] for label in sorted(set(labels))}
    order = sorted(queues)
    shots = []
    for i in range(n):
        label = order[i % len(order)]
        if not queues[label]:
            raise ValueError(f"the pool of {len(texts)} reviews has too few of label {label} for {n} demonstrations")
        shots.append((queues[label].pop(0), label))
    return shots


def sentiment_vocabulary() -> list[str]:
    """Every text the sentiment task can write (for a word-level tokenizer over it)."""
    words = [w for group in SENTIMENT_WORDS.values() for w in group] + SUBJECTS
    return [t.replace("{noun}", " ").replace("{adj}", " ") for t, _ in TRAIN_TEMPLATES + TEST_TEMPLATES] + [" ".join(words)]


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


def model_kind(s: CompareSettings) -> str:
    """CAUSAL or ENCODER: the default tiny Llama is causal; a folder's kind is read from its config."""
    if s.model is None:
        return CAUSAL
    from .models import kind_of

    return kind_of(s.model)


def load_tokenizer(s: CompareSettings):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(s.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{s.model}: no tokenizer could be loaded ({e}); compare needs one to build its task"
                         ) from None


def load_model_and_tokenizer(s: CompareSettings, kind: str = CAUSAL):
    """The model and its tokenizer; an encoder as a sequence classifier with a fresh head of
    len(LABEL_NAMES) classes (seeded by s.seed)."""
    if s.model is None:
        tokenizer = default_tokenizer()
        return finetune.default_model(s.seed, vocab_size=len(tokenizer), bias=True), tokenizer
    tokenizer = load_tokenizer(s)
    if kind == ENCODER:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(s.seed)  # the fresh head
        return AutoModelForSequenceClassification.from_pretrained(s.model, num_labels=len(LABEL_NAMES),
                                                                  local_files_only=True), tokenizer
    return finetune.load_model(finetune.FinetuneSettings(model=s.model, seed=s.seed)), tokenizer


def training_batches(task: Task, tokenizer, s: CompareSettings):
    """(input_ids, labels, attention_mask) per step: the filled template, loss on the label word only."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, s.steps * s.batch_size, s.batch_size):
        encoded = [icl.encode_labelled(tokenizer, task.template, text, task.label_words[label])
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


def encode_texts(tokenizer, texts: list[str], s: CompareSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64 [len(texts), longest] (right-padded, at most s.max_length)."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=s.max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def classification_batches(task: Task, tokenizer, s: CompareSettings):
    """(input_ids, labels [batch], attention_mask) per step: the reviews and their class."""
    for start in range(0, s.steps * s.batch_size, s.batch_size):
        ids, mask = encode_texts(tokenizer, task.train_texts[start: start + s.batch_size], s)
        yield ids, torch.tensor(task.train_labels[start: start + s.batch_size]), mask


@torch.no_grad()
def classifier_accuracy(model, tokenizer, texts: list[str], labels: list[int], s: CompareSettings) -> float:
    """Fraction of `texts` whose highest logit is their label (the model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    right = 0
    try:
        for start in range(0, len(texts), s.batch_size):
            ids, mask = encode_texts(tokenizer, texts[start: start + s.batch_size], s)
            logits = model(input_ids=ids.to(s.device), attention_mask=mask.to(s.device)).logits
            right += int((logits.argmax(-1).cpu() == torch.tensor(labels[start: start + s.batch_size])).sum())
    finally:
        model.train(was_training)
    return right / len(texts)


def head_names(model, kind: str) -> list[str]:
    """What a linear probe trains: an encoder classifier's task head (the modules PEFT's SEQ_CLS
    trains whole, fastpeft.targeting.TASK_HEADS), a causal LM's output layer."""
    from .targeting import TASK_HEADS, output_layer_names

    if kind == ENCODER:
        names = sorted({n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TASK_HEADS["SEQ_CLS"]})
    else:
        names = sorted(output_layer_names(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no task head or output layer to train")
    return names


def method_config(method: str, model, kind: str, fs: finetune.FinetuneSettings):
    """The method's config for this compare: finetune's, and for an encoder classifier the task
    head trained as PEFT trains it (task_type SEQ_CLS, where the config has one; the selective
    methods name the head among what they train)."""
    from dataclasses import replace

    if method == HEAD:
        from .methods.layer_freezing import LayerFreezingConfig

        return LayerFreezingConfig(num_trainable_layers=0, modules_to_train=head_names(model, kind))
    config = finetune.method_config(fs)
    if kind != ENCODER:
        return config
    if hasattr(config, "task_type"):
        return replace(config, task_type="SEQ_CLS")
    if hasattr(config, "modules_to_train"):  # layer freezing: the top layers and the head
        return replace(config, modules_to_train=(config.modules_to_train or []) + head_names(model, kind))
    return config  # BitFit trains the head (train_task_head), full fine-tuning everything


def usual_rates(kind: str, model: str | None) -> dict[str, float]:
    """Each method's usual AdamW rate for a model of `kind`: ENCODER_LR for an encoder,
    PRETRAINED_CAUSAL_LR for a causal LM from a folder (real weights), finetune.DEFAULT_LR (and the
    head row's HEAD_LR) for the tiny random default (`model` None)."""
    if kind == ENCODER:
        return ENCODER_LR
    if model is not None:
        return PRETRAINED_CAUSAL_LR
    return {**finetune.DEFAULT_LR, HEAD: HEAD_LR}


def learning_rate(method: str, kind: str, s: CompareSettings) -> float:
    """s.lr, else the method's usual rate for the kind of model (usual_rates)."""
    if s.lr is not None:
        return s.lr
    return usual_rates(kind, s.model)[method]


def does_not_fit(method: str, kind: str) -> str:
    """Why `method` cannot run on a model of `kind` ("" when it can)."""
    if kind == ENCODER and method in ICL_METHODS:
        return ("does not fit an encoder classifier: in-context learning scores label words with a causal LM's "
                "next-token head, which a BERT-style classifier does not have")
    return ""


def run_method(method: str, s: CompareSettings) -> dict:
    """One row of the table, in this process."""
    if s.threads:
        torch.set_num_threads(s.threads)
    kind = model_kind(s)
    row = CompareRow(method)
    row.not_applicable = does_not_fit(method, kind)
    if row.not_applicable:
        return asdict(row)
    task = synthetic_task(s, kind)
    model, tokenizer = load_model_and_tokenizer(s, kind)
    model = model.to(s.device)
    if method == "bitfit":
        from .methods.bitfit import bias_names

        if not bias_names(model):  # a method that does not fit the model is refused, as ICL on an encoder
            row.not_applicable = (f"does not fit {type(model).__name__}: BitFit trains bias terms and it has none "
                                  "(bias=False layers, as in Llama-style models)")
            return asdict(row)
    if method in ICL_METHODS:
        from .methods import count_parameters

        row.total_params = count_parameters(model)[1]
        base = finetune.rss_mb()
        finetune.reset_peak_rss()
        start = time.perf_counter()
        row.accuracy = icl.accuracy(model, tokenizer, task.eval_texts, task.eval_labels, task.template,
                                    task.label_words, examples=task.shots if method == ICL else (),
                                    batch_size=s.batch_size)
        row.seconds = time.perf_counter() - start
        row.step_ms = 1000 * row.seconds / len(task.eval_texts)
        row.peak_memory_mb = finetune.peak_rss_mb() - base
        row.memory_kind = "process RSS above the loaded model, peak (scoring)"
        return asdict(row)
    fs = finetune.FinetuneSettings(method="layerfreeze" if method == HEAD else method, model=s.model, steps=s.steps,
                                   batch_size=s.batch_size, lr=learning_rate(method, kind, s), seed=s.seed,
                                   device=s.device, log_every=0, progress=s.progress)
    import fastpeft

    if method == "qlora":
        fastpeft.quantize_model(model, double_quant=True)
    model = fastpeft.get_peft_model(model, method_config(method, model, kind, fs))
    batches = (classification_batches if kind == ENCODER else training_batches)(task, tokenizer, s)
    result = finetune.train_model(model, batches, fs, leave_bar=False)
    row.trainable_params, row.total_params = result.trainable_params, result.total_params
    row.peak_memory_mb, row.memory_kind = result.peak_memory_mb, result.memory_kind
    row.step_ms, row.seconds = 1000 * result.step_seconds, result.seconds
    row.first_loss, row.final_loss, _ = result.first_and_final_loss()
    if kind == ENCODER:
        row.accuracy = classifier_accuracy(model, tokenizer, task.eval_texts, task.eval_labels, s)
    else:
        row.accuracy = icl.accuracy(model, tokenizer, task.eval_texts, task.eval_labels, task.template,
                                    task.label_words, batch_size=s.batch_size)
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


def format_table(rows: list[CompareRow], chance: float = 1 / len(LABEL_WORDS)) -> str:
    header = ("method", "trainable params", "checkpoint", "peak MB", "step ms", "accuracy", "loss first→final")
    lines = [header]
    for r in rows:
        if r.error or r.not_applicable:
            lines.append((r.method, f"error: {r.error}"[:110] if r.error else f"n/a: {r.not_applicable}", "", "",
                          "", "", ""))
            continue
        share = f" ({100 * r.trainable_params / r.total_params:.2f}%)" if r.total_params else ""
        trained = r.method not in ICL_METHODS
        lines.append((r.method, f"{r.trainable_params:,d}{share}", _size(r.checkpoint_bytes) if trained else "-",
                      f"{r.peak_memory_mb:,.1f}", f"{r.step_ms:.1f}", f"{r.accuracy:.3f}",
                      f"{r.first_loss:.3f}→{r.final_loss:.3f}" if trained else "-"))
    def whole_line(row):  # an error or a refusal: the method's name and its message
        return row[1].startswith(("error", "n/a"))

    widths = [max(len(row[i]) for row in lines if not whole_line(row)) for i in range(len(header))]
    text = []
    for i, row in enumerate(lines):
        text.append(row[0].ljust(widths[0]) + "  " + row[1] if whole_line(row) else
                    "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    kinds = sorted({r.memory_kind for r in rows if r.memory_kind and r.method not in ICL_METHODS})
    text.append(f"(peak MB: {', '.join(kinds) or 'n/a'}; icl, icl0: no training: their step ms is per example "
                f"scored, their memory the scoring's; accuracy on held-out reviews, chance {chance:.2f})")
    return "\n".join(text)


def plot(rows: list[CompareRow], path: str, chance: float = 1 / len(LABEL_WORDS), title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error and not r.not_applicable]
    names = [r.method for r in ok]
    fig, (mem, acc) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4.4 if title else 4))
    if title:
        fig.suptitle(title, fontsize=9)
    colors = ["#999999" if n in ICL_METHODS + (HEAD,) else "#1f77b4" for n in names]
    mem.bar(names, [r.peak_memory_mb for r in ok], color=colors)
    mem.set_ylabel("peak memory above the model (MB)")
    mem.set_title("peak training memory")
    acc.bar(names, [r.accuracy for r in ok], color=colors)
    acc.axhline(chance, color="#d62728", linestyle="--", linewidth=1, label="chance")
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy")
    acc.set_title("final accuracy (held out)")
    acc.legend(loc="upper right", fontsize=8)
    for ax in (mem, acc):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    failed = [r.method for r in rows if r.error]
    unfit = [r.method for r in rows if r.not_applicable]
    notes = ([f"failed: {', '.join(failed)}"] if failed else []) + (
        [f"not applicable to this model: {', '.join(unfit)}"] if unfit else [])
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7, color="#d62728")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_description(kind: str, model: str | None = None) -> dict:
    """What the rows were trained and scored on (for the JSON): the task of synthetic_task for a
    model of `kind` from folder `model` (None: the tiny default)."""
    sentiment = dict(train_templates=TRAIN_TEMPLATES, test_templates=TEST_TEMPLATES, adjectives=SENTIMENT_WORDS,
                     subjects=SUBJECTS, negated_share=NEGATED_SHARE, chance=1 / len(LABEL_NAMES))
    if kind == ENCODER:
        return dict(kind=kind, task="binary sentiment, sequence classification", label_names=LABEL_NAMES, **sentiment)
    if model is not None:
        return dict(kind=kind, task="binary sentiment, label word scored", template=SENTIMENT_TEMPLATE,
                    label_words=SENTIMENT_LABEL_WORDS, **sentiment)
    return dict(kind=kind, task="4-class ratings, label word scored", template=TEMPLATE, label_words=LABEL_WORDS,
                chance=1 / len(LABEL_WORDS))


def run(s: CompareSettings, json_path: str | None = None, plot_path: str | None = None,
        title: str = "") -> list[CompareRow]:
    kind = model_kind(s)  # a folder that is neither kind is refused before any row runs
    description = task_description(kind, s.model)
    chance = description["chance"]
    rows = compare(s)
    print(format_table(rows, chance))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(settings=asdict(s), **description, rows=[asdict(r) for r in rows]), f,
                      indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    if plot_path:
        plot(rows, plot_path, chance, title)
        print(f"wrote {plot_path}")
    return rows
