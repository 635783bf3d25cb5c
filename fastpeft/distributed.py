"""Training past one process: FSDP2 (``torch.distributed.fsdp.fully_shard``) over a (Q)LoRA model,
the 4-bit base sharded across ranks like any parameter.

:func:`shard_model` is what to call (once per rank, after the adapters are added or loaded, before
the optimizer is built)::

    model = fastpeft.quantize_model(AutoModelForCausalLM.from_pretrained(...))   # or load_quantized_model
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=16, target_modules="all-linear"))
    fastpeft.shard_model(model)            # fully_shard on every decoder layer, then the root

What FSDP2 then does with a :class:`~fastpeft.nn.Linear4bit`: its ``weight`` (the packed NF4
bytes, a frozen uint8 or bf16 parameter) is cut in dim 0 across the ranks; each decoder layer's
parameters are all-gathered (in one collective, whatever their dtypes) just before its forward,
freed after it, and gathered again for its backward; the fused NF4 kernels run on the gathered
bytes. :meth:`Linear4bit.shard_quant_state` (which ``shard_model`` calls) makes the per-block
scales a parameter too, so they are sharded and gathered with the bytes; the 16 NF4 levels and
double quantisation's 256-entry table and second-level scales (one float per 256 blocks) stay
replicated buffers. LoRA's A and B are sharded like any trainable parameter and their gradients
reduce-scattered. :func:`fastpeft.save_adapter` and ``model.save_pretrained`` gather the adapter's
shards on every rank and write the full tensors from rank 0, in PEFT's format.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .nn.linear4bit import Linear4bit


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class transformers names in the model's
    ``_no_split_modules`` (``LlamaDecoderLayer``...), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for module in model.modules():
        if type(module).__name__ in names and not any(module in set(f.modules()) for f in found):
            found.append(module)
    return found


def shard_model(model: nn.Module, layers: list[nn.Module] | None = None, *, mesh=None,
                reshard_after_forward: bool = True, mp_policy=None, offload_policy=None) -> nn.Module:
    """FSDP2 over `model`, in place: every :class:`Linear4bit`'s scales made shardable
    (:meth:`Linear4bit.shard_quant_state`), ``fully_shard`` on each of `layers` (default: the
    decoder layers, :func:`decoder_layers`) and then on the root, with the keyword arguments
    given. Needs ``torch.distributed`` initialised (``torchrun``). Returns the model.

    A mixed-precision policy casts every floating parameter to its ``param_dtype`` for the
    all-gather: 4-bit weights stored as another floating dtype (``quant_storage=torch.float16``
    under a bf16 policy) would be different bytes after the cast, so they are refused here;
    ``quant_storage=torch.uint8`` (the default) is never cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype is not None:
        cast = sorted({str(m.weight.dtype) for m in quantized
                       if m.weight.dtype.is_floating_point and m.weight.dtype != param_dtype})
        if cast:
            raise ValueError(f"shard_model: the mixed-precision policy casts parameters to {param_dtype}, which "
                             f"would rewrite 4-bit weights stored as {', '.join(cast)}; quantise with "
                             f"quant_storage=torch.uint8 or quant_storage={param_dtype}")
    if layers is None:
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"shard_model: {type(model).__name__} names no decoder layer class in "
                             "_no_split_modules; pass layers= (the modules to shard one by one)")
    for m in quantized:
        m.shard_quant_state()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=offload_policy or OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t`: a DTensor's shards gathered (a collective: every rank of its mesh must call
    this, in the same order), anything else as it is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def is_main_process() -> bool:
    """Rank 0 of the default process group, or True without one."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


__all__ = ["shard_model", "decoder_layers", "full_tensor", "is_main_process"]
