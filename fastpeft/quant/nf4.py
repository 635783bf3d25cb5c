"""4-bit NormalFloat (NF4) weights in bitsandbytes' exact format.

Layout (bitsandbytes' ``quantize_4bit(quant_type="nf4")``): the weight ``[out, in]`` is flattened
row-major and cut into blocks of ``blocksize`` elements (the last block may be shorter); each
block is divided by its absolute maximum (float32) and every value replaced by the index of the
nearest of 16 NF4 levels (a value exactly between two levels takes the lower one). Two indices
share a byte, the first in the high nibble; the bytes are stored as ``[(numel + 1) // 2, 1]``
uint8, or viewed as another ``quant_storage`` dtype (bf16 for FSDP).

Double quantisation stores the absmax values as ``uint8`` codes of ``absmax - mean(absmax)`` in
the signed 8-bit dynamic map, blockwise over 256 values, with a float32 absmax per 256 and the
mean as ``offset``.

The arithmetic below follows bitsandbytes (CPU) step for step: for the 4-bit codes, multiplication
by the reciprocal of a full block's absmax, division for the short last block, float32 midpoints;
for the nested 8-bit codes, the reciprocal again and a lookup on a 65536-point grid. The goal is
the same bytes, not merely the same values to within rounding.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import torch

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (bitsandbytes' table).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic quantisation map (Dettmers, 8-bit approximations, 2016): for each
    exponent e = 10^-6 … 10^0, 2^i + 1 evenly spaced fractions in [0.1, 1] give 2^i midpoints, both
    signs; plus 0 and 1. 256 float32 values, sorted."""
    values = []
    for i in range(7):
        fractions = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (fractions[:-1] + fractions[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(values, dtype=torch.float32, device=device).sort().values


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1], float32 absmax per block) for a flat float32 tensor."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted code (ties to the lower level)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True)


# bitsandbytes' CPU 8-bit quantiser does not search the code: it maps a normalised value v to one
# of 65536 grid points, trunc((v + 1) * 0.5 * 65535 + 0.5) in float32, and takes that grid point's
# nearest code. Near a midpoint between two codes this can pick the farther one; we copy it to
# write the same bytes (checked on 204,800 random values against the installed bitsandbytes).
_GRID_POINTS = 65536


def _grid_codes(code: torch.Tensor) -> torch.Tensor:
    """The code index nearest to each of the 65536 grid points in [-1, 1] (ties to the lower)."""
    grid = torch.arange(_GRID_POINTS, dtype=torch.float64, device=code.device) / (_GRID_POINTS - 1) * 2 - 1
    midpoints = (code[:-1].double() + code[1:].double()) / 2
    return torch.bucketize(grid, midpoints, right=False)


def dynamic_codes(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic codes of `values` blockwise, as bitsandbytes' CPU quantiser makes them:
    multiply by the reciprocal of the block's absmax, clamp to [-1, 1], look the grid point up."""
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    # bitsandbytes' CPU loop takes a block's max by comparisons, which a NaN never wins: a block of
    # NaNs (absmax - offset when some weight was NaN) gets 0.0, not NaN
    absmax = torch.where(padded.isnan(), 0.0, padded.abs()).max(dim=-1).values
    normed = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1, 1).reshape(-1)[:n]
    grid_index = (((normed + 1) * 0.5) * (_GRID_POINTS - 1) + 0.5).long().clamp(0, _GRID_POINTS - 1)
    codes = _grid_codes(code)[grid_index]
    return torch.where(normed.isnan(), 0, codes).to(torch.uint8), absmax  # 0/0 in an all-zero block: code 0


