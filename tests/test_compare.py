"""`fastpeft compare`: one table over methods and ICL, JSON and chart, failures kept to their row."""

import glob
import json
import os
import re

import pytest
import torch

import fastpeft
from fastpeft import cli, compare, finetune, models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest



def test_compare_cli_reduced_budget(tmp_path, capsys):
    report, chart = tmp_path / "compare.json", tmp_path / "compare.png"
    assert cli.main(["compare", "--methods", "icl,bitfit,layerfreeze,full", "--steps", "60", "--eval-size", "64",
                     "--threads", "1", "--json", str(report), "--plot", str(chart), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "accuracy" in out and "error" not in out
    rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["icl", "bitfit", "layerfreeze", "full"]
    icl, bitfit, layer, full = rows.values()
    assert icl["trainable_params"] == 0 and icl["checkpoint_bytes"] == 0 and icl["total_params"] > 0
    assert 0 < bitfit["trainable_params"] < layer["trainable_params"] < full["trainable_params"] == full["total_params"]
    for r in (bitfit, layer, full):
        assert 4 * r["trainable_params"] < r["checkpoint_bytes"] < 4 * r["trainable_params"] + 65536  # fp32 + header
        assert r["peak_memory_mb"] > 0 and r["step_ms"] > 0 and r["final_loss"] < r["first_loss"]
        assert r["memory_kind"] == "process RSS above the loaded model, peak"
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and not r["error"]
    assert full["accuracy"] >= 0.9  # the task is learnable: full fine-tuning learns it within the budget
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000


def test_a_failing_method_is_reported_in_its_row(monkeypatch, tmp_path):
    real = finetune.method_config

    def config_or_missing(s):
        if s.method == "prompt":
            raise ImportError("cannot import name 'PromptTuningConfig' (work in progress)")
        return real(s)

    monkeypatch.setattr(finetune, "method_config", config_or_missing)
    settings = compare.CompareSettings(methods=["prompt", "bitfit"], steps=4, eval_size=8, fresh_process=False,
                                       progress=False)
    rows = compare.compare(settings)
    assert rows[0].method == "prompt" and rows[0].error == ("ImportError: cannot import name 'PromptTuningConfig' "
                                                            "(work in progress)")
    assert not rows[1].error and rows[1].trainable_params > 0
    table = compare.format_table(rows)
    assert "prompt" in table and "error: ImportError" in table and "bitfit" in table
    compare.plot(rows, str(tmp_path / "chart.png"))  # the failed row is named on the chart, not drawn
    assert (tmp_path / "chart.png").exists()


def test_bitfit_on_a_model_without_biases_is_refused_not_an_error(monkeypatch):
    """SmolLM2 (a Llama) has no bias terms: its BitFit row says it does not fit, as ICL's on an encoder."""
    real = compare.load_model_and_tokenizer

    def without_biases(s, kind=compare.CAUSAL):
        model, tokenizer = real(s, kind)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias = None
        return model, tokenizer

    monkeypatch.setattr(compare, "load_model_and_tokenizer", without_biases)
    (row,) = compare.compare(compare.CompareSettings(methods=["bitfit"], steps=2, eval_size=8, fresh_process=False,
                                                     progress=False))
    assert not row.error and "BitFit trains bias terms" in row.not_applicable, row
    assert row.accuracy == 0 and row.step_ms == 0 and row.trainable_params == 0


def test_a_child_error_comes_back_as_the_row_error():
    # a broken model directory fails in the child process; the parent gets the message
    settings = compare.CompareSettings(methods=["full"], model="/nonexistent/model", steps=2, progress=False)
    rows = compare.compare(settings)
    assert "/nonexistent/model: no config.json" in rows[0].error


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown methods \\['adalora'\\]"):
        compare.compare(compare.CompareSettings(methods=["adalora"]))
    with pytest.raises(ValueError, match="steps, batch_size and eval_size must be >= 1"):
        compare.compare(compare.CompareSettings(steps=0))


def test_the_synthetic_task_is_consistent():
    s = compare.CompareSettings(steps=3, batch_size=4, eval_size=16)
    task = compare.synthetic_task(s)
    tok = compare.default_tokenizer()
    for text, label in zip(task.eval_texts, task.eval_labels):
        words = text.split()
        assert len(words) == compare.WORDS_PER_REVIEW
        assert [w for w in words if w not in compare.NEUTRAL_WORDS] in [[w] for w in compare.RATING_WORDS[label]]
        assert tok.unk_token_id not in tok(text)["input_ids"]
    batches = list(compare.training_batches(task, tok, s))
    assert len(batches) == 3
    ids, labels, mask = batches[0]
    assert mask is None and ids.shape[0] == 4
    answers = labels[labels != -100]  # exactly one label token per review: the label word
    assert answers.tolist() == [tok.convert_tokens_to_ids(compare.LABEL_WORDS[y]) for y in task.train_labels[:4]]


def test_a_qlora_row_counts_its_4bit_weights():
    """QLoRA's base is the same model in 4 bits: its total counts the same weights as LoRA's (it
    showed the 4-bit weights as absent, 49.5 % trainable)."""
    settings = compare.CompareSettings(methods=["lora", "qlora"], steps=2, eval_size=8, fresh_process=False,
                                       progress=False)
    lora, qlora = compare.compare(settings)
    assert not lora.error and not qlora.error
    assert qlora.trainable_params == lora.trainable_params and qlora.total_params == lora.total_params
    assert qlora.trainable_params < 0.2 * qlora.total_params


# ---------------------------------------------------------------- encoder classifiers (BERT-style)

@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT (BertModel, as MiniLM's folder holds) with a word-level tokenizer over the
    sentiment task's words that starts every review with <s> (the token the classifier pools).
    Dropout off: 250 LoRA steps then learn it (with dropout 0.1 they did not, at any rate tried)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = compare.word_tokenizer(compare.sentiment_vocabulary())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_models_kind_is_read_from_its_config(tmp_path, tiny_bert_dir):
    transformers = pytest.importorskip("transformers")
    assert models.kind_of(tiny_bert_dir) == "encoder"  # architectures: BertModel
    for name, config in {
        "llama": transformers.LlamaConfig(architectures=["LlamaForCausalLM"]),
        "llama-bare": transformers.LlamaConfig(),  # no architectures: a causal-only model type
        "bert-decoder": transformers.BertConfig(is_decoder=True, architectures=["BertLMHeadModel"]),
        "roberta": transformers.RobertaConfig(architectures=["RobertaForSequenceClassification"]),
        "t5": transformers.T5Config(),
    }.items():
        config.save_pretrained(tmp_path / name)
    assert models.kind_of(str(tmp_path / "llama")) == models.kind_of(str(tmp_path / "llama-bare")) == "causal"
    assert models.kind_of(str(tmp_path / "bert-decoder")) == "causal"
    assert models.kind_of(str(tmp_path / "roberta")) == "encoder"
    with pytest.raises(ValueError, match="t5 is an encoder-decoder"):
        models.kind_of(str(tmp_path / "t5"))
    with pytest.raises(ValueError, match="no config.json"):
        models.kind_of(str(tmp_path))


def test_each_kind_of_model_gets_its_own_table_of_rates(tmp_path, tiny_bert_dir):
    """A causal LM from a folder (real weights: SmolLM2, any model directory) trains at
    PRETRAINED_CAUSAL_LR, the tiny random default at finetune.DEFAULT_LR, an encoder at ENCODER_LR;
    --lr overrides every table. (Only the folders' configs are read: no weights are loaded.)"""
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=576, num_hidden_layers=30
                             ).save_pretrained(tmp_path / "causal")
    pretrained = compare.CompareSettings(model=str(tmp_path / "causal"))
    default, encoder = compare.CompareSettings(), compare.CompareSettings(model=tiny_bert_dir)
    assert [compare.model_kind(s) for s in (pretrained, default, encoder)] == [compare.CAUSAL, compare.CAUSAL,
                                                                               compare.ENCODER]
    trained = [m for m in compare.COMPARE_METHODS if m not in compare.ICL_METHODS]
    for method in trained:
        rate = compare.learning_rate(method, compare.model_kind(pretrained), pretrained)
        assert rate == compare.PRETRAINED_CAUSAL_LR[method], method
        expected = compare.HEAD_LR if method == compare.HEAD else finetune.DEFAULT_LR[method]
        assert compare.learning_rate(method, compare.model_kind(default), default) == expected, method
        assert compare.learning_rate(method, compare.ENCODER, encoder) == compare.ENCODER_LR[method], method
        overridden = compare.CompareSettings(model=pretrained.model, lr=rate * 3)
        assert compare.learning_rate(method, compare.CAUSAL, overridden) == rate * 3, method
    # the rates the pretrained table exists for: the tiny model's left SmolLM2 at one label for everything
    for method in ("lora", "qlora", "dora", "full"):
        assert compare.PRETRAINED_CAUSAL_LR[method] < finetune.DEFAULT_LR[method], method


def test_the_sentiment_task_holds_its_test_templates_out_and_labels_through_negation():
    s = compare.CompareSettings(steps=50, batch_size=16, eval_size=600, seed=int(torch.randint(1000, ())))
    task = compare.synthetic_task(s, compare.ENCODER)
    assert task.shots == [] and len(task.train_texts) == 800 and len(task.eval_texts) == 600
    train_templates = {t for t, _ in compare.TRAIN_TEMPLATES}
    assert not train_templates & {t for t, _ in compare.TEST_TEMPLATES}

    polarity = {word: label for label, words in compare.SENTIMENT_WORDS.items() for word in words}

    def parse(text, templates):
        """(negated, the adjective's polarity) of the one template `text` was written from."""
        found = []
        for template, negated in templates:
            pattern = re.escape(template).replace(re.escape("{noun}"), "(?P<noun>\\w+)")
            match = re.fullmatch(pattern.replace(re.escape("{adj}"), "(?P<adj>\\w+)"), text)
            if match:
                assert match["noun"] in compare.SUBJECTS
                found.append((negated, polarity[match["adj"]]))
        assert len(found) == 1, (text, found)
        return found[0]

    for texts, labels, templates in ((task.train_texts, task.train_labels, compare.TRAIN_TEMPLATES),
                                     (task.eval_texts, task.eval_labels, compare.TEST_TEMPLATES)):
        parsed = [parse(t, templates) for t in texts]
        assert [adjective ^ negated for negated, adjective in parsed] == labels
        negated_share = sum(n for n, _ in parsed) / len(parsed)
        assert abs(negated_share - compare.NEGATED_SHARE) < 0.08 and abs(sum(labels) / len(labels) - 0.5) < 0.08


def test_the_encoder_path_runs_every_method_or_says_why_not(tiny_bert_dir, tmp_path):
    s = compare.CompareSettings(model=tiny_bert_dir, steps=4, batch_size=8, eval_size=16, fresh_process=False,
                                progress=False)
    rows = {r.method: r for r in compare.compare(s)}
    assert list(rows) == list(compare.COMPARE_METHODS)
    for method in compare.ICL_METHODS:
        assert "does not fit an encoder classifier" in rows[method].not_applicable and not rows[method].error
    trained = [r for r in rows.values() if r.method not in compare.ICL_METHODS]
    for r in trained:
        assert not r.error and not r.not_applicable, (r.method, r.error)
        assert 0 < r.trainable_params <= r.total_params and r.checkpoint_bytes > 0 and r.step_ms > 0
        assert 0.0 <= r.accuracy <= 1.0 and r.first_loss > 0
    assert rows["full"].trainable_params == rows["full"].total_params
    assert rows[compare.HEAD].trainable_params == 64 * 2 + 2  # the classifier alone
    table = compare.format_table(list(rows.values()), chance=0.5)
    assert "n/a: does not fit an encoder classifier" in table and "chance 0.50" in table
    compare.plot(list(rows.values()), str(tmp_path / "chart.png"), chance=0.5, title="tiny BERT")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", finetune.METHODS + (compare.HEAD,))
def test_every_method_trains_the_fresh_head_of_an_encoder_classifier(method, tiny_bert_dir):
    """The classifier's weight (or its trained copy, or a delta on it) trains under every method:
    a head left at its random initialisation caps a method at chance."""
    s = compare.CompareSettings(model=tiny_bert_dir)
    model, _ = compare.load_model_and_tokenizer(s, compare.ENCODER)
    if method == "qlora":
        fastpeft.quantize_model(model, double_quant=True)
    fs = finetune.FinetuneSettings(method="layerfreeze" if method == compare.HEAD else method)
    model = fastpeft.get_peft_model(model, compare.method_config(method, model, compare.ENCODER, fs))
    trained_head = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")
                    and tuple(p.shape) == (2, 64)]
    assert trained_head, [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_learns_the_sentiment_task_on_a_tiny_random_bert(tiny_bert_dir):
    s = compare.CompareSettings(methods=["lora"], model=tiny_bert_dir, steps=250, batch_size=16, eval_size=256,
                                fresh_process=False, progress=False)
    (row,) = compare.compare(s)
    assert not row.error and row.final_loss < 0.6 < row.first_loss
    # held out, from templates never seen in training (chance 0.5; this run measured 0.61)
    assert row.accuracy > 0.56, row


def test_compare_cli_takes_an_encoder_folder(tiny_bert_dir, tmp_path, capsys):
    report = tmp_path / "compare.json"
    assert cli.main(["compare", "--model", tiny_bert_dir, "--methods", "icl,head", "--steps", "3", "--eval-size", "8",
                     "--threads", "1", "--json", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "n/a: does not fit an encoder classifier" in out and "chance 0.50" in out
    data = json.loads(report.read_text())
    assert data["kind"] == "encoder" and data["chance"] == 0.5 and data["label_names"] == ["negative", "positive"]
    icl, head = data["rows"]
    assert icl["not_applicable"] and not head["error"] and head["trainable_params"] == 130


@pytest.mark.real_model
def test_minilm_learns_the_sentiment_task_and_refuses_icl():
    """The survey's LoRA row on the real MiniLM (fastpeft.models), its settings: 50 steps of 8
    reviews, 200 held out from unseen templates (the README's run measured 0.800; chance 0.5)."""
    s = compare.CompareSettings(methods=["icl0", "lora"], model=models.model_dir("minilm"), steps=50, batch_size=8,
                                eval_size=200, fresh_process=False, progress=False)
    icl0, lora = compare.compare(s)
    assert icl0.not_applicable and not lora.error
    assert lora.final_loss < 0.3 < lora.first_loss and lora.accuracy >= 0.7, lora


STORED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "*-compare-*.json")))


@pytest.mark.parametrize("path", STORED, ids=os.path.basename)
def test_a_stored_survey_has_every_method_measured_or_refused(path):
    """The README's survey tables come from these files: every method of its run has a row, measured
    (an accuracy, a parameter count, a step time) or refused with its reason, never both."""
    stored = json.load(open(path))
    rows = {r["method"]: r for r in stored["rows"]}
    assert set(rows) <= set(compare.COMPARE_METHODS) and "lora" in rows
    for method, r in rows.items():
        if r["not_applicable"]:
            assert r["accuracy"] == 0 and r["step_ms"] == 0, method
        else:
            assert not r["error"] and 0 < r["accuracy"] <= 1 and r["step_ms"] > 0, method
            assert r["trainable_params"] > 0 or method in compare.ICL_METHODS, method


# ---------------------------------------------------------------- a pretrained causal LM from a folder

@pytest.fixture(scope="module")
def tiny_causal_dir(tmp_path_factory):
    """A tiny random Llama folder with a word-level tokenizer over the sentiment task's words and its
    verbalizer: what compare sees of SmolLM2 (a causal LM from a folder), at a tiny model's cost."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-causal")
    prompt = compare.SENTIMENT_TEMPLATE.replace("{text}", " ").replace("{label}", " ".join(compare.SENTIMENT_LABEL_WORDS))
    tok = compare.word_tokenizer(compare.sentiment_vocabulary() + [prompt])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      architectures=["LlamaForCausalLM"], bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id, eos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_pretrained_causal_lm_gets_the_sentiment_task_as_text_to_complete(tiny_causal_dir):
    """A causal LM from a folder learns the encoder's sentiment task (test templates unseen) through
    SENTIMENT_TEMPLATE, the loss on its label word; its demonstrations take turns by label."""
    s = compare.CompareSettings(model=tiny_causal_dir, steps=2, batch_size=4, eval_size=32, few_shot=4,
                                seed=int(torch.randint(1000, ())))
    task = compare.synthetic_task(s, compare.model_kind(s))
    assert task.template == compare.SENTIMENT_TEMPLATE and task.label_words == compare.SENTIMENT_LABEL_WORDS
    sentiment = compare.synthetic_task(s, compare.ENCODER)  # the same reviews as the encoder's
    assert (task.train_texts, task.eval_texts, task.eval_labels) == (sentiment.train_texts, sentiment.eval_texts,
                                                                     sentiment.eval_labels)
    assert [y for _, y in task.shots] == [0, 1, 0, 1]
    tok = compare.load_tokenizer(s)
    ids, labels, _ = next(compare.training_batches(task, tok, s))
    answers = labels[labels != -100]  # one label token per review: its label word
    assert answers.tolist() == [tok.convert_tokens_to_ids(compare.SENTIMENT_LABEL_WORDS[y])
                                for y in task.train_labels[:4]]
    assert compare.task_description(compare.CAUSAL, s.model)["chance"] == 0.5
    assert compare.task_description(compare.CAUSAL)["label_words"] == compare.LABEL_WORDS  # the tiny default's


def test_balanced_shots_take_turns_and_refuse_a_short_pool():
    texts, labels = ["a", "b", "c", "d", "e"], [1, 1, 0, 1, 0]
    assert compare.balanced_shots(texts, labels, 4) == [("c", 0), ("a", 1), ("e", 0), ("b", 1)]
    with pytest.raises(ValueError, match="too few of label 0 for 5 demonstrations"):
        compare.balanced_shots(texts, labels, 5)


def test_compare_on_a_causal_folder_scores_every_row_on_the_sentiment_task(tiny_causal_dir, tmp_path):
    s = compare.CompareSettings(model=tiny_causal_dir, methods=["icl0", "icl", "lora", "head"], steps=3,
                                batch_size=4, eval_size=8, fresh_process=False, progress=False)
    report = tmp_path / "compare.json"
    rows = {r.method: r for r in compare.run(s, json_path=str(report))}
    for r in rows.values():
        assert not r.error and not r.not_applicable, (r.method, r.error)
        assert r.accuracy in {k / 8 for k in range(9)}
    assert rows["lora"].first_loss > 0 and rows["lora"].checkpoint_bytes > 0
    saved = json.loads(report.read_text())
    assert saved["task"] == "binary sentiment, label word scored" and saved["chance"] == 0.5
    assert saved["template"] == compare.SENTIMENT_TEMPLATE
