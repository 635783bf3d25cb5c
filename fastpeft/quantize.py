"""Whole-model 4-bit actions: quantise a model's linear layers to NF4, and read or write a 4-bit
checkpoint in the format transformers + bitsandbytes use (``model.safetensors``, or shards and
``model.safetensors.index.json``, with bitsandbytes' keys; ``config.json`` with a bitsandbytes
``quantization_config``)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .methods import count_parameters
from .nn.dense import DenseLinear
from .nn.linear4bit import Linear4bit
from .targeting import TASK_HEADS, name_matches, output_layer_names, own_modules, replace_module, task_type_of


# Modules kept in full precision besides the output layer and the task heads: a sequence
# classifier's pooler (BERT-family encoders name it so), the dense layer between the encoder and a
# head, which transformers + bitsandbytes would quantise. It is small (hidden x hidden) and sits on
# the path of every gradient that trains the head.
FULL_PRECISION_MODULES = ("pooler",)


def full_precision_modules(model: nn.Module) -> list[str]:
    """Names of the modules :func:`quantize_model` keeps in full precision by default: the output
    layer (``get_output_embeddings()``, as transformers + bitsandbytes keep it), the task heads
    PEFT trains fully for the model's task type (``classifier``, ``score``, ``qa_outputs``), and
    every module named in :data:`FULL_PRECISION_MODULES` (a BERT pooler); by rule, never by model."""
    heads = TASK_HEADS.get(task_type_of(model) or "", ())
    names = set(output_layer_names(model))
    names |= {n for n, _ in own_modules(model) if n and name_matches(n, list(heads) + list(FULL_PRECISION_MODULES))}
    return sorted(names)


def _skipped(name: str, skip_modules) -> bool:
    """transformers' rule for ``llm_int8_skip_modules``: an entry skips the module whose full name
    it matches from the start to a module boundary (``"layer.1"``: ``layer.1.attn``, not
    ``layer.11.attn``; a regex too), or ends with, and every module inside one it skips."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(entry, p) or p.endswith(entry) for entry in skip_modules for p in prefixes)


