"""Adapter checkpoints in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` (the adapter name removed), DoRA's
``base_model.model.<module>.lora_magnitude_vector``, the weights of modules_to_save under
``base_model.model.<module>.<param>``, and biases when the config trains them. Loading never runs
code from a file (safetensors, or a legacy ``adapter_model.bin`` through
``torch.load(weights_only=True)``), checks every key and shape before touching the model, and
saving is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types

import torch
import torch.nn as nn

from .config import CONFIG_NAME, PREFIX, LoraConfig
from .distributed import full_tensor
from .distributed import is_main_process as is_rank_zero
from .methods import (ADAPTERS_CHANGED, add_adapter, adapters_of, get_peft_model, load_config, method_for, method_of,
                      set_adapter)
from .nn.lora import LoRALinear
from .nn.modules_to_save import ModulesToSaveWrapper
from .targeting import (find_modules_to_save, find_targets, layer_features, own_modules,
                        refuse_targets_inside_modules_to_save, with_task_heads)

WEIGHTS_NAME = "adapter_model.safetensors"
# DoRA's magnitude vector in a checkpoint: base_model.model.<module>.lora_magnitude_vector, as PEFT
# writes it (its layer holds the vector as lora_magnitude_vector.<adapter>.weight; it saves it
# without the ".weight" and adds it back when loading).
DORA_KEY = "lora_magnitude_vector"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read; nothing was changed."""


