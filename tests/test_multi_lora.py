"""Mixed-adapter batches: BGMV/SGMV faces against the per-row reference, MultiLoRALinear, gradients."""

import pytest
import torch

import fastpeft
from fastpeft.nn import LoRALinear, MultiLoRALinear, use_adapter_batch
from fastpeft.ops import AdapterBatch, bgmv_expand, bgmv_shrink, sgmv_expand, sgmv_shrink
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from conftest import DTYPES, assert_close, device_params, face_params

S = 6  # slots


def id_patterns(T, seed=0):
    """Slot-id patterns of length T (the first entries of a longer pattern when T is small)."""
    T = max(T, 2 * S)
    g = torch.Generator().manual_seed(seed)
    return {
        "random with -1 and the last slot": torch.cat([torch.tensor([-1, S - 1]), torch.randint(-1, S, (T - 2,), generator=g)]),
        "one adapter for all rows": torch.full((T,), 2),
        "all distinct": torch.cat([torch.randperm(S, generator=g), torch.arange(T - S) % S]),
        "base model only": torch.full((T,), -1),
    }


def stacks(K, N, R, dtype, device, ranks=(1, 3, 8, 2, 5, 8), seed=0):
    """Stacked factors with mixed ranks: slot i uses ranks[i] <= R rows, the rest zero."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(S, R, K)
    b = torch.zeros(S, N, R)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, K, generator=g) / K ** 0.5
        b[i, :, :r] = torch.randn(N, r, generator=g) / r ** 0.5
    scalings = torch.rand(S, generator=g) + 0.5
    return a.to(device, dtype), b.to(device, dtype), scalings.to(device)


@pytest.mark.parametrize("device,backend", face_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", [(1, 16, 24, 8), (37, 45, 70, 8), (20, 33, 17, 16), (70, 24, 40, 8)])
@pytest.mark.parametrize("pattern", list(id_patterns(8)))
def test_faces_match_per_row_reference(device, backend, dtype, T, K, N, R, pattern):
    ids = id_patterns(T)[pattern][:T]
    a, b, scalings = stacks(K, N, R, dtype, device, ranks=[min(r, R) for r in (1, 3, 8, 2, 5, 8)])
    x = torch.randn(T, K).to(device, dtype)
    base = torch.randn(T, N).to(device, dtype)
    batch = AdapterBatch.build(ids, S, device=device)
    s_ref = bgmv_shrink_reference(x, a, batch.adapter_ids)
    out_ref = bgmv_expand_reference(base, s_ref, b, scalings, batch.adapter_ids)
    with fastpeft.use_backend(backend):
        s1 = bgmv_shrink(x, a, batch.adapter_ids)
        out1 = bgmv_expand(base, s_ref, b, scalings, batch.adapter_ids)
        assert_close(s1, s_ref, dtype, msg="bgmv_shrink")
        assert_close(out1, out_ref, dtype, msg="bgmv_expand")
        if backend != "cuda":  # SGMV has no CUDA face (Triton serves it on the GPU)
            s2 = sgmv_shrink(x, a, *batch.routing)
            out2 = sgmv_expand(base, s_ref, b, scalings, *batch.routing)
            assert_close(s2, s_ref, dtype, msg="sgmv_shrink")
            assert_close(out2, out_ref, dtype, msg="sgmv_expand")
    assert torch.equal(out_ref[ids == -1], base[ids == -1])


def test_reference_is_the_per_row_formula():
    a, b, scalings = stacks(12, 10, 8, torch.float64, "cpu")
    x, base = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    ids = torch.tensor([0, -1, 5, 5, 2, 1, -1, 3, 4], dtype=torch.int32)
    s = bgmv_shrink_reference(x, a, ids)
    out = bgmv_expand_reference(base, s, b, scalings, ids)
    for t, slot in enumerate(ids.tolist()):
        if slot < 0:
            assert torch.equal(out[t], base[t]) and torch.equal(s[t], torch.zeros(8, dtype=torch.float64))
        else:
            torch.testing.assert_close(out[t], base[t] + scalings[slot].double() * b[slot] @ (a[slot] @ x[t]))


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    a, b, scalings = stacks(20, 12, 8, torch.float32, device)
    x, base = torch.randn(11, 20, device=device), torch.randn(11, 12, device=device)
    batch = AdapterBatch.build(torch.tensor([0, 1, -1, 5, 5, 2, 2, 2, -1, 3, 4]), S, device=device)
    s = bgmv_shrink_reference(x, a, batch.adapter_ids)
    for op, args in [("bgmv_shrink", (x, a, batch.adapter_ids)), ("bgmv_expand", (base, s, b, scalings, batch.adapter_ids)),
                     ("sgmv_shrink", (x, a, *batch.routing)), ("sgmv_expand", (base, s, b, scalings, *batch.routing))]:
        torch.library.opcheck(getattr(torch.ops.fastpeft, op).default, args)


# ---------------------------------------------------------------- bad input

def test_adapter_batch_refuses_bad_ids():
    loaded = [True] * 4 + [False] * 2
    with pytest.raises(ValueError, match=r"adapter id 6 is out of range: ids must be -1 \(base model\) or a slot in \[0, 6\)"):
        AdapterBatch.build(torch.tensor([0, 6]), S)
    with pytest.raises(ValueError, match=r"adapter id -2 is out of range"):
        AdapterBatch.build(torch.tensor([-2, 0]), S)
    with pytest.raises(ValueError, match="adapter id 5 points at an empty slot"):
        AdapterBatch.build(torch.tensor([0, 5, -1]), S, loaded)
    with pytest.raises(TypeError, match="adapter_ids must be int32 or int64, got torch.float32"):
        AdapterBatch.build(torch.tensor([0.0, 1.0]), S)
    with pytest.raises(ValueError, match="adapter_ids must be 1-D"):
        AdapterBatch.build(torch.zeros(2, 2, dtype=torch.int64), S)


@pytest.mark.parametrize("device,backend", face_params())
def test_kernels_never_read_out_of_bounds_for_raw_ids(device, backend):
    """Called directly with ids the builder would refuse, kernels treat them as 'no adapter'
    (or the C++ segment path refuses the routing): never garbage, never a crash."""
    a, b, scalings = stacks(16, 12, 8, torch.float32, device)
    x, base = torch.randn(4, 16, device=device), torch.randn(4, 12, device=device)
    ids = torch.tensor([0, 99, -7, 2**30], dtype=torch.int32, device=device)
    with fastpeft.use_backend(backend):
        s = bgmv_shrink(x, a, ids)
        out = bgmv_expand(base, s, b, scalings, ids)
    assert torch.equal(s[1:], torch.zeros(3, 8, device=device)) and torch.equal(out[1:], base[1:])


def test_op_checks_name_the_problem():
    a, b, scalings = stacks(16, 12, 8, torch.float32, "cpu")
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="bgmv_shrink: adapter_ids must be int32, got torch.int64"):
        bgmv_shrink(x, a, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="bgmv_shrink: adapter_ids has 3 entries, expected 4"):
        bgmv_shrink(x, a, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bgmv_shrink: lora_a must be \[slots, max_rank, 16\]"):
        bgmv_shrink(x, a[:, :, :15], torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scalings must have one entry per slot"):
        bgmv_expand(torch.randn(4, 12), torch.randn(4, 8), b, scalings[:5], torch.zeros(4, dtype=torch.int32))


# ---------------------------------------------------------------- the module

def multi_layer(K=24, N=18, max_adapters=S, max_rank=8, ranks=(4, 8, 2), dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    base = torch.nn.Linear(K, N).to(device, dtype)
    layer = MultiLoRALinear(base, max_adapters, max_rank)
    singles = []
    for slot, r in enumerate(ranks):
        single = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r + slot, init_lora_weights=False)
        layer.set_adapter(slot, single.lora_A["default"].weight, single.lora_B["default"].weight,
                          single.scaling["default"])
        singles.append(single)
    return base, layer, singles


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("T", [1, 5, 40])  # 40 tokens of one adapter: the SGMV path
def test_module_rows_equal_their_own_adapter(device, T):
    base, layer, singles = multi_layer(device=device)
    x = torch.randn(T, 24, device=device)
    ids = torch.randint(-1, 3, (T,))
    y = layer(x, ids)
    for t, slot in enumerate(ids.tolist()):
        expected = base(x[t:t + 1]) if slot < 0 else singles[slot](x[t:t + 1])
        assert_close(y[t:t + 1], expected)


def test_per_sequence_ids_and_the_shared_batch():
    base, layer, singles = multi_layer()
    x = torch.randn(3, 5, 24)
    y = layer(x, torch.tensor([2, -1, 0]))
    assert_close(y[0], singles[2](x[0]))
    assert_close(y[1], base(x[1]))
    assert_close(y[2], singles[0](x[2]))
    with use_adapter_batch(layer.batch_for(x, torch.tensor([2, -1, 0]))):
        assert_close(layer(x), y)
    with pytest.raises(ValueError, match="no adapter_ids given and no adapter batch is active"):
        layer(x)
    with pytest.raises(ValueError, match=r"adapter_ids has 4 entries; expected one per token \(15\) or one per sequence \(3\)"):
        layer(x, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="adapter id 4 points at an empty slot"):
        layer(x, torch.tensor([4, 0, 0]))


def test_rank_above_max_rank_is_refused():
    _, layer, _ = multi_layer()
    with pytest.raises(ValueError, match="adapter rank 9 exceeds max_rank 8"):
        layer.set_adapter(3, torch.randn(9, 24), torch.randn(18, 9), 1.0)
    with pytest.raises(ValueError, match=r"slot 6 is out of range \[0, 6\)"):
        layer.set_adapter(6, torch.randn(2, 24), torch.randn(18, 2), 1.0)


@pytest.mark.parametrize("T", [6, 48])  # BGMV and SGMV paths
def test_gradients_reach_every_adapter_in_the_batch_and_no_other(T):
    _, layer, _ = multi_layer()
    x = torch.randn(T, 24, requires_grad=True)
    ids = torch.tensor(([0, 2, -1] * T)[:T])
    y = layer(x, ids)
    g = torch.randn_like(y)
    y.backward(g)
    # the same computation written out with plain autograd, per row
    a, b = layer.lora_a.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    rows = []
    for t, slot in enumerate(ids.tolist()):
        row = layer.base_layer(xr[t])
        if slot >= 0:
            row = row + layer.scalings[slot] * (b[slot] @ (a[slot] @ xr[t]))
        rows.append(row)
    torch.stack(rows).backward(g)
    assert_close(x.grad, xr.grad)
    assert_close(layer.lora_a.grad, a.grad)
    assert_close(layer.lora_b.grad, b.grad)
    assert layer.lora_a.grad[[1, 3, 4, 5]].abs().sum() == 0 and layer.lora_b.grad[[1, 3, 4, 5]].abs().sum() == 0
    assert layer.lora_a.grad[0].abs().sum() > 0 and layer.lora_b.grad[2].abs().sum() > 0


def test_a_layer_cast_to_half_precision_keeps_float32_scalings():
    """model.to(torch.bfloat16) cast the scalings too, and every call then failed ("scalings has
    dtype torch.bfloat16, expected torch.float32"); they stay float32, exact."""
    layer = MultiLoRALinear(torch.nn.Linear(32, 16), max_adapters=2, max_rank=4)
    layer.set_adapter(0, torch.randn(3, 32), torch.randn(16, 3), 1 / 3)
    layer.to(torch.bfloat16)
    assert layer.scalings.dtype == torch.float32 and layer.scalings[0].item() == pytest.approx(1 / 3, rel=1e-7)
    assert layer.lora_a.dtype == torch.bfloat16
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x, torch.tensor([0, -1, 0, -1]))
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16)
