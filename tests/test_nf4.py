"""NF4 weights in bitsandbytes' format: the same bytes, the same values, clear refusals."""

import pytest
import torch

from fastpeft.quant import dequantize_nf4, dynamic_map, nf4_code, nf4_from_state_dict, quantize_nf4
from fastpeft.quant.nf4 import dynamic_codes

# bitsandbytes is a peer (the `test` extra installs it), not a dependency: without it only the
# tests that compare with it skip, and say so.
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
except ImportError as e:
    bnb = BF = None
    NO_BNB = f"bitsandbytes is not installed ({e})"
else:
    NO_BNB = ""
needs_bnb = pytest.mark.skipif(bool(NO_BNB), reason=NO_BNB)
if bnb is not None:  # the format decoded by its definition, checked against bitsandbytes' bytes
    from nf4_truth import bnb_dequantize_is_right, decode_quant_state

SHAPES = [(64, 96), (33, 7), (5, 13), (1, 1), (128, 300)]  # odd element counts, a short last block
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_bnb
def test_tables_equal_bitsandbytes():
    assert torch.equal(dynamic_map(), BF.create_dynamic_map(signed=True))
    assert torch.equal(nf4_code(), BF.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_quantiser_writes_bitsandbytes_bytes(shape, blocksize, dtype, storage, double_quant):
    w = torch.randn(*shape).to(dtype)
    if storage != torch.uint8 and ((w.numel() + 1) // 2) % 2:
        with pytest.raises(ValueError, match="cannot be stored as torch.bfloat16"):
            quantize_nf4(w, blocksize, quant_storage=storage)
        return
    q = quantize_nf4(w, blocksize, double_quant=double_quant, quant_storage=storage)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", quant_storage=storage,
                                     compress_statistics=double_quant)
    assert q.packed.dtype == packed.dtype and q.packed.shape == packed.shape
    assert torch.equal(q.packed.view(torch.uint8), packed.view(torch.uint8))  # bytes, not values: bf16 NaNs
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_quant_map, state.state2.code)
        assert q.offset == state.offset.item()
    assert torch.equal(dequantize_nf4(q), decode_quant_state(packed, state, dtype))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES + [(64, 128), (3, 32)])