def scale_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values * the scale of each one's block (a short last block has its own scale)."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].reshape(-1, blocksize) * scale[: full // blocksize].view(-1, 1)).reshape(-1)
    return head if full == n else torch.cat([head, values[full:] * scale[full // blocksize]])


@dataclass
class NF4Weight:
    """A weight in NF4. ``packed``: the bytes; ``absmax``: float32 per block, or uint8 codes when
    double-quantised (then ``nested_absmax``, ``nested_quant_map``, ``offset``)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    quant_map: torch.Tensor = field(default_factory=nf4_code)
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded when double-quantised)."""
        if not self.double_quant:
            return self.absmax
        return scale_blocks(self.nested_quant_map[self.absmax.long()], self.nested_absmax, self.nested_blocksize) + \
            self.offset

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.blocksize, self.shape, self.dtype,
                         move(self.quant_map), move(self.nested_absmax), move(self.nested_quant_map), self.offset,
                         self.nested_blocksize)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` writes for its weight, under the same keys."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset)
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return out


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_storage: torch.dtype = torch.uint8, nonfinite: str = "warn") -> NF4Weight:
    """Quantise a float weight to NF4, byte for byte as bitsandbytes does.

    A NaN or infinite weight makes its block's absmax NaN or inf, and with double quantisation every
    weight of the layer then dequantises to NaN (bitsandbytes writes the same bytes): ``nonfinite``
    says what to do about such a weight, "warn" (the default, naming how many and the first) or
    "raise" (ValueError, nothing quantised)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"quantize_nf4: expected a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dtype not in DTYPE_NAMES:
        raise TypeError(f"quantize_nf4: weight dtype {w.dtype} is not supported (float32, float16, bfloat16)")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not supported; use one of {BLOCKSIZES}")
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quantize_nf4: quant_storage {quant_storage} is not supported; use one of {STORAGE_DTYPES}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: the weight is empty")
    if nonfinite not in ("warn", "raise"):
        raise ValueError(f"quantize_nf4: nonfinite must be 'warn' or 'raise', got {nonfinite!r}")
    if w.is_meta:  # a model built on the meta device: shapes only, the bytes come with a state dict
        return empty_nf4(w.shape, w.dtype, blocksize, double_quant, quant_storage, w.device)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        what = (f"quantize_nf4: {bad.shape[0]} weight(s) of a {list(w.shape)} weight are NaN or infinite (the first "
                f"at {bad[0].tolist()}); their blocks' absmax is too"
                + (", so with double quantisation every weight dequantises to NaN or inf" if double_quant else ""))
        if nonfinite == "raise":
            raise ValueError(what)
        warnings.warn(what, stacklevel=2)
    code = nf4_code(w.device)
    scaled, absmax = _blockwise_scale(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the last byte's low nibble: level 7 (0.0)
    q = _nearest(scaled, code).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        width = torch.empty(0, dtype=quant_storage).element_size()
        if packed.shape[0] % width:
            raise ValueError(f"quantize_nf4: {packed.shape[0]} packed bytes cannot be stored as {quant_storage} "
                             f"({width} bytes each); use quant_storage=torch.uint8 for this shape")
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    result = NF4Weight(packed, absmax, blocksize, w.shape, w.dtype, code)
    if double_quant:
        offset = absmax.mean()
        dyn = dynamic_map(w.device)
        result.absmax, result.nested_absmax = dynamic_codes(absmax - offset, dyn, NESTED_BLOCKSIZE)
        result.nested_quant_map, result.offset = dyn, offset.item()
    return result


def empty_nf4(shape, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = False,
              quant_storage: torch.dtype = torch.uint8, device=None) -> NF4Weight:
    """An NF4 weight of `shape` whose tensors have the right shapes and dtypes but no values
    (``torch.empty``; on the meta device, none at all): what a layer built before its weights are
    loaded holds. The double-quantisation offset is 0.0 until a state dict brings the real one."""
    numel = 1
    for d in shape:
        numel *= d
    width = torch.empty(0, dtype=quant_storage).element_size()
    nbytes = (numel + 1) // 2
    if nbytes % width:
        raise ValueError(f"{nbytes} packed bytes of a {list(shape)} weight cannot be stored as {quant_storage} "
                         f"({width} bytes each); use quant_storage=torch.uint8 for this shape")
    blocks = -(-numel // blocksize)
    q = NF4Weight(torch.empty(nbytes // width, 1, dtype=quant_storage, device=device),
                  torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
                  blocksize, torch.Size(shape), dtype, torch.empty(16, dtype=torch.float32, device=device))
    if double_quant:
        q.nested_absmax = torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device)
        q.nested_quant_map, q.offset = torch.empty(256, dtype=torch.float32, device=device), 0.0
    return q


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight in its original dtype and shape (values as bitsandbytes' dequantiser gives them)."""
    packed = q.packed if q.packed.dtype == torch.uint8 else q.packed.reshape(-1).view(torch.uint8)
    packed = packed.reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.int64, device=packed.device)
    codes[0::2] = (packed >> 4).long()
    codes[1::2] = (packed & 0xF).long()
    values = q.quant_map[codes[: q.numel]]
    return scale_blocks(values, q.block_absmax(), q.blocksize).reshape(q.shape).to(q.dtype)


def nf4_from_state_dict(state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
    """Read a weight as bitsandbytes' ``Linear4bit`` saves it (keys ``weight``, ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``).

    Raises ValueError naming the first missing or inconsistent key; nothing is half-read."""
    qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if qs_key not in state:
        others = [k for k in state if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if others:
            kind = others[0].rsplit("__", 1)[-1]
            raise ValueError(f"{others[0]}: quant_type {kind!r} is not supported (fastpeft reads nf4 only)")
        raise ValueError(f"state dict has no {qs_key!r}: not a bitsandbytes 4-bit weight")
    try:
        meta = json.loads(bytes(state[qs_key].to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{qs_key} does not hold bitsandbytes' JSON quant state ({e})") from None
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{qs_key}: quant_type {meta.get('quant_type')!r} is not supported (nf4 only)")
    blocksize = meta.get("blocksize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{qs_key}: blocksize {blocksize!r} is not supported; expected one of {BLOCKSIZES}")
    dtype = {v: k for k, v in DTYPE_NAMES.items()}.get(meta.get("dtype"))
    if dtype is None:
        raise ValueError(f"{qs_key}: dtype {meta.get('dtype')!r} is not supported (float32, float16, bfloat16)")
    shape = torch.Size(meta.get("shape") or ())
    nested = "nested_offset" in meta
    needed = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"] + \
        ([f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"] if nested else [])
    for key in needed:
        if key not in state:
            raise ValueError(f"state dict is missing {key!r} (its quant state says "
                             f"{'double' if nested else 'single'} quantisation)")
    q = NF4Weight(state[prefix], state[f"{prefix}.absmax"], blocksize, shape, dtype, state[f"{prefix}.quant_map"])
    if nested:
        q.nested_absmax, q.nested_quant_map = state[f"{prefix}.nested_absmax"], state[f"{prefix}.nested_quant_map"]
        q.offset, q.nested_blocksize = float(meta["nested_offset"]), int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    blocks = -(-q.numel // blocksize)
    packed_bytes = q.packed.numel() * q.packed.element_size()
    if packed_bytes != (q.numel + 1) // 2:
        raise ValueError(f"{prefix}: {packed_bytes} packed bytes for a {list(shape)} weight; expected {(q.numel + 1) // 2}")
    if q.absmax.numel() != blocks:
        raise ValueError(f"{prefix}.absmax has {q.absmax.numel()} entries; a {list(shape)} weight in blocks of "
                         f"{blocksize} has {blocks}")
    if q.absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise ValueError(f"{prefix}.absmax has dtype {q.absmax.dtype}; expected "
                         f"{'uint8 (double quantisation)' if nested else 'float32'}")
    if q.quant_map.numel() != 16:
        raise ValueError(f"{prefix}.quant_map has {q.quant_map.numel()} entries; NF4 has 16")
    if nested and q.nested_absmax.numel() != -(-blocks // q.nested_blocksize):
        raise ValueError(f"{prefix}.nested_absmax has {q.nested_absmax.numel()} entries; expected "
                         f"{-(-blocks // q.nested_blocksize)}")
    return q