def _base_bias(name: str) -> bool:
    """A bias of the model itself (what bias="all" trains), not one inside a modules_to_save copy."""
    return name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's checkpoint keys."""
    configs = adapters_of(model)
    if adapter_name not in configs:
        raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        return method_for(config).state_dict(model, adapter_name)
    state = {}
    for name, module in own_modules(model):
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            state[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
            state[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
            if module.uses_dora(adapter_name):  # PEFT's key: no ".weight" (its DoRA layer kept the old name)
                state[f"{PREFIX}{name}.{DORA_KEY}"] = module.lora_magnitude_vector[adapter_name].weight
            if config.bias == "lora_only" and module.bias is not None:
                state[f"{PREFIX}{name}.base_layer.bias"] = module.bias
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k, v in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                state[f"{PREFIX}{name}.{k}"] = v
    if config.bias == "all":
        for name, param in model.named_parameters():
            if _base_bias(name):
                state[PREFIX + name] = param
    return state


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _saved_config(model: nn.Module, config):
    """The config as PEFT writes it: inference_mode true, base_model_name_or_path the model's own
    when unset, and, for a config without a task_type, auto_mapping naming the model's class (what
    PEFT's AutoPeftModel reads) unless already set."""
    changes = {"inference_mode": True} if hasattr(config, "inference_mode") else {}
    if getattr(config, "base_model_name_or_path", 0) is None and getattr(model, "name_or_path", None):
        changes["base_model_name_or_path"] = model.name_or_path  # what transformers and AutoPeftModel load first
    if hasattr(config, "task_type") and config.task_type is None and getattr(config, "auto_mapping", 0) is None:
        changes["auto_mapping"] = {"base_model_class": type(model).__name__,
                                   "parent_library": type(model).__module__}
    return dataclasses.replace(config, **changes) if changes else config


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    file system cannot, and nothing was done."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(staging: str, directory: str) -> None:
    """Put folder `staging` where folder `directory` is; the old one is removed. Either the old or
    the new checkpoint is at `directory` at every moment, an error or a crash included: one atomic
    exchange where the system has it, else two renames, the first undone if the second fails."""
    if _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)  # now the old checkpoint; the new one is in place
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    old = os.path.join(retired, "old")
    os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(old, directory)
        os.rmdir(retired)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_main_process: bool | None = None) -> None:
    """Write adapter `adapter_name` to `directory` in PEFT's format, atomically.

    Files are written to a fresh folder beside `directory`, synced, and the folder swapped in
    (:func:`_swap_in`); other files already in `directory` (a tokenizer, say) are carried over.
    Whatever fails, `directory` holds the old checkpoint or the new one, never a mix or nothing.

    Under ``torch.distributed`` only the main process writes (`is_main_process`; default: rank 0,
    or True without a process group). A model sharded by FSDP2 (:func:`fastpeft.shard_model`)
    holds shards of the adapter: they are gathered into the full tensors first, which every rank
    takes part in, so every rank calls this.
    """
    from safetensors.torch import save_file

    state = {k: full_tensor(v.detach()).to("cpu").contiguous().clone()
             for k, v in adapter_state_dict(model, adapter_name).items()}
    if not (is_rank_zero() if is_main_process is None else is_main_process):
        return
    directory = os.path.realpath(directory)  # a link to the checkpoint folder: save into what it names
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.saving-", dir=parent)
    try:
        save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        _saved_config(model, adapters_of(model)[adapter_name]).save(staging)
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(os.path.join(staging, f))
        if os.path.isdir(directory):
            for entry in os.listdir(directory):  # keep what else lives there
                if entry not in (WEIGHTS_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME):
                    src = os.path.join(directory, entry)
                    (os.link if os.path.isfile(src) else shutil.copytree)(src, os.path.join(staging, entry))
            _swap_in(staging, directory)
        else:
            os.rename(staging, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# transformers' name for a sharded checkpoint's index; Trainer's resume reads it (see save_pretrained).
RESUME_INDEX_NAME = "model.safetensors.index.json"


def save_pretrained(model: nn.Module, save_directory: str, selected_adapters: list[str] | None = None,
                    is_main_process: bool | None = None, push_to_hub: bool = False, **ignored) -> None:
    """``model.save_pretrained`` of a model holding fastpeft adapters, as a ``peft.PeftModel`` saves:
    each adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), the one
    named "default" in `save_directory`, the others in ``save_directory/<name>``; never the base
    weights, and no ``config.json``, so transformers cannot read the folder as a whole model with its
    projections re-initialised. transformers' Trainer calls this for every checkpoint and for
    ``save_model()``; ``PeftModel.from_pretrained``, :func:`load_adapter` and, with
    ``base_model_name_or_path`` set, ``AutoModelFor*.from_pretrained`` read what it writes.

    For Trainer's ``resume_from_checkpoint`` (which reads adapters back only into a ``PeftModel``)
    an index in transformers' sharded-checkpoint format names the active adapter's file; the
    model's load hook (:func:`attach_saving`) reads PEFT's keys there. Live tensors are written:
    a `state_dict` Trainer passes (``**ignored``, like ``safe_serialization``: always safetensors)
    is not used.

    Under ``torch.distributed`` only the main process writes (`is_main_process`, as Trainer passes
    it; default: rank 0). An FSDP2-sharded model's adapters are gathered on every rank first (see
    :func:`save_adapter`), so every rank calls this."""
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True): fastpeft writes locally only; push the folder yourself")
    main = is_rank_zero() if is_main_process is None else is_main_process
    names = list(selected_adapters or adapters_of(model))
    unknown = [n for n in names if n not in adapters_of(model)]
    if unknown:
        raise KeyError(f"save_pretrained: no adapter named {unknown[0]!r}; adapters: {sorted(adapters_of(model))}")
    for name in sorted(names, key=lambda n: n != "default"):  # the root first: later saves keep subfolders
        save_adapter(model, save_directory if name == "default" else os.path.join(save_directory, name), name,
                     is_main_process=main)
    active = getattr(model, "fastpeft_active_adapter", None)
    if main and active in names:
        weights = WEIGHTS_NAME if active == "default" else f"{active}/{WEIGHTS_NAME}"
        module_keys = _module_keys(model, active)
        index = {"metadata": {"format": "fastpeft adapter, PEFT keys (model.load_state_dict reads them)"},
                 "weight_map": {module_keys.get(k, k): weights for k in adapter_state_dict(model, active)}}
        with open(os.path.join(save_directory, RESUME_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)


def _module_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """PEFT checkpoint key -> the model's own state_dict key of the same tensor, for one adapter."""
    own = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {k: own[id(t)] for k, t in adapter_state_dict(model, adapter_name).items() if id(t) in own}


def _read_peft_keys(model: nn.Module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: PEFT's keys of the active adapter (``base_model.model.<module>...``)
    become the model's own, so ``model.load_state_dict(peft_weights, strict=False)`` loads them."""
    active = getattr(model, "fastpeft_active_adapter", None)
    if prefix or active is None or not any(k.startswith(PREFIX) for k in state_dict):
        return
    for peft_key, own_key in _module_keys(model, active).items():
        if peft_key in state_dict:
            state_dict[own_key] = state_dict.pop(peft_key)


def attach_saving(model: nn.Module) -> None:
    """Make a transformers model's ``save_pretrained`` write its fastpeft adapters (see
    :func:`save_pretrained`) while it holds some, and its own again once it holds none."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return  # not a transformers model: nothing saves it by that name
    hook = model.__dict__.pop("_fastpeft_load_hook", None)
    if hook is not None:
        hook.remove()
    model.__dict__.pop("save_pretrained", None)
    if adapters_of(model):
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
        model.__dict__["_fastpeft_load_hook"] = model.register_load_state_dict_pre_hook(_read_peft_keys)


ADAPTERS_CHANGED.append(attach_saving)


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in `directory` (safetensors, or a legacy .bin read as plain
    tensors only); a CheckpointError when missing or unreadable."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.exists(st_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st_path} is corrupt or truncated ({e})") from None
    if os.path.exists(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as e:
            raise CheckpointError(f"{bin_path} cannot be read as plain tensors ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{bin_path} does not hold a flat dict of tensors")
        return state
    raise CheckpointError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")


def _peft_bias_copies(name: str, module: nn.Module) -> dict[str, tuple[str, str]]:
    """PEFT's extra keys for a module to save when bias="all": its bias sweep also writes each bias of
    the wrapper's frozen original and of its trained copy (``<name>.original_module.<k>``,
    ``<name>.modules_to_save.<k>``, beside ``<name>.<k>``). key -> ("original" or "copy", k).
    fastpeft reads them (as PEFT loads them); it does not write them, and PEFT reads files without."""
    source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
    keys = {}
    for k, _ in source.named_parameters():
        if k.endswith("bias"):
            keys[f"{PREFIX}{name}.original_module.{k}"] = ("original", k)
            keys[f"{PREFIX}{name}.modules_to_save.{k}"] = ("copy", k)
    return keys


def _expected_shapes(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], dict[str, str], dict]:
    """What a checkpoint of `config` must hold for this model: key -> shape, key -> what it is, and
    the keys it may hold besides (PEFT's bias copies) -> shape."""
    config = with_task_heads(config)
    targets, config = find_targets(model, config)
    shapes, what = {}, {}
    for t in targets:
        in_f, out_f, _ = layer_features(t.module)
        shapes[f"{PREFIX}{t.name}.lora_A.weight"] = (t.r, in_f)
        shapes[f"{PREFIX}{t.name}.lora_B.weight"] = (out_f, t.r)
        what[f"{PREFIX}{t.name}.lora_A.weight"] = what[f"{PREFIX}{t.name}.lora_B.weight"] = f"rank {t.r}"
        if config.use_dora:
            shapes[f"{PREFIX}{t.name}.{DORA_KEY}"] = (out_f,)
            what[f"{PREFIX}{t.name}.{DORA_KEY}"] = "use_dora"
        bias = getattr(t.module, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            shapes[f"{PREFIX}{t.name}.base_layer.bias"] = tuple(bias.shape)
    optional = {}
    to_save = find_modules_to_save(model, config)
    refuse_targets_inside_modules_to_save(targets, to_save)
    for name, module in to_save:
        source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for k, v in source.state_dict().items():
            shapes[f"{PREFIX}{name}.{k}"] = tuple(v.shape)
        if config.bias == "all":
            for key, (_, k) in _peft_bias_copies(name, module).items():
                optional[key] = shapes[f"{PREFIX}{name}.{k}"]
    if config.bias == "all":
        to_wrap = {t.name for t in targets if not isinstance(t.module, LoRALinear)}
        for name, param in model.named_parameters():
            if _base_bias(name):
                owner = name[: -len(".bias")]
                # once wrapped, an adapted layer's bias lives at <layer>.base_layer.bias (PEFT's key too)
                shapes[PREFIX + (f"{owner}.base_layer.bias" if owner in to_wrap else name)] = tuple(param.shape)
    return shapes, what, optional


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple], what: dict[str, str],
                 optional: dict[str, tuple] | None = None) -> None:
    """Every expected key present with its shape and a floating dtype, no other key but `optional`
    ones (with their shapes)."""
    for key in sorted(expected):
        if key not in state:
            raise CheckpointError(f"checkpoint is missing key {key!r} (expected shape {list(expected[key])})")
    expected = {**(optional or {}), **expected}
    for key in sorted(state):
        if key not in expected:
            raise CheckpointError(f"checkpoint has unexpected key {key!r}: no such adapter tensor in this model "
                                  "for its adapter_config.json")
        if tuple(state[key].shape) != tuple(expected[key]):
            extra = f" ({what[key]} in adapter_config.json)" if key in what else ""
            raise CheckpointError(f"checkpoint key {key!r} has shape {list(state[key].shape)} but the model expects "
                                  f"{list(expected[key])}{extra}")
        if not state[key].is_floating_point():
            raise CheckpointError(f"checkpoint key {key!r} has dtype {state[key].dtype}; expected floating point")


def _load_method_adapter(model: nn.Module, directory: str, config, adapter_name: str, is_trainable: bool
                         ) -> nn.Module:
    """load_adapter for a method of :mod:`fastpeft.methods` (one adapter per model)."""
    if adapters_of(model):
        raise CheckpointError(f"the model already has adapters {sorted(adapters_of(model))}; a "
                              f"{type(config).__name__} adapter must be the model's only one")
    method = method_for(config)
    state = read_weights(directory)
    try:
        expected = method.expected_shapes(model, config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(directory, CONFIG_NAME)} does not fit this model: {e}") from None
    _check_state(state, expected, {})
    model = get_peft_model(model, config, adapter_name)
    own = method.state_dict(model, adapter_name)
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    if not is_trainable:
        for p in own.values():
            p.requires_grad_(False)
        model.eval()  # as PEFT's load_adapter: an adapter loaded for inference runs without dropout
    return model


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False
                 ) -> nn.Module:
    """Load an adapter written by PEFT or fastpeft into `model` as `adapter_name`; return the model.

    Everything is checked first (config, file integrity, every key and shape); on any problem a
    :class:`CheckpointError` names the first bad key and what was expected, and the model is left
    exactly as it was. A LoRA adapter becomes active if the model had none; an adapter of another
    method (:mod:`fastpeft.methods`) must be the model's only one. Parameters are trainable only
    with ``is_trainable=True``, and without it the model is put in eval mode (both as in PEFT).
    """
    if adapter_name in adapters_of(model):
        raise CheckpointError(f"adapter {adapter_name!r} already exists in the model; pick another adapter_name")
    try:
        config = load_config(directory)
    except (ValueError, OSError, TypeError) as e:  # a missing file or folder, bad JSON, a bad field
        raise CheckpointError(str(e)) from None
    if not isinstance(config, LoraConfig):
        return _load_method_adapter(model, directory, config, adapter_name, is_trainable)
    other = method_of(model)
    if other is not None:
        raise CheckpointError(f"the model already has adapters {sorted(adapters_of(model))} "
                              f"({other.config_cls.__name__}), which must be its only one; load this LoRA adapter "
                              "into the base model")
    state = read_weights(directory)
    try:
        expected, what, optional = _expected_shapes(model, config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(directory, CONFIG_NAME)} does not fit this model: {e}") from None
    _check_state(state, expected, what, optional)
    previous_active = getattr(model, "fastpeft_active_adapter", None)
    add_adapter(model, config, adapter_name)
    own = adapter_state_dict(model, adapter_name)
    if optional:  # PEFT's bias copies load where PEFT loads them
        for name, module in own_modules(model):
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for key, (where, k) in _peft_bias_copies(name, module).items():
                    holder = module.original_module if where == "original" else module.modules_to_save[adapter_name]
                    own[key] = holder.get_parameter(k)
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    set_adapter(model, previous_active or adapter_name)
    if not is_trainable:
        for p in own.values():
            p.requires_grad_(False)
        model.eval()  # as PEFT's load_adapter: an adapter loaded for inference runs without dropout
    return model