def quantize_model(model: nn.Module, double_quant: bool = False, blocksize: int = 64,
                   quant_storage: torch.dtype = torch.uint8, skip_modules=None) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` by a :class:`Linear4bit` (NF4), in place; returns the model.

    skip_modules: modules kept in full precision, as bitsandbytes' ``llm_int8_skip_modules``
    (names, suffixes or regexes of modules; everything inside one is kept too). None (the default)
    keeps :func:`full_precision_modules`: the output layer, the task heads and a pooler, as
    transformers + bitsandbytes keep the output layer; a list replaces that default, as in
    transformers (``[]`` quantises every linear layer, the output layer included). An output layer
    left in full precision becomes a :class:`~fastpeft.nn.DenseLinear` (the same parameters, a
    faster inference; :func:`dense_output_layers`).
    """
    if skip_modules is not None and (isinstance(skip_modules, str) or
                                     not all(isinstance(m, str) for m in skip_modules)):
        raise TypeError(f"quantize_model: skip_modules must be a list of module names (or None), "
                        f"not {skip_modules!r}")
    for entry in skip_modules or ():
        try:
            re.compile(entry)
        except re.error as e:
            raise ValueError(f"quantize_model: skip_modules entry {entry!r} is not a valid pattern ({e})") from None
    skip = full_precision_modules(model) if skip_modules is None else list(skip_modules)
    for name in quantized_module_names(model, skip):
        module = model.get_submodule(name)
        replace_module(model, name, Linear4bit.from_linear(module, blocksize, double_quant, quant_storage))
    dense_output_layers(model)
    return model


def dense_output_layers(model: nn.Module) -> list[str]:
    """Make each output layer (``get_output_embeddings()``) that is a plain ``nn.Linear`` a
    :class:`~fastpeft.nn.DenseLinear`, in place (the same module and parameters: a tied weight
    stays tied, hooks stay); the names converted. A 4-bit model reads this layer's full-precision
    weight whole at every generated token: SmolLM2-135M's is 56.6 MB, more than its 210 NF4 layers
    together. transformers' ``resize_token_embeddings`` builds a new ``nn.Linear``: call this
    again after it."""
    own = {n for n, _ in own_modules(model)}  # not inside fastpeft's wrappers, which hold their base themselves
    names = sorted(n for n in output_layer_names(model) & own if type(model.get_submodule(n)) is nn.Linear)
    for name in names:
        DenseLinear.make_dense(model.get_submodule(name))
    return names


def quantized_module_names(model: nn.Module, skip_modules: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers :func:`quantize_model` replaces when it keeps `skip_modules`."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _skipped(name, skip_modules)]


_QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
# A 4-bit linear's keys, bitsandbytes' (the double-quantisation pair only when double-quantised)
_LINEAR4BIT_KEYS = (".weight", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                    ".weight.nested_quant_map", _QUANT_STATE_SUFFIX, ".bias")
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint, in order: model.safetensors, or the shards its
    model.safetensors.index.json names (never a pickle)."""
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(single):
        return [single]
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if not os.path.exists(index):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(directory, shard) for shard in dict.fromkeys(weight_map.values())]


def _check_bnb_quantization_config(qc, directory: str) -> None:
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"{directory}: config.json has no bitsandbytes 4-bit quantization_config "
                         f"(got {qc!r}); quantise a full-precision model with fastpeft.quantize_model instead")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{directory}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type')!r} is not supported "
                         "(fastpeft implements NF4 only; fp4 weights are refused, not misread)")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no values) and
    their buffers where they would be (a rotary embedding's inv_freq, computed at build time and
    not in checkpoints, stays right). A model's skeleton, before its weights are streamed in."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _place(model: nn.Module, key: str, tensor: torch.Tensor, directory: str) -> None:
    """Put a checkpoint tensor into the skeleton: a parameter becomes it (in the skeleton's dtype),
    a buffer takes its values."""
    owner, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        module = None
    if module is not None and attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        if old.shape != tensor.shape:
            raise ValueError(f"{directory}: {key} has shape {list(tensor.shape)}; the model expects {list(old.shape)}")
        module._parameters[attr] = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
    elif module is not None and attr in module._buffers and attr not in module._non_persistent_buffers_set:
        old = module._buffers[attr]
        if old is not None and old.shape != tensor.shape:
            raise ValueError(f"{directory}: {key} has shape {list(tensor.shape)}; the model expects {list(old.shape)}")
        module._buffers[attr] = tensor if old is None else tensor.to(old.dtype)
    else:
        raise ValueError(f"{directory}: checkpoint key {key!r} names nothing in a {type(model).__name__}")


def load_quantized_model(directory: str, auto_class=None) -> nn.Module:
    """A transformers model that bitsandbytes/transformers saved in 4 bits (NF4), with fastpeft
    :class:`Linear4bit` layers in place of bitsandbytes' (bitsandbytes is not needed).

    Reads ``config.json`` (its ``quantization_config`` must be bitsandbytes NF4) and the
    safetensors weights, one file (``model.safetensors``) or the shards a
    ``model.safetensors.index.json`` names. The skeleton is built with its parameters on the meta
    device (no memory), and the checkpoint streamed into it a tensor at a time: every linear saved
    with a ``weight.quant_state.bitsandbytes__nf4`` key becomes a ``Linear4bit`` holding those
    bytes once its tensors are read (they may span shards), every other tensor becomes the
    parameter or buffer its key names. The memory used is the 4-bit model plus a tensor in flight,
    never a full-precision copy or a whole shard on top. auto_class: the transformers auto class
    (default ``AutoModelForCausalLM``).
    """
    import transformers as tf
    from safetensors import safe_open
    from transformers.initialization import no_init_weights

    config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
    _check_bnb_quantization_config(getattr(config, "quantization_config", None), directory)
    files = _checkpoint_files(directory)
    keys = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:  # the headers only
            keys.update({k: path for k in f.keys()})
    quantized = sorted(k[: -len(_QUANT_STATE_SUFFIX)] for k in keys if k.endswith(_QUANT_STATE_SUFFIX))
    if not quantized:
        raise ValueError(f"{directory}: no weight carries a '{_QUANT_STATE_SUFFIX[1:]}' key; not a 4-bit checkpoint")
    del config.quantization_config  # the skeleton is plain; its linears are replaced below
    with no_init_weights(), _parameters_on_meta():
        model = (auto_class or tf.AutoModelForCausalLM).from_config(config)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name in quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{directory}: checkpoint key {name + _QUANT_STATE_SUFFIX!r} names no module of a "
                             f"{type(model).__name__}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{directory}: {name} is a {type(module).__name__}, not a linear layer")
        pending[name] = {}
    owners = {}  # checkpoint key -> the quantised linear it belongs to
    for key in keys:
        for suffix in _LINEAR4BIT_KEYS:
            if key.endswith(suffix) and key[: -len(suffix)] in pending:
                owners[key] = key[: -len(suffix)]
    wanted = {name: {k for k, o in owners.items() if o == name} for name in pending}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if keys[key] != path:
                    continue  # a key two shards hold: the one the header scan kept
                tensor = f.get_tensor(key)
                name = owners.get(key)
                if name is None:
                    _place(model, key, tensor, directory)
                    continue
                pending[name][key[len(name) + 1:]] = tensor
                if len(pending[name]) == len(wanted[name]):  # all of this layer's tensors read: build it
                    _replace_with_4bit(model, name, pending.pop(name), directory)
                del tensor
    tied = _tied_keys(model, config)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta and n not in tied]
    if missing:
        raise ValueError(f"{directory}: checkpoint does not fit a {type(model).__name__}: missing keys {missing[:5]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    dense_output_layers(model)
    return model.eval()


def _replace_with_4bit(model: nn.Module, name: str, state: dict[str, torch.Tensor], directory: str) -> None:
    module = model.get_submodule(name)
    try:
        layer = Linear4bit.from_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{directory}: {name}.weight: {e}") from None
    if (layer.out_features, layer.in_features) != (module.out_features, module.in_features):
        raise ValueError(f"{directory}: {name}.weight holds a [{layer.out_features}, {layer.in_features}] "
                         f"weight; the model expects [{module.out_features}, {module.in_features}]")
    if (module.bias is None) != (layer.bias is None):
        raise ValueError(f"{directory}: {name}: the model's layer {'has' if module.bias is not None else 'has no'} "
                         "bias; the checkpoint disagrees")
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.to(module.bias.dtype)
    replace_module(model, name, layer)


def save_quantized_model(model: nn.Module, directory: str, max_shard_size: int | str = "50GB") -> None:
    """Write a model with fastpeft ``Linear4bit`` layers as bitsandbytes/transformers write a 4-bit
    model (``config.json`` with a bitsandbytes ``quantization_config``, the weights under
    bitsandbytes' keys), so ``transformers.AutoModelForCausalLM.from_pretrained`` (with
    bitsandbytes installed) and :func:`load_quantized_model` read it. As transformers'
    ``save_pretrained``: one ``model.safetensors`` when the weights fit in `max_shard_size` (bytes,
    or a string such as ``"5GB"``, ``"200MB"``; default transformers' 50GB), else shards
    ``model-00001-of-0000N.safetensors`` of at most that size (a bigger tensor alone in its own)
    and ``model.safetensors.index.json`` naming each tensor's shard; shards and files of an earlier
    save that this one does not write are removed. A shard is written at a time (the memory
    above the model is one shard). Everything is checked before anything is written; the model's
    own config is not changed."""
    from huggingface_hub import split_torch_state_dict_into_shards

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
        "bnb_4bit_quant_storage": str(storage.pop()).split(".")[-1], "_load_in_4bit": True, "_load_in_8bit": False,
        # the linear layers left in full precision, by full name, so that transformers leaves exactly
        # these unquantised ([] when every one is 4-bit; None would make it keep its own default)
        "llm_int8_skip_modules": [n for n, m in own_modules(model) if isinstance(m, nn.Linear)]}
    tied = _tied_keys(model, config)
    # a tied output layer is written once, under the embedding's key, as transformers writes it
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in tied}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    for shard, names in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in names}, os.path.join(directory, shard), metadata={"format": "pt"})
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": count_parameters(model)[1], **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(index_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # an earlier save's files that this one replaced: a stale model.safetensors would be read first
    for entry in os.listdir(directory):
        stale = (entry == WEIGHTS_NAME or entry == WEIGHTS_INDEX_NAME or _SHARD_NAME.fullmatch(entry)) and \
            entry not in split.filename_to_tensors and not (entry == WEIGHTS_INDEX_NAME and split.is_sharded)
        if stale:
            os.remove(os.path.join(directory, entry))


def _tied_keys(model: nn.Module, config) -> set[str]:
    """State-dict keys transformers ties to another (the output layer to the embedding), if tied."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())
