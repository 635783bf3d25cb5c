"""Prefix tuning: learned key/value prefixes at every attention layer, through the attention cache.

As in PEFT, the prefixes enter as a transformers cache that already holds `num_virtual_tokens`
positions of keys and values at every layer when the user's tokens arrive: each user token
attends to them and sits at positions k, k+1, ... (PEFT's positions). Outputs cover the user's
tokens (nothing to drop: the prefix has no outputs). The model is changed in place; see
:class:`~fastpeft.methods.prompt_tuning.VirtualTokenHooks` for what callers pass.

With grouped-query attention the prefixes have the model's key/value heads (``token_dim =
num_key_value_heads * head_dim``, PEFT's convention), not its query heads.

The checkpoint (PEFT's format) holds the folded table ``prompt_embeddings`` ``[num_virtual_tokens,
num_layers * 2 * token_dim]``: for layer l, entry ``2l`` is the key and ``2l + 1`` the value,
each ``token_dim`` wide as ``[heads, head_dim]``. With ``prefix_projection`` the table is the output
of a two-layer MLP over k learned embeddings while training (Li & Liang's reparameterisation);
:func:`fold_prefix_projection` replaces the MLP by the table it computes, outputs unchanged.
Modules trained whole (``modules_to_save``, a classifier's head) are saved beside it under PEFT's
prompt-learning keys ``base_model.<module>.<param>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .base import Method, register
from .prompt_tuning import (PromptLearningConfig, VirtualTokenHooks, cache_of, check_matches, check_positive_int,
                            decoder_geometry, encoder_of, encoder_shapes, encoder_state_dict, install_encoder,
                            prompt_learning_fields, virtual_tokens_off)

INIT_WEIGHTS = (None, "zero")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings; fields mean what they mean in ``peft.PrefixTuningConfig``.

    num_virtual_tokens: k, the prefix length at every layer (required, >= 1).
    prefix_projection: train the prefix through an MLP (embedding ``[k, token_dim]`` -> Linear to
        `encoder_hidden_size` -> tanh -> Linear to ``num_layers * 2 * token_dim``).
    encoder_hidden_size: the MLP's hidden width (default: token_dim).
    init_weights: None (random, N(0, 1) as PEFT) or "zero" (the prefix starts as zero keys/values).
    token_dim, num_attention_heads, num_layers, num_transformer_submodules, task_type: filled from
        the model by ``get_peft_model`` (the config object is updated in place, as PEFT does):
        token_dim is ``num_key_value_heads * head_dim`` and num_attention_heads the number of
        key/value heads. Given values must fit the model.
    inference_mode: build the plain table (no MLP) for loading trained weights. A config read from a
        checkpoint always has it set (checkpoints hold the folded table).
    """

    peft_type: str = field(default="PREFIX_TUNING", kw_only=True)  # a field, as in PEFT: passing it is allowed
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def __post_init__(self):
        owner = "PrefixTuningConfig"
        self.check_peft_type("PREFIX_TUNING")
        prompt_learning_fields(owner, self)
        check_positive_int(owner, "encoder_hidden_size", self.encoder_hidden_size)
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"{owner}: init_weights must be None or 'zero', got {self.init_weights!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"{owner}: prefix_projection must be a bool, got {self.prefix_projection!r}")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content; inference_mode=true as PEFT writes it (the
        checkpoint holds the folded table whatever prefix_projection says)."""
        d = super().to_dict()
        d["inference_mode"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrefixTuningConfig":
        config = super().from_dict(d)
        config.inference_mode = True  # the checkpoint holds the folded table: load it into a plain one
        return config


class PrefixEncoder(nn.Module):
    """The learned prefixes of every layer.

    ``table()`` is ``[num_virtual_tokens, num_layers * 2 * token_dim]`` (PEFT's layout): the plain
    parameter ``embedding.weight``, or, with a projection, ``transform(embedding.weight)`` with
    ``embedding.weight`` ``[num_virtual_tokens, token_dim]``. Parameters are float32.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_heads: int, head_dim: int,
                 projection_hidden_size: int | None, zero_init: bool, device=None):
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.num_heads, self.head_dim = \
            num_virtual_tokens, num_layers, num_heads, head_dim
        token_dim = num_heads * head_dim
        width = num_layers * 2 * token_dim
        self.transform: nn.Sequential | None = None
        if projection_hidden_size is not None:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden_size, device=device), nn.Tanh(),
                                           nn.Linear(projection_hidden_size, width, device=device))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, device=device)
            last = self.embedding
        if zero_init:
            for p in last.parameters():
                nn.init.zeros_(p)

    @property
    def projected(self) -> bool:
        return self.transform is not None

    def table(self) -> torch.Tensor:
        if self.transform is not None:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each ``[batch, heads, num_virtual_tokens, head_dim]``."""
        table = self.table().to(dtype)
        per_layer = table.view(self.num_virtual_tokens, self.num_layers * 2, self.num_heads, self.head_dim)
        per_layer = per_layer.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(per_layer[2 * i], per_layer[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the projection MLP by the table it computes (outputs unchanged)."""
        if self.transform is None:
            return
        table = self.table()
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(trainable)
        self.transform = None


