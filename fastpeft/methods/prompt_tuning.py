"""Prompt tuning: k learned virtual-token embeddings prepended to every input.

The model is changed in place: its trained prompt lives in ``model.fastpeft_prompt_encoder`` and
forward hooks on the model put it in front of the user's tokens, so ``model(**inputs)``,
``model(input_ids, labels=...)`` and ``model.generate(...)`` all see it.

Deliberate difference from PEFT: PEFT's ``PeftModelForCausalLM`` returns logits for the virtual
tokens too (``[batch, k + seq, vocab]``); fastpeft returns logits (and hidden states) for the user's
tokens only (``[batch, seq, vocab]``), so every fastpeft method gives outputs of the same shape.
``labels`` and ``attention_mask`` are the user's (``[batch, seq]``); they are extended over the
virtual tokens internally, so the loss is PEFT's loss. Attention maps (``output_attentions``) still
cover the virtual tokens.

This module also holds what prefix tuning shares: the hooks that rewrite a forward call
(:class:`VirtualTokenHooks`) and the model geometry read from a transformers config.
"""

from __future__ import annotations

import contextlib

import dataclasses
import inspect
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..targeting import attach_module, task_type_of
from .base import Method, MethodConfig, register
from .heads import find_heads, heads_off, heads_shapes, heads_state_dict, wrap_heads

PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
ENCODER_ATTRIBUTE = "fastpeft_prompt_encoder"  # where the trained prompt (or prefix) lives on the model
# The checkpoint key prefix of modules trained whole (modules_to_save, a classifier head) for PEFT's
# prompt-learning methods: their PeftModel holds the transformers model itself as base_model.
PROMPT_LEARNING_PREFIX = "base_model."
_CACHE_NAMES = ("cache", "past_key_values")  # transformers 5 renamed past_key_values to cache


# ---------------------------------------------------------------- shared with prefix tuning

