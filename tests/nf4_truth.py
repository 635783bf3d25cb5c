"""What bitsandbytes' NF4 bytes mean, independently of fastpeft, and where bitsandbytes' own CPU
kernels compute it right (they do not everywhere: see each function).

The truth for our bytes is bitsandbytes' quantiser output; the truth for their values is the
format's definition, decoded here. bitsandbytes' own dequantise and forward are compared with only
where they are right on every CPU; elsewhere a test skips, naming the bitsandbytes behaviour and
the CPU feature that triggers it.
"""

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as BF

NESTED_BLOCKSIZE = 256  # double quantisation: one nested absmax per 256 blocks


def decode_by_definition(packed, absmax, blocksize, shape, dtype, nested=None):
    """The [out, in] values of bitsandbytes' NF4 bytes by the format's definition: codes high nibble
    first, levels from bitsandbytes' own table, times the float32 absmax of each run of `blocksize`
    flat elements; with double quantisation (nested = (nested_absmax, nested_code, offset)) that
    absmax is first decoded as level times nested absmax, plus the offset. Rounded to `dtype` last."""
    raw = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()
    numel = shape[0] * shape[1]
    if nested is not None:
        nested_absmax, nested_code, offset = nested
        absmax = nested_code[absmax.long()] * nested_absmax[torch.arange(absmax.numel()) // NESTED_BLOCKSIZE] + offset
    values = BF.get_4bit_type("nf4", device="cpu")[codes[:numel]] * absmax[torch.arange(numel) // blocksize]
    return values.reshape(shape).to(dtype)


def decode_quant_state(packed, state, dtype):
    """decode_by_definition of a bitsandbytes QuantState (bitsandbytes' own layout, not repacked)."""
    nested = (state.state2.absmax, state.state2.code, state.offset.item()) if state.nested else None
    return decode_by_definition(packed, state.absmax, state.blocksize, tuple(state.shape), dtype, nested)


def _has_avx512f() -> bool:
    return bool(bnb.cextension.lib.has_avx512f_cpu())


def bnb_dequantize_is_right(shape, blocksize):
    """(True, "") where bitsandbytes' dequantize_4bit gives the format's values on every CPU, else
    (False, why). bitsandbytes 0.50.2's native CPU dequantiser on a CPU with AVX-512F looks absmax
    up per row (block = column // blocksize), so rows that are not a whole number of blocks read the
    wrong absmax (64 x 96, blocksize 64: off by 2.0); odd rows and blocksize >= 2048 take its
    generic path, which is right."""
    straddles = shape[-1] % blocksize != 0 and shape[-1] % 2 == 0 and blocksize < 2048
    if straddles and _has_avx512f():
        return False, (f"bitsandbytes' AVX-512F CPU dequantize_4bit takes rows to be whole blocks and misreads absmax "
                       f"when they are not (a row of {shape[-1]}, blocks of {blocksize}); this CPU has AVX-512F")
    return True, ""


def bnb_forward_is_right(layers):
    """(True, "") where bitsandbytes' Linear4bit forward is right on every CPU for each of `layers`
    (bnb.nn.Linear4bit), else (False, why). On a CPU with AVX-512F its dequantiser misreads rows that
    are not whole blocks (above); with AVX512_BF16 an eval-mode forward first repacks the weight
    (_convert_weight_packed_for_cpu), which needs in_features a multiple of the blocksize and
    out_features a multiple of 32, and crashes otherwise (in_features < blocksize: "shape '[32, 0]'
    is invalid")."""
    for layer in layers:
        state = layer.weight.quant_state
        right, why = bnb_dequantize_is_right(tuple(state.shape), state.blocksize)
        if not right:
            return False, f"{why} (Linear4bit {layer.in_features} -> {layer.out_features})"
        if BF.has_avx512bf16() and (layer.out_features % 32 or layer.in_features % state.blocksize):
            return False, (f"bitsandbytes' AVX512_BF16 eval-mode Linear4bit repacks its weight in blocks of 32 rows "
                           f"and whole absmax blocks per row, and fails on {layer.in_features} -> "
                           f"{layer.out_features} (blocks of {state.blocksize}); this CPU has AVX512_BF16")
    return True, ""