class PrefixTuningHooks(VirtualTokenHooks):
    def __init__(self, model: nn.Module, encoder: PrefixEncoder):
        super().__init__(model, encoder.num_virtual_tokens)
        self.encoder = encoder

    def first_call(self, model, named, batch_size):
        cache = cache_of(named)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        dtype = model.get_input_embeddings().weight.dtype
        for layer, (key, value) in enumerate(self.encoder.key_values(batch_size, dtype)):
            cache.update(key, value, layer)
        for name in ("cache", "past_key_values"):
            named.pop(name, None)
        named[self.cache_argument] = cache
        return 0


def fold_prefix_projection(model: nn.Module) -> nn.Module:
    """Fold the prefix's reparameterisation MLP into the plain table it computes, in place (for
    inference: the MLP's parameters are freed; outputs do not change). Returns the model."""
    encoder_of(model, PrefixEncoder).fold()
    return model


@register
class PrefixTuning(Method):
    config_cls = PrefixTuningConfig

    def _resolve(self, model: nn.Module, config: PrefixTuningConfig) -> dict[str, Any]:
        geometry = decoder_geometry(model, "prefix tuning")
        resolved = dict(token_dim=geometry.num_key_value_heads * geometry.head_dim, num_layers=geometry.num_layers,
                        num_attention_heads=geometry.num_key_value_heads)
        check_matches("PrefixTuningConfig", config, resolved)
        resolved["num_transformer_submodules"] = 1
        resolved["head_dim"] = geometry.head_dim
        return resolved

    def disabled(self, model: nn.Module):
        return virtual_tokens_off(model)

    def apply(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> nn.Module:
        resolved = self._resolve(model, config)
        head_dim = resolved.pop("head_dim")
        projected = config.prefix_projection and not config.inference_mode
        hidden = config.encoder_hidden_size or resolved["token_dim"]
        encoder = PrefixEncoder(config.num_virtual_tokens, resolved["num_layers"], resolved["num_attention_heads"],
                                head_dim, hidden if projected else None, config.init_weights == "zero",
                                device=model.get_input_embeddings().weight.device)
        install_encoder(model, encoder, PrefixTuningHooks, config, adapter_name)
        for name, value in resolved.items():
            setattr(config, name, value)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = resolved["token_dim"]
        return model

    def state_dict(self, model, adapter_name):
        encoder = encoder_of(model, PrefixEncoder)
        # With the projection still in place the checkpoint gets the table it computes now (a
        # copy); loading always builds the plain table, whose parameter is the live tensor.
        table = encoder.table().detach() if encoder.projected else encoder.embedding.weight
        return encoder_state_dict(model, adapter_name, table)

    def expected_shapes(self, model, config):
        resolved = self._resolve(model, config)
        return encoder_shapes(model, config, (config.num_virtual_tokens, resolved["num_layers"] * 2 * resolved["token_dim"]))