@pytest.mark.parametrize("blocksize", [64, 128, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_dequantiser_equals_bitsandbytes_dequantize_4bit(shape, blocksize, dtype, double_quant):
    right, why = bnb_dequantize_is_right(shape, blocksize)
    if not right:
        pytest.skip(why)
    w = torch.randn(*shape).to(dtype)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    q = quantize_nf4(w, blocksize, double_quant=double_quant)
    assert torch.equal(dequantize_nf4(q), BF.dequantize_4bit(packed, state))


@needs_bnb
def test_nested_codes_equal_bitsandbytes_near_code_midpoints():
    """Values next to the midpoint between two 8-bit codes are where a nearest-level search and
    bitsandbytes' grid lookup disagree (about 1 in 1000 random values): many of them, many blocks."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    code = BF.create_dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) / 2
    picks = mids[torch.randint(0, mids.numel(), (256 * 64,), generator=g)]
    values = picks * (1 + 1e-4 * torch.randn(picks.shape, generator=g))
    values[::256] = 1.0  # every block's absmax is 1: the normalised value is the value
    ours, absmax = dynamic_codes(values, dynamic_map(), 256)
    theirs, state = BF.quantize_blockwise(values, code=code, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(ours, theirs)


@needs_bnb
@pytest.mark.parametrize("compress", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_features", [96, 128], ids=["rows-straddle-blocks", "whole-blocks"])
def test_dequantiser_reads_a_bitsandbytes_linear4bit_state_dict(compress, blocksize, dtype, in_features):
    w = torch.randn(70, in_features).to(dtype)
    layer = bnb.nn.Linear4bit(in_features, 70, bias=False, quant_type="nf4", compress_statistics=compress)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=compress,
                                     blocksize=blocksize)
    layer = layer.to("cpu")
    q = nf4_from_state_dict(layer.state_dict())
    assert q.double_quant == compress and q.blocksize == blocksize and q.shape == w.shape and q.dtype == dtype
    assert torch.equal(dequantize_nf4(q), decode_quant_state(layer.weight.data, layer.weight.quant_state, dtype))


@pytest.mark.parametrize("compress", [False, True], ids=["single", "double"])
def test_state_dict_round_trip(compress):
    w = torch.randn(33, 64)
    q = quantize_nf4(w, 64, double_quant=compress)
    back = nf4_from_state_dict(q.state_dict())
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


def test_quantisation_error_is_nf4s():
    w = torch.randn(256, 256)
    for compress in (False, True):
        d = dequantize_nf4(quantize_nf4(w, 64, double_quant=compress))
        rel = (d - w).norm() / w.norm()
        assert 0.05 < rel < 0.12, rel  # 4 bits: about 10 % relative error, never exact, never garbage


def test_double_quant_stores_uint8_absmax_close_to_the_float_one():
    w = torch.randn(64, 512)
    single, double = quantize_nf4(w, 64), quantize_nf4(w, 64, double_quant=True)
    assert double.absmax.dtype == torch.uint8 and double.nested_absmax.dtype == torch.float32
    assert double.nested_absmax.numel() == 2  # 512 blocks of 64, absmax in blocks of 256
    assert torch.equal(double.packed, single.packed)
    torch.testing.assert_close(double.block_absmax(), single.absmax, rtol=2e-2, atol=0)


def corrupt(state, **changes):
    out = dict(state)
    for key, value in changes.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


def test_bad_quantiser_input():
    with pytest.raises(ValueError, match="blocksize 48 is not supported"):
        quantize_nf4(torch.randn(4, 4), 48)
    with pytest.raises(TypeError, match="expected a floating-point tensor"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="the weight is empty"):
        quantize_nf4(torch.randn(0, 4))


def test_bad_state_dicts_are_refused():
    state = quantize_nf4(torch.randn(64, 96), 64, double_quant=True).state_dict()
    with pytest.raises(ValueError, match=r"missing 'weight.nested_absmax' \(its quant state says double"):
        nf4_from_state_dict(corrupt(state, **{"weight.nested_absmax": None}))
    with pytest.raises(ValueError, match=r"weight.absmax has 95 entries; a \[64, 96\] weight in blocks of 64 has 96"):
        nf4_from_state_dict(corrupt(state, **{"weight.absmax": state["weight.absmax"][:95]}))
    with pytest.raises(ValueError, match=r"3071 packed bytes for a \[64, 96\] weight; expected 3072"):
        nf4_from_state_dict(corrupt(state, weight=state["weight"][:3071]))
    fp4 = corrupt(state, **{"weight.quant_state.bitsandbytes__nf4": None,
                            "weight.quant_state.bitsandbytes__fp4": state["weight.quant_state.bitsandbytes__nf4"]})
    with pytest.raises(ValueError, match="quant_type 'fp4' is not supported"):
        nf4_from_state_dict(fp4)
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit weight"):
        nf4_from_state_dict({"weight": torch.zeros(3)})


@needs_bnb
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_nonfinite_weights_get_bitsandbytes_bytes_and_a_warning(bad, double_quant):
    """bitsandbytes' nested absmax of a NaN weight's layer is 0.0 (its max skips NaN), of an infinite
    one inf; fastpeft wrote NaN for both. Such a weight also gets a warning, or an error on request."""
    w = torch.randn(4, 600)
    w[1, 5] = bad
    warning = r"1 weight\(s\) of a \[4, 600\] weight are NaN or infinite \(the first at \[1, 5\]\)"
    with pytest.warns(UserWarning, match=warning):
        q = quantize_nf4(w, 64, double_quant=double_quant)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(q.packed.view(torch.uint8), packed.view(torch.uint8))
    torch.testing.assert_close(q.absmax, state.absmax, rtol=0, atol=0, equal_nan=True)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)  # 0.0 or inf, as bitsandbytes
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(w, 64, double_quant=double_quant, nonfinite="raise")
