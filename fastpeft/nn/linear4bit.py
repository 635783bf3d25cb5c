"""Linear4bit: an ``nn.Linear`` whose frozen weight is stored in NF4 (bitsandbytes' format)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.nf4_matmul import dequantize_packed, nf4_linear
from ..quant.nf4 import NF4Weight, dequantize_nf4, nf4_from_state_dict, quantize_nf4

_QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class Linear4bit(nn.Module):
    """``y = x·Wᵀ + b`` with W in NF4 (0.5 byte per weight plus one float32 absmax per block).

    Build it with :meth:`from_linear` (quantises), :meth:`from_bnb` (a bitsandbytes ``Linear4bit``)
    or :meth:`from_state_dict`. Its state dict has bitsandbytes' keys, so checkpoints move both
    ways. The weight is frozen; the bias (if any) is a regular parameter.
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"Linear4bit: the weight must be 2-D, got shape {list(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.q = q
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(q.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant, quant_storage), linear.bias)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "Linear4bit":
        q = nf4_from_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "weight")
        return cls(q, state.get(f"{prefix}bias"))

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "Linear4bit":
        """From a bitsandbytes ``Linear4bit`` (its quantised weight, read through its state dict)."""
        return cls.from_state_dict(layer.state_dict())

    # --------------------------------------------------------------- weights

    def block_absmax(self) -> torch.Tensor:
        return self.q.block_absmax()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in full precision: ``[out, in]`` in the original dtype (a new tensor)."""
        return dequantize_nf4(self.q)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.q.dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0))  # where .to()/.cuda() sends tensors; the bytes keep their dtype
        self.q = self.q.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.q.state_dict("weight").items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix + "weight")}
        if own:
            try:
                q = nf4_from_state_dict(own, "weight")
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
                return
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {list(q.shape)} does not match "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            self.q = q.to(self.q.packed.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # --------------------------------------------------------------- forward

    def compute_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        """x as the NF4 ops take it ([M, in], unit stride, in the compute dtype: autocast's when it is
        on, else the weight's original dtype), the bias in that dtype, and the dtype."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.q.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, None if self.bias is None else self.bias.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, bias, _ = self.compute_inputs(x)
        y = nf4_linear(x2, self.q, bias)  # double quantisation decoded inside the kernels
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.q.blocksize}, "
                f"double_quant={self.q.double_quant}, dtype={self.q.dtype}")


def quantize_model(model: nn.Module, double_quant: bool = False, blocksize: int = 64,
                   quant_storage: torch.dtype = torch.uint8, skip_output_layer: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (the output layer kept, as transformers does) by a
    :class:`Linear4bit`, in place; returns the model."""
    from ..peft_model import _output_layer_names
    from ..targeting import replace_module

    skip = _output_layer_names(model) if skip_output_layer else set()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip:
            replace_module(model, name, Linear4bit.from_linear(module, blocksize, double_quant, quant_storage))
    return model


_QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"


def _read_safetensors_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json names (never a pickle)."""
    import json
    import os

    from safetensors.torch import load_file

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

    from ..targeting import replace_module

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
    import copy
    import os

    from safetensors.torch import save_file

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("save_quantized_model: the model has no fastpeft Linear4bit layer (quantize_model first)")
    blocksizes = {m.q.blocksize for m in layers}
    double = {m.q.double_quant for m in layers}
    storage = {m.q.packed.dtype for m in layers}
    if len(double) != 1 or len(storage) != 1:
        raise ValueError("save_quantized_model: transformers' quantization_config holds one double-quant setting "
                         "and one storage dtype; this model mixes them")
    if blocksizes != {64}:
        raise ValueError(f"save_quantized_model: transformers reads blocksize 64 only; the model uses "
                         f"{sorted(blocksizes)}")
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double.pop(), "bnb_4bit_compute_dtype": str(layers[0].q.dtype).split(".")[-1],
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


__all__ = ["Linear4bit", "quantize_model", "dequantize_packed", "load_quantized_model", "save_quantized_model"]