def check_positive_int(owner: str, name: str, value, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class DecoderGeometry:
    """What prompt learning needs to know about a decoder-only transformers model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


def decoder_geometry(model: nn.Module, method: str) -> DecoderGeometry:
    """Read the geometry of `model` from its transformers config (standard attribute names, which
    transformers maps for every family: GPT-2's ``n_layer`` answers to ``num_hidden_layers``).
    Raises TypeError for a model prompt learning cannot drive."""
    config = getattr(model, "config", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if config is None or not callable(get_embeddings):
        raise TypeError(f"{method} needs a transformers model (with .config and get_input_embeddings()); got "
                        f"{type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{method}: encoder-decoder models are not supported by fastpeft (decoder-only models only)")
    embeddings = get_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{method}: the model's input embeddings are a {type(embeddings).__name__}, not nn.Embedding")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = {}
    for name in ("num_hidden_layers", "num_attention_heads"):
        value = getattr(text, name, None)
        if not isinstance(value, int) or value < 1:
            raise TypeError(f"{method}: the model config has no {name}; this model is not supported")
        values[name] = value
    heads = values["num_attention_heads"]
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = embeddings.embedding_dim
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return DecoderGeometry(values["num_hidden_layers"], hidden, heads, kv_heads, head_dim, embeddings.num_embeddings)


def _named_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of one call of ``model.forward``, positional ones named by its signature."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def cache_of(named: dict[str, Any]):
    """The transformers Cache among a forward's named arguments (None when there is none)."""
    cache = next((named[n] for n in _CACHE_NAMES if named.get(n) is not None), None)
    if cache is not None and not hasattr(cache, "get_seq_length"):
        raise TypeError(f"virtual tokens need a transformers Cache object as the cache, got {type(cache).__name__} "
                        "(legacy tuple caches are not supported)")
    return cache


def _cache_argument(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class VirtualTokenHooks:
    """Forward hooks that make a decoder-only transformers model see `num_virtual_tokens` virtual
    tokens in front of the user's tokens in every call, including the calls of ``generate()``.

    Everything the caller passes is relative to the user's tokens: ``attention_mask`` ``[batch,
    seq_so_far]`` (ones are prepended for the virtual tokens), ``position_ids`` (shifted by the
    number of virtual tokens), and a cache that the model filled earlier (it already holds the
    virtual tokens). A call whose cache is absent or empty is a first call: subclasses put the
    virtual tokens in (:meth:`first_call`). A cache is only valid with the model that filled it.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        self.num_virtual_tokens = num_virtual_tokens
        self.active = True  # False inside fastpeft.disable_adapters: calls pass through untouched
        self.cache_argument = _cache_argument(model)
        self._calls = threading.local()  # per thread: what the output hook must undo, one entry per call
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def first_call(self, model: nn.Module, named: dict[str, Any], batch_size: int) -> int:
        """Put the virtual tokens into `named` (in place); return how many leading output positions
        belong to virtual tokens and must be dropped from the outputs."""
        raise NotImplementedError

    def _before(self, model, args, kwargs):
        if not self.active:
            return None
        named = _named_arguments(model, args, kwargs)
        tokens = named.get("input_ids")
        if tokens is None:
            tokens = named.get("inputs_embeds")
        if tokens is None:
            raise ValueError("a model with virtual tokens must be called with input_ids or inputs_embeds")
        batch_size, user_length = tokens.shape[0], tokens.shape[1]
        n = self.num_virtual_tokens
        mask = named.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"a model with virtual tokens takes a 2-D attention_mask [batch, seq], got {mask.dim()}-D")
        cache = cache_of(named)
        first = cache is None or cache.get_seq_length() == 0
        positions = named.get("position_ids")
        dropped = self.first_call(model, named, batch_size) if first else 0
        if positions is not None and not (first and dropped):  # first calls that prepend handle positions
            named["position_ids"] = positions + n
        if mask is not None:
            named["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)
        self._stack().append((dropped, user_length, named.get("labels") is not None))
        return (), named

    def _after(self, model, args, kwargs, output):
        if not self._stack():  # the input hook refused the call (always_call runs us anyway)
            return output
        dropped, user_length, has_labels = self._stack().pop()
        if not dropped or output is None:
            return output
        if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) with None entries left out
            logits_at = 1 if has_labels else 0
            items = list(output)
            items[logits_at] = _drop_leading(items[logits_at], user_length)
            return type(output)(items)
        if getattr(output, "logits", None) is not None and output.logits.dim() == 3:
            output.logits = _drop_leading(output.logits, user_length)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, dropped:] for h in output.hidden_states)
        return output

    def _stack(self) -> list:
        if not hasattr(self._calls, "stack"):
            self._calls.stack = []
        return self._calls.stack

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _drop_leading(logits: torch.Tensor, user_length: int) -> torch.Tensor:
    """Logits ``[batch, positions, vocab]`` for at most the user's `user_length` last positions (a
    caller's ``logits_to_keep`` may already have kept fewer)."""
    extra = logits.shape[1] - user_length
    return logits[:, extra:] if extra > 0 else logits


@contextlib.contextmanager
def virtual_tokens_off(model: nn.Module):
    """The model without its virtual tokens, and with its modules to save back at their originals:
    the base model (``fastpeft.disable_adapters``; PEFT's prompt learning keeps the trained copies
    there, and raises on a classifier). A cache filled inside holds no virtual tokens: do not carry
    it outside, nor one in."""
    hooks = getattr(model, ENCODER_ATTRIBUTE).hooks
    hooks.active = False
    try:
        with heads_off(model):
            yield model
    finally:
        hooks.active = True


def task_type_for(model: nn.Module, config) -> str | None:
    """The config's task_type, else the one the model's head implies (PEFT's loaders need it)."""
    return config.task_type or task_type_of(model)


def install_encoder(model: nn.Module, encoder: nn.Module, make_hooks, config, adapter_name: str) -> None:
    """Freeze the model, attach the encoder (trainable) and its hooks (``make_hooks(model,
    encoder)``), and train the modules to save (config.modules_to_save and the task_type's heads)
    whole. The modules to save are found first: a bad name raises with the model unchanged. The
    config records the task_type and modules_to_save used, as PEFT's does."""
    task_type = task_type_for(model, config)
    heads = find_heads(model, config, task_type=task_type)
    for p in model.parameters():
        p.requires_grad_(False)
    encoder.hooks = make_hooks(model, encoder)
    attach_module(model, ENCODER_ATTRIBUTE, encoder)
    for p in encoder.parameters():
        p.requires_grad_(True)
    wrap_heads(model, config, heads, adapter_name, task_type)
    config.task_type = task_type


def encoder_state_dict(model: nn.Module, adapter_name: str, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """A prompt-learning checkpoint: the prompt table, and the modules trained whole under PEFT's
    prompt-learning keys (``base_model.<module>.<param>``)."""
    return {"prompt_embeddings": table, **heads_state_dict(model, adapter_name, PROMPT_LEARNING_PREFIX)}


def encoder_shapes(model: nn.Module, config, table_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """What :func:`encoder_state_dict` holds for `config` on `model` (the model unchanged)."""
    return {"prompt_embeddings": table_shape,
            **heads_shapes(model, config, PROMPT_LEARNING_PREFIX, task_type=task_type_for(model, config))}


def encoder_of(model: nn.Module, kind: type) -> nn.Module:
    encoder = getattr(model, ENCODER_ATTRIBUTE, None)
    if not isinstance(encoder, kind):
        raise ValueError(f"the model has no {kind.__name__} (apply the method with fastpeft.get_peft_model first)")
    return encoder


@dataclass
class PromptLearningConfig(MethodConfig):
    """The fields PEFT's prompt-learning configs share (its ``PromptLearningConfig``), with PEFT's
    names; the geometry fields are filled from the model by ``get_peft_model``.

    modules_to_save: modules trained whole (a trainable copy each, saved with the prompt under
        PEFT's prompt-learning keys ``base_model.<module>.<param>``). The task_type's head is added
        as PEFT adds it (a sequence classifier's ``classifier`` / ``score``); task_type defaults to
        what the model's head implies, so a classifier's fresh head is trained and saved.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False


def prompt_learning_fields(owner: str, config) -> None:
    """The validation every prompt-learning config shares."""
    check_positive_int(owner, "num_virtual_tokens", config.num_virtual_tokens, required=True)
    for name in ("token_dim", "num_attention_heads", "num_layers"):
        check_positive_int(owner, name, getattr(config, name))
    if config.num_transformer_submodules not in (None, 1):
        raise ValueError(f"{owner}: num_transformer_submodules={config.num_transformer_submodules!r}: only "
                         "decoder-only models (1) are supported")


def check_matches(owner: str, config, expected: dict[str, int]) -> None:
    """Fields the user (or a checkpoint) set must describe this model."""
    for name, value in expected.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise ValueError(f"{owner}: {name}={given} does not fit this model ({name} should be {value})")


# ---------------------------------------------------------------- prompt tuning

@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings; fields mean what they mean in ``peft.PromptTuningConfig``.

    num_virtual_tokens: k, the number of learned virtual tokens (required, >= 1).
    prompt_tuning_init: "RANDOM" (N(0, 1), as PEFT), "SAMPLE_VOCAB" (embeddings of k tokens drawn
        from the vocabulary) or "TEXT" (embeddings of `prompt_tuning_init_text`'s tokens, repeated
        or cut to k).
    prompt_tuning_init_text: the text for "TEXT".
    tokenizer: a tokenizer object for "TEXT" (anything callable as ``tokenizer(text)["input_ids"]``;
        not written to ``adapter_config.json``), or
    tokenizer_name_or_path / tokenizer_kwargs: what ``transformers.AutoTokenizer.from_pretrained``
        loads instead (a local directory, or a hub name).
    token_dim, num_layers, num_attention_heads, num_transformer_submodules, task_type: filled from
        the model by ``get_peft_model`` (the config object is updated in place, as PEFT does);
        given values must fit the model.
    inference_mode: build the prompt for loading trained weights (no initialisation). A config
        read from a checkpoint always has it set.
    """

    peft_type: str = field(default="PROMPT_TUNING", kw_only=True)  # a field, as in PEFT: passing it is allowed
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        owner = "PromptTuningConfig"
        self.check_peft_type("PROMPT_TUNING")
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"{owner}: prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        prompt_learning_fields(owner, self)
        if self.prompt_tuning_init == "TEXT":
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise ValueError(f"{owner}: prompt_tuning_init='TEXT' needs prompt_tuning_init_text (a non-empty "
                                 f"string), got {self.prompt_tuning_init_text!r}")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError(f"{owner}: prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=<tokenizer> "
                                 "or tokenizer_name_or_path=<local directory or hub name>")
            if self.tokenizer is not None and not callable(self.tokenizer):
                raise ValueError(f"{owner}: tokenizer must be callable as tokenizer(text)['input_ids'], got "
                                 f"{type(self.tokenizer).__name__}")
        elif self.tokenizer_kwargs:
            raise ValueError(f"{owner}: tokenizer_kwargs only apply with prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content. As PEFT's ``save_pretrained`` does, it says
        inference_mode=true (the file describes trained weights). A "TEXT" init from a tokenizer
        object with no loadable name is recorded as "RANDOM": PEFT demands a tokenizer path for
        "TEXT", and once trained the weights are what the checkpoint holds."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tokenizer"}
        d["peft_type"] = self.peft_type
        d["inference_mode"] = True
        if d["prompt_tuning_init"] == "TEXT" and not d["tokenizer_name_or_path"]:
            name = getattr(self.tokenizer, "name_or_path", None)
            if isinstance(name, str) and name:
                d["tokenizer_name_or_path"] = name
            else:
                d["prompt_tuning_init"] = "RANDOM"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTuningConfig":
        config = super().from_dict(d)
        config.inference_mode = True  # weights follow: never load a tokenizer or sample an init for them
        return config


class PromptEmbedding(nn.Module):
    """The learned prompt: ``embedding.weight`` ``[num_virtual_tokens, token_dim]``, float32."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)  # N(0, 1): PEFT's RANDOM

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptTuningHooks(VirtualTokenHooks):
    def __init__(self, model: nn.Module, encoder: PromptEmbedding):
        super().__init__(model, encoder.embedding.num_embeddings)
        self.encoder = encoder

    def first_call(self, model, named, batch_size):
        n = self.num_virtual_tokens
        embeds = named.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(named["input_ids"])
        prompts = self.encoder().to(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
        named["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        named["input_ids"] = None
        positions = named.get("position_ids")
        if positions is not None:
            if positions.dim() != 2:
                raise ValueError(f"prompt tuning takes position_ids [batch, seq], got {positions.dim()}-D")
            lead = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            named["position_ids"] = torch.cat([lead, positions + n], dim=1)
        labels = named.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] \
                and not labels.is_floating_point():
            # Per-token labels: no loss on the virtual tokens; the last one predicts the first user
            # token. A sequence's label ([batch], or [batch, num_labels] floats) is left as it is.
            named["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        token_types = named.get("token_type_ids")
        if token_types is not None:
            named["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], n), token_types], dim=1)
        return n


def _text_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"PromptTuningConfig: prompt_tuning_init_text {config.prompt_tuning_init_text!r} "
                         "tokenises to no tokens")
    if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"PromptTuningConfig: the tokenizer gives ids {ids} outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return ids


@register
class PromptTuning(Method):
    config_cls = PromptTuningConfig

    def _resolve(self, model: nn.Module, config: PromptTuningConfig) -> dict[str, Any]:
        geometry = decoder_geometry(model, "prompt tuning")
        resolved = dict(token_dim=geometry.hidden_size, num_layers=geometry.num_layers,
                        num_attention_heads=geometry.num_attention_heads)
        check_matches("PromptTuningConfig", config, resolved)
        resolved["num_transformer_submodules"] = 1
        return resolved

    def disabled(self, model: nn.Module):
        return virtual_tokens_off(model)

    def apply(self, model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> nn.Module:
        resolved = self._resolve(model, config)
        embeddings = model.get_input_embeddings()
        n = config.num_virtual_tokens
        init_ids = None
        if not config.inference_mode:  # every check and the tokenizer run before the model changes
            if config.prompt_tuning_init == "TEXT":
                ids = _text_token_ids(config, embeddings.num_embeddings)
                init_ids = (ids * math.ceil(n / len(ids)))[:n]
            elif config.prompt_tuning_init == "SAMPLE_VOCAB":
                init_ids = torch.randint(0, embeddings.num_embeddings, (n,)).tolist()
        encoder = PromptEmbedding(n, resolved["token_dim"], device=embeddings.weight.device)
        if init_ids is not None:
            with torch.no_grad():
                ids = torch.tensor(init_ids, device=embeddings.weight.device)
                encoder.embedding.weight.copy_(embeddings(ids).float())
        install_encoder(model, encoder, PromptTuningHooks, config, adapter_name)
        for name, value in resolved.items():
            setattr(config, name, value)
        return model

    def state_dict(self, model, adapter_name):
        return encoder_state_dict(model, adapter_name, encoder_of(model, PromptEmbedding).embedding.weight)

    def expected_shapes(self, model, config):
        return encoder_shapes(model, config, (config.num_virtual_tokens, self._resolve(model, config)["token_dim"]))
