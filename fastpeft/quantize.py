"""Whole-model 4-bit actions: quantise a model's linear layers to NF4, and read or write a 4-bit
checkpoint in the format transformers + bitsandbytes use (``model.safetensors`` with bitsandbytes'
keys, ``config.json`` with a bitsandbytes ``quantization_config``)."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .nn.linear4bit import Linear4bit
from .targeting import output_layer_names, replace_module


def quantize_model(model: nn.Module, double_quant: bool = False, blocksize: int = 64,
                   quant_storage: torch.dtype = torch.uint8, skip_output_layer: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (the output layer kept, as transformers does) by a
    :class:`Linear4bit`, in place; returns the model."""
    skip = output_layer_names(model) if skip_output_layer else set()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip:
            replace_module(model, name, Linear4bit.from_linear(module, blocksize, double_quant, quant_storage))
    return model


_QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"


def _read_safetensors_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json names (never a pickle)."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(directory, shard)))
    return state


def _check_bnb_quantization_config(qc, directory: str) -> None:
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"{directory}: config.json has no bitsandbytes 4-bit quantization_config "
                         f"(got {qc!r}); quantise a full-precision model with fastpeft.quantize_model instead")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{directory}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type')!r} is not supported "
                         "(fastpeft implements NF4 only; fp4 weights are refused, not misread)")


def load_quantized_model(directory: str, auto_class=None) -> nn.Module:
    """A transformers model that bitsandbytes/transformers saved in 4 bits (NF4), with fastpeft
    :class:`Linear4bit` layers in place of bitsandbytes' (bitsandbytes is not needed).

    Reads ``config.json`` (its ``quantization_config`` must be bitsandbytes NF4) and the
    safetensors weights; every linear saved with a ``weight.quant_state.bitsandbytes__nf4`` key
    becomes a ``Linear4bit`` holding those bytes. The skeleton is built with ``from_config``
    without weight initialisation, so the unquantised modules briefly exist in full precision.
    auto_class: the transformers auto class (default ``AutoModelForCausalLM``).
    """
    import transformers as tf
    from transformers.initialization import no_init_weights

    config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
    _check_bnb_quantization_config(getattr(config, "quantization_config", None), directory)
    state = _read_safetensors_checkpoint(directory)
    quantized = sorted(k[: -len(_QUANT_STATE_SUFFIX)] for k in state if k.endswith(_QUANT_STATE_SUFFIX))
    if not quantized:
        raise ValueError(f"{directory}: no weight carries a '{_QUANT_STATE_SUFFIX[1:]}' key; not a 4-bit checkpoint")
    del config.quantization_config  # the skeleton is plain; its linears are replaced below
    with no_init_weights():
        model = (auto_class or tf.AutoModelForCausalLM).from_config(config)
    for name in quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{directory}: checkpoint key {name + _QUANT_STATE_SUFFIX!r} names no module of a "
                             f"{type(model).__name__}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{directory}: {name} is a {type(module).__name__}, not a linear layer")
        layer = Linear4bit.from_state_dict(state, prefix=name + ".")
        if (layer.out_features, layer.in_features) != (module.out_features, module.in_features):
            raise ValueError(f"{directory}: {name}.weight holds a [{layer.out_features}, {layer.in_features}] "
                             f"weight; the model expects [{module.out_features}, {module.in_features}]")
        replace_module(model, name, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model, config)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not fit a {type(model).__name__}: missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def save_quantized_model(model: nn.Module, directory: str) -> None:
    """Write a model with fastpeft ``Linear4bit`` layers as bitsandbytes/transformers write a 4-bit
    model (``config.json`` with a bitsandbytes ``quantization_config``, ``model.safetensors`` with
    bitsandbytes' keys), so ``transformers.AutoModelForCausalLM.from_pretrained`` (with
    bitsandbytes installed) and :func:`load_quantized_model` read it. Everything is checked
    before anything is written; the model's own config is not changed."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("save_quantized_model: the model has no fastpeft Linear4bit layer (quantize_model first)")
    blocksizes = {m.blocksize for m in layers}
    double = {m.nested_absmax is not None for m in layers}
    storage = {m.weight.dtype for m in layers}
    if len(double) != 1 or len(storage) != 1:
        raise ValueError("save_quantized_model: transformers' quantization_config holds one double-quant setting "
                         "and one storage dtype; this model mixes them")
    if blocksizes != {64}:
        raise ValueError(f"save_quantized_model: transformers reads blocksize 64 only; the model uses "
                         f"{sorted(blocksizes)}")
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double.pop(), "bnb_4bit_compute_dtype": str(layers[0].weight_dtype).split(".")[-1],
        "bnb_4bit_quant_storage": str(storage.pop()).split(".")[-1], "_load_in_4bit": True, "_load_in_8bit": False}
    tied = _tied_keys(model, config)
    # a tied output layer is written once, under the embedding's key, as transformers writes it
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def _tied_keys(model: nn.Module, config) -> set[str]:
    """State-dict keys transformers ties to another (the output layer to the embedding), if tied."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())
