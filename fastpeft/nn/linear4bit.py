"""Linear4bit: an ``nn.Linear`` whose frozen weight is stored in NF4 (bitsandbytes' format)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.nf4_matmul import dequantize_packed, nf4_linear, nf4_linear_plan
from ..quant.nf4 import NF4Weight, dequantize_nf4, nf4_from_state_dict, quantize_nf4
from .dtypes import autocast_enabled, compute_dtype, is_dtensor
from .op_plans import PLAN_ATTRIBUTE, HeldPlan, call_on_new_plan

# The quantisation state's tensors, registered as buffers under these names; in the state dict they
# are bitsandbytes' ``weight.<name>`` keys.
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _absmax_bytes(absmax: torch.Tensor) -> torch.Tensor:
    """The scales' bytes as a sharded layer holds them: float32 scales as ``[blocks, 4]`` uint8 (a
    row per scale), uint8 codes as they are."""
    if absmax.dtype == torch.uint8:
        return absmax
    return absmax.reshape(-1, 1).view(torch.uint8)


class Linear4bit(nn.Module):
    """``y = x·Wᵀ + b`` with W in NF4 (0.5 byte per weight plus one float32 absmax per block).

    Build it with :meth:`from_linear` (quantises), :meth:`from_bnb` (a bitsandbytes ``Linear4bit``)
    or :meth:`from_state_dict`. The weight is real module state, as bitsandbytes' is: ``weight`` a
    frozen parameter holding the packed bytes (``[(out·in + 1) // 2 / itemsize, 1]`` of the storage
    dtype), the quantisation state buffers (``absmax``, ``quant_map``, ``nested_absmax``,
    ``nested_quant_map``), so ``state_dict`` (bitsandbytes' keys: ``weight``, ``weight.absmax``...,
    ``weight.quant_state.bitsandbytes__nf4``), ``.to()``, DDP's broadcast, FSDP and memory counts
    all see it. ``.half()`` and friends never convert it (the bytes and scales keep their dtypes).
    The bias (if any) is a regular parameter, frozen.
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

    @property
    def q(self) -> NF4Weight:
        """The weight as the NF4 ops take it, over the module's current tensors (whatever .to(),
        DDP or FSDP put there since). Built again only when one of those tensors was replaced: a
        decode step calls hundreds of layers, and building it each call cost 3.6 µs of a 64×64
        layer's 34 µs (AMD EPYC Zen 4, one thread)."""
        params, buffers = self._parameters, self._buffers
        weight = params["weight"]
        absmax = params["absmax"] if self.quant_state_sharded else buffers["absmax"]
        held = self.__dict__.get("_nf4_view")
        if (held is not None and held[0] is weight and held[1] is absmax and held[2] is buffers["quant_map"]
                and held[3] is buffers["nested_absmax"] and held[4] is buffers["nested_quant_map"]):
            return held[5]
        if weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"Linear4bit: the packed NF4 weight was stored as {self.quant_storage} but is now {weight.dtype}: "
                "something cast its bytes as numbers (FSDP2's MixedPrecisionPolicy(param_dtype=...) casts every "
                "floating parameter whose dtype differs from param_dtype). Quantise with quant_storage=torch.uint8 "
                "(never cast) or with the param_dtype as quant_storage")
        view = NF4Weight(weight, self._absmax_of(absmax), self.blocksize, self.weight_shape, self.weight_dtype,
                         buffers["quant_map"], buffers["nested_absmax"], buffers["nested_quant_map"],
                         self.absmax_offset, self.nested_blocksize)
        if not (is_dtensor(weight) or is_dtensor(absmax)):  # a sharded layer's view is rebuilt when asked
            self.__dict__["_nf4_view"] = (weight, absmax, buffers["quant_map"], buffers["nested_absmax"],
                                          buffers["nested_quant_map"], view)
        return view

    @q.setter
    def q(self, q: NF4Weight) -> None:
        """Hold `q` (a new quantisation of a weight of this layer's shape): its tensors become the
        module's parameter and buffers."""
        if hasattr(self, "out_features") and tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: a [{', '.join(map(str, q.shape))}] weight cannot replace this layer's "
                             f"[{self.out_features}, {self.in_features}] one")
        sharded = self.__dict__.get("quant_state_sharded", False)
        self.__dict__.pop(PLAN_ATTRIBUTE, None)
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self.quant_storage, self.absmax_dtype = q.packed.dtype, q.absmax.dtype
        for name in _STATE_BUFFERS:
            if name == "absmax" and sharded:
                self._buffers.pop("absmax", None)
                self.absmax = nn.Parameter(_absmax_bytes(q.absmax), requires_grad=False)
            else:
                self._parameters.pop(name, None)
                self.register_buffer(name, getattr(q, name))
        self.blocksize, self.weight_shape, self.weight_dtype = q.blocksize, torch.Size(q.shape), q.dtype
        self.absmax_offset, self.nested_blocksize = q.offset, q.nested_blocksize

    quant_state_sharded = False

    def shard_quant_state(self, enabled: bool = True) -> "Linear4bit":
        """Hold the per-block scales (``absmax``) as a frozen parameter instead of a buffer, so that
        FSDP2 (``fully_shard``), which shards parameters and replicates buffers, shards them with
        the packed bytes and gathers both in the same all-gather. The parameter holds the scales'
        bytes (uint8; ``[blocks, 4]`` for float32 scales, a row per scale so a shard never splits
        one): a mixed-precision policy casts floating parameters, never these. ``state_dict`` is
        unchanged (bitsandbytes' keys, float32 ``weight.absmax``). The 16 NF4 levels and double
        quantisation's second-level tables (one float per 256 blocks) stay buffers. Returns self."""
        if self.quant_state_sharded == enabled:
            return self
        if is_dtensor(self._parameters["weight"]):
            raise RuntimeError("Linear4bit.shard_quant_state: the layer is already sharded; call it before fully_shard")
        q = self.q
        self.__dict__["quant_state_sharded"] = enabled
        self.q = q
        return self

    def _absmax_of(self, held: torch.Tensor) -> torch.Tensor:
        """The scales as the NF4 format has them (float32, or uint8 codes when double-quantised) from
        what the layer holds (with sharded scales: their bytes, ``[blocks, 4]`` uint8, or a DTensor
        shard of them)."""
        if not self.quant_state_sharded or self.absmax_dtype == torch.uint8:
            return held
        if is_dtensor(held):
            from torch.distributed.tensor import DTensor

            blocks = held.shape[0]
            return DTensor.from_local(held.to_local().view(self.absmax_dtype).reshape(-1), held.device_mesh,
                                      held.placements, run_check=False, shape=torch.Size([blocks]), stride=(1,))
        return held.view(self.absmax_dtype).reshape(-1)

    def block_absmax(self) -> torch.Tensor:
        return self.q.block_absmax()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in full precision: ``[out, in]`` in the original dtype (a new tensor)."""
        return dequantize_nf4(self.q)

    def _nf4_tables(self) -> list[tuple[str, dict]]:
        """(name, the dict that holds it) for each NF4 tensor: the packed bytes and the quantisation state."""
        return [(name, self._parameters if name in self._parameters else self._buffers)
                for name in ("weight", *_STATE_BUFFERS)]

    def _apply(self, fn, recurse=True):
        # .half(), .to(bfloat16)... would convert bf16-stored bytes and the float32 scales: the NF4
        # tensors only go where fn sends a tensor of their device (meta ones, as to_empty makes
        # them: new, uninitialised), keeping their dtypes; the rest gets fn.
        self.drop_op_plan()
        tables = self._nf4_tables()
        held = {name: table.pop(name) for name, table in tables}
        try:
            super()._apply(fn, recurse)
        finally:
            weight = held["weight"]
            device = fn(torch.empty(0, device=weight.device)).device
            for name, table in tables:
                t = held[name]
                if t is not None and t.device != device:
                    t = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
                    if table is self._parameters:
                        t = nn.Parameter(t, requires_grad=False)
                table[name] = t
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.q.state_dict("weight").items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.drop_op_plan()
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
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
            here = self._parameters["weight"]
            if is_dtensor(here):
                error = self._load_into_shards(q)
                if error:
                    error_msgs.append(f"{prefix}weight: {error}")
                    return
            elif local_metadata.get("assign_to_params_buffers", False) or here.is_meta:
                self.q = q  # assign=True, or a layer on the meta device: take the tensors as they are
            else:
                self.q = q.to(here.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        # The rest (the bias, hooks, unexpected keys) as any module loads it, the NF4 tensors given
        # as what the layer now holds: they are read above, under bitsandbytes' keys.
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        rest.update({prefix + name: table[name] for name, table in self._nf4_tables() if table[name] is not None})
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _load_into_shards(self, q: NF4Weight) -> str | None:
        """Load a full (or sharded) NF4 weight into this layer while FSDP2 holds it sharded: each
        tensor's values copied into the shard this rank keeps, in place (FSDP2 owns the parameter
        objects). The quantisation layout must be the layer's own. An error message, or None."""
        if (q.blocksize, q.packed.dtype, q.absmax.dtype, q.double_quant) != \
                (self.blocksize, self.quant_storage, self.absmax_dtype, self.nested_absmax is not None):
            return ("a sharded layer loads only a weight quantised as it is (blocksize, storage dtype, double "
                    "quantisation): its tensors are FSDP2's and keep their shapes")
        with torch.no_grad():
            for name, table in self._nf4_tables():
                own, value = table[name], q.packed if name == "weight" else getattr(q, name)
                if value is None:
                    continue
                # sharded scales are held as their bytes (a DTensor of scales: its shard's bytes)
                as_held = _absmax_bytes if name == "absmax" and self.quant_state_sharded else (lambda t: t)
                if not is_dtensor(own):
                    own.copy_(as_held(value.full_tensor() if is_dtensor(value) else value))
                elif is_dtensor(value):
                    own.to_local().copy_(as_held(value.to_local()))
                else:  # the whole tensor on every rank: keep this rank's shard of it (no communication)
                    from torch.distributed.tensor import distribute_tensor

                    own.to_local().copy_(distribute_tensor(as_held(value).to(own.device), own.device_mesh,
                                                           own.placements, src_data_rank=None).to_local())
        self.absmax_offset = q.offset
        self.__dict__.pop("_nf4_view", None)
        self.drop_op_plan()
        return None

    # --------------------------------------------------------------- forward

    def compute_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        """x as the NF4 ops take it ([M, in], unit stride, in the compute dtype: autocast's when it is
        on, else the weight's original dtype), the bias in that dtype, and the dtype."""
        dtype = compute_dtype(x.device.type, self.weight_dtype)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, None if self.bias is None else self.bias.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference on the held op plan: the op's checks of the weight made once; each call checks
        # that the layer still holds what the plan was made from, and x (HeldPlan.call: one C++
        # call, which torch.compile cannot trace).
        held = self.__dict__.get(PLAN_ATTRIBUTE)
        y = None if held is None or torch.compiler.is_compiling() else held.call(self, x)
        if y is None:
            y = call_on_new_plan(self, held, x)
        return y if y is not None else self.forward_unplanned(x)

    def forward_unplanned(self, x: torch.Tensor) -> torch.Tensor:
        """The forward for any x, every argument checked by the op (what a plan's call equals)."""
        x2, bias, _ = self.compute_inputs(x)
        y = nf4_linear(x2, self.q, bias)  # double quantisation decoded inside the kernels
        return self.output_as_input(y.reshape(*x.shape[:-1], self.out_features), x)

    def op_tensors(self) -> tuple:
        """The tensors the layer's op takes, as it holds them now: the packed bytes, the
        quantisation state and the bias."""
        params, buffers = self._parameters, self._buffers
        return (params["weight"], params["absmax"] if self.quant_state_sharded else buffers["absmax"],
                buffers["quant_map"], buffers["nested_absmax"], buffers["nested_quant_map"],
                params["bias"] if "bias" in params else self.__dict__.get("bias"))

    # What the op plan is made from, read again at every planned call (HeldPlan): the op's tensors
    # and the values the NF4 view of them is built from.
    PLAN_PATHS = (("weight",), ("absmax",), ("quant_map",), ("nested_absmax",), ("nested_quant_map",), ("bias",),
                  ("quant_state_sharded",), ("blocksize",), ("absmax_offset",))

    def op_plan(self, x: torch.Tensor):
        """The layer's :class:`~fastpeft.ops._registry.Plan` for an x of this dtype, made with x (or None: x
        in another dtype than the weight's, which the layer casts; a bias in another dtype; a
        sharded layer). Kept while the layer holds the same tensors (:class:`HeldPlan`): a
        decode step calls hundreds of layers, and the op's checks of the weight cost about 8 us a
        call on a 64x64 layer (AMD EPYC Zen 4, one thread), more than its kernel."""
        held = self.__dict__.get(PLAN_ATTRIBUTE)
        if held is None or not held.holds(self):
            held = self.new_held_plan(x)
        return None if held is None else held.plan

    def new_held_plan(self, x: torch.Tensor) -> HeldPlan | None:
        """A new op plan made with x, held by the layer in place of any it held (None, holding none,
        where no plan applies to the layer or to x)."""
        self.__dict__.pop(PLAN_ATTRIBUTE, None)
        tensors = self.op_tensors()
        bias = tensors[5]
        if (x.dtype is not self.weight_dtype or bias is not None and bias.dtype is not x.dtype
                or x.shape[-1] != self.in_features or any(is_dtensor(t) for t in tensors)):
            return None
        plan = nf4_linear_plan(x.reshape(-1, self.in_features).contiguous(), self.q, bias)
        held = self.__dict__[PLAN_ATTRIBUTE] = HeldPlan(plan, self, self.PLAN_PATHS, self.in_features, self.out_features)
        return held

    def drop_op_plan(self) -> None:
        """Forget the op plan (the next inference call makes a new one)."""
        self.__dict__.pop(PLAN_ATTRIBUTE, None)

    @staticmethod
    def output_as_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y in x's dtype, as bitsandbytes returns it (a bf16 activation over a weight quantised
        from float32 stays bf16 for the next layer); under autocast, autocast's dtype, as nn.Linear."""
        if y.dtype == x.dtype or not x.is_floating_point() or autocast_enabled(x.device.type):
            return y
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}, dtype={self.weight_dtype}")


__all__ = ["Linear4bit", "dequantize_packed"]
