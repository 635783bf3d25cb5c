"""SGMV (segmented gathered LoRA products) and the AdapterBatch routing it reads: every face against
the per-row reference, and clear refusals."""

import pytest
import torch

from fastpeft.ops import AdapterBatch, sgmv_expand, sgmv_shrink
from fastpeft.ops.adapter_batch import route
from fastpeft.ops.bgmv import bgmv_shrink_reference
from fastpeft.ops.sgmv import sgmv_outer, sgmv_outer_reference

from adapter_stacks import FACE_SHAPES, S, id_patterns, mixed_batch, stacks, wide_rank_batch
from conftest import (DTYPES, assert_close, assert_refused_before_any_face, device_params, face_params, fresh_seed,
                      offset_view, on_face, wide_rows)


@pytest.mark.parametrize("device,backend", face_params(sgmv_shrink))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", FACE_SHAPES)
@pytest.mark.parametrize("pattern", list(id_patterns(8)))
def test_faces_match_per_row_reference(device, backend, dtype, T, K, N, R, pattern):
    m = mixed_batch(T, K, N, R, pattern, dtype, device)
    routing = m["batch"].routing
    with on_face(backend):
        s = sgmv_shrink(m["x"], m["a"], *routing)
        out = sgmv_expand(m["base"], m["s_ref"], m["b"], m["scalings"], *routing)
    assert_close(s, m["s_ref"], dtype, msg="sgmv_shrink")
    assert_close(out, m["out_ref"], dtype, msg="sgmv_expand")


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    a, b, scalings = stacks(20, 12, 8, torch.float32, device)
    x, base = torch.randn(11, 20, device=device), torch.randn(11, 12, device=device)
    batch = AdapterBatch.build(torch.tensor([0, 1, -1, 5, 5, 2, 2, 2, -1, 3, 4]), S, device=device)
    s = bgmv_shrink_reference(x, a, batch.adapter_ids)
    torch.library.opcheck(torch.ops.fastpeft.sgmv_shrink.default, (x, a, *batch.routing))
    torch.library.opcheck(torch.ops.fastpeft.sgmv_expand.default, (base, s, b, scalings, *batch.routing))


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


def test_op_refuses_routing_outside_the_batch():
    """On the CPU every face refuses what the C++ face refuses: segments outside the tokens, slots
    outside the stack, a max_seg_len below a segment's length."""
    a, _, _ = stacks(16, 12, 8, torch.float32, "cpu")
    x = torch.randn(4, 16)
    tokens, starts, lens, slots = (torch.tensor(v, dtype=torch.int32) for v in ([0, 1, 2, 3], [0], [4], [1]))
    with pytest.raises(ValueError, match=r"sgmv_shrink: segment 0 \[2, 6\) lies outside the 4 tokens"):
        sgmv_shrink(x, a, tokens, starts + 2, lens, slots, 4)
    with pytest.raises(ValueError, match=r"sgmv_shrink: segment 0 names slot 6, outside \[0, 6\)"):
        sgmv_shrink(x, a, tokens, starts, lens, slots + 5, 4)
    with pytest.raises(ValueError, match="sgmv_shrink: segment 0 has 4 tokens, more than max_seg_len = 3"):
        sgmv_shrink(x, a, tokens, starts, lens, slots, 3)
    with pytest.raises(ValueError, match="sgmv_shrink: sorted_tokens holds 9, which is not a token index"):
        sgmv_shrink(x, a, torch.tensor([0, 9, 2, 3], dtype=torch.int32), starts, lens, slots, 4)


# ---------------------------------------------------------------- the routing, built where the ids are

@pytest.mark.parametrize("pattern", list(id_patterns(40)))
def test_routing_is_a_stable_sort_and_one_segment_per_slot(pattern):
    ids = id_patterns(40)[pattern]
    tokens, starts, lens, slots = route(ids, S)
    assert tokens.dtype == starts.dtype == lens.dtype == slots.dtype == torch.int32
    assert torch.equal(tokens.long(), torch.argsort(ids, stable=True))
    assert torch.equal(slots, torch.arange(S, dtype=torch.int32))
    for slot in range(S):
        members = tokens[starts[slot]:starts[slot] + lens[slot]].long()
        assert torch.equal(members, (ids == slot).nonzero().flatten()), slot  # in token order
    assert int(lens.sum()) == int((ids >= 0).sum())


def test_routing_counts_ids_outside_the_slots_as_the_base_model():
    """As the kernels treat them: never a segment, never an index outside the stacks."""
    tokens, starts, lens, _ = route(torch.tensor([7, 0, -5, 1, 6, 0]), 2)
    assert lens.tolist() == [2, 1] and starts.tolist() == [3, 5]
    assert tokens[:3].tolist() == [0, 2, 4] and tokens[3:].tolist() == [1, 5, 3]


def test_adapter_batch_shapes_depend_on_the_token_and_slot_counts_alone():
    """No segment count or length read from the ids: what torch.compile can trace without a break."""
    for ids in (torch.full((9,), -1), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2]), torch.full((9,), 3)):
        batch = AdapterBatch.build(ids, S)
        assert batch.seg_starts.shape == batch.seg_lens.shape == batch.seg_adapters.shape == (S,)
        assert batch.sorted_tokens.shape == batch.adapter_ids.shape == (9,) and batch.max_seg_len == 9
        assert not batch.prefers_segments()
    assert AdapterBatch.build(torch.zeros(16, dtype=torch.int64), S).prefers_segments()
    seq = AdapterBatch.build(torch.tensor([2, -1, 0]), S, tokens_per_row=5, per_sequence=True)
    assert seq.num_tokens == 15 and seq.per_sequence.num_tokens == 3
    assert seq.adapter_ids.tolist() == [2] * 5 + [-1] * 5 + [0] * 5 and seq.per_sequence.adapter_ids.tolist() == [2, -1, 0]


# ---------------------------------------------------------------- sgmv_outer: the stacks' gradients

def outer_by_masks(a, b, ids):
    """Σ a[t]ᵀ·b[t] per slot, written as a masked product per slot (float64)."""
    return torch.stack([(a.double() * (ids == slot)[:, None]).t() @ b.double() for slot in range(S)])


def test_outer_reference_is_the_per_slot_sum():
    a, b = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 7, dtype=torch.float64)
    ids = id_patterns(30)["random with -1 and the last slot"][:30]
    out = sgmv_outer_reference(a.float(), b.float(), *AdapterBatch.build(ids, S).routing, S)
    torch.testing.assert_close(out.double(), outer_by_masks(a, b, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", face_params(sgmv_outer))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", FACE_SHAPES)
@pytest.mark.parametrize("pattern", list(id_patterns(8)))
def test_outer_faces_match_per_row_reference(device, backend, dtype, T, K, N, R, pattern):
    """dA's shape ([S, R, K] from ds [T, R] and x [T, K]) and dB's ([S, N, R] from dy and s)."""
    ids = id_patterns(T)[pattern][:T]
    routing = AdapterBatch.build(ids, S, device=device).routing
    for p, q in ((R, K), (N, R)):
        a, b = torch.randn(T, p).to(device, dtype), torch.randn(T, q).to(device, dtype)
        with on_face(backend):
            out = sgmv_outer(a, b, *routing, S)
        assert out.shape == (S, p, q) and out.dtype == dtype
        assert_close(out, sgmv_outer_reference(a, b, *routing, S), dtype)
        unused = [slot for slot in range(S) if not (ids == slot).any()]
        assert torch.equal(out[unused], torch.zeros_like(out[unused]))


@pytest.mark.parametrize("device,backend", face_params(sgmv_outer))
def test_outer_adds_up_segments_that_name_one_slot(device, backend):
    """Segments are not required to name distinct slots: two for slot 2 add up; slots named by
    none are zero; a strided a (a column slice) is read through its strides."""
    a = torch.randn(10, 40, device=device)[:, ::4]
    b = torch.randn(10, 3, device=device)
    tokens = torch.tensor([9, 0, 4, 2, 7, 1, 3, 5, 6, 8], dtype=torch.int32, device=device)
    starts, lens, slots = (torch.tensor(v, dtype=torch.int32, device=device) for v in ([0, 3, 5], [3, 2, 4], [2, 0, 2]))
    with on_face(backend):
        out = sgmv_outer(a, b, tokens, starts, lens, slots, 4, 4)
    want = torch.zeros(4, 10, 3, dtype=torch.float64)
    for start, length, slot in ((0, 3, 2), (3, 2, 0), (5, 4, 2)):
        idx = tokens[start:start + length].long().cpu()
        want[slot] += a.cpu().double()[idx].t() @ b.cpu().double()[idx]
    assert_close(out.cpu(), want.float())


@pytest.mark.parametrize("device", device_params())
def test_outer_opcheck(device):
    batch = AdapterBatch.build(torch.tensor([0, 1, -1, 5, 5, 2, 2, 2, -1, 3, 4]), S, device=device)
    a, b = torch.randn(11, 8, device=device), torch.randn(11, 13, device=device)
    torch.library.opcheck(torch.ops.fastpeft.sgmv_outer.default, (a, b, *batch.routing, S))


OUTER_CASES = {
    "a not 2-D": (dict(a=torch.randn(5, 3, 1)), ValueError, r"sgmv_outer: a must be 2-D \[tokens, features\]; got shape \[5, 3, 1\]"),
    "rows differ": (dict(b=torch.randn(4, 2)), ValueError, r"sgmv_outer: a and b must have one row per token; got \[5, 3\] and \[4, 2\]"),
    "mixed dtypes": (dict(b=torch.randn(5, 2, dtype=torch.float16)), TypeError, r"sgmv_outer: b has dtype torch.float16 but a has torch.float32"),
    "no slots": (dict(num_slots=0), ValueError, r"sgmv_outer: num_slots must be an int >= 1, got 0"),
    "slot outside": (dict(num_slots=2), ValueError, r"sgmv_outer: segment 2 names slot 2, outside \[0, 2\)"),
    "int64 routing": (dict(tokens=torch.arange(5)), TypeError, r"sgmv_outer: sorted_tokens must be int32, got torch.int64"),
}


@pytest.mark.parametrize("case", list(OUTER_CASES))
def test_outer_refuses_bad_input_before_any_face(case, monkeypatch):
    change, exc, pattern = OUTER_CASES[case]
    batch = AdapterBatch.build(torch.tensor([0, 2, 1, 2, -1]), 3)
    args = dict(a=torch.randn(5, 3), b=torch.randn(5, 2), tokens=batch.sorted_tokens, num_slots=3, **{})
    args.update(change)
    assert_refused_before_any_face(
        monkeypatch, sgmv_outer,
        lambda: sgmv_outer(args["a"], args["b"], args["tokens"], *batch.routing[1:], args["num_slots"]), exc, pattern)


# ---------------------------------------------------------------- ranks, no tokens, layouts

@pytest.mark.parametrize("device,backend", face_params(sgmv_shrink))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [40, 300])
def test_faces_match_at_ranks_above_the_rank_blocks(device, backend, dtype, R):
    """R = 40 (one 64-wide rank block, partly masked) and R = 300 (five, the last 44 wide), with
    slots of every rank up to R, tokens mixed with -1, ragged T, K and N."""
    m = wide_rank_batch(11, 21, 19, R, dtype, device)
    routing = m["batch"].routing
    with on_face(backend):
        s = sgmv_shrink(m["x"], m["a"], *routing)
        out = sgmv_expand(m["base"], m["s"], m["b"], m["scalings"], *routing)
    assert_close(s, m["s_ref"], dtype, msg=f"sgmv_shrink, R = {R}")
    assert_close(out, m["out_ref"], dtype, msg=f"sgmv_expand, R = {R}")


@pytest.mark.parametrize("device,backend", face_params(sgmv_shrink))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faces_take_no_tokens(device, backend, dtype):
    """T = 0 (an AdapterBatch of no ids: every segment empty, max_seg_len 0): outputs of no rows."""
    a, b, scalings = stacks(16, 12, 8, dtype, device, seed=fresh_seed())
    x, base = torch.randn(0, 16, dtype=dtype, device=device), torch.randn(0, 12, dtype=dtype, device=device)
    routing = AdapterBatch.build(torch.zeros(0, dtype=torch.int64), S, device=device).routing
    with on_face(backend):
        s = sgmv_shrink(x, a, *routing)
        out = sgmv_expand(base, torch.randn(0, 8, dtype=dtype, device=device), b, scalings, *routing)
    assert s.shape == (0, 8) and out.shape == (0, 12) and s.dtype == out.dtype == dtype


@pytest.mark.parametrize("device,backend", face_params(sgmv_shrink))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_faces_read_offset_and_strided_rows(device, backend, dtype):
    """x, base and s starting one element into their storage (pointers off 16-byte alignment), then
    as slices of wider tensors (rows strided beyond K, N and R); the stacks one element in."""
    T, K, N, R = 13, 40, 24, 16
    m = wide_rank_batch(T, K, N, R, dtype, device)
    routing = m["batch"].routing
    a, b = offset_view(m["a"]), offset_view(m["b"])
    for layout in (offset_view, wide_rows):
        x, base, s = (layout(m[name]) for name in ("x", "base", "s"))
        assert x.storage_offset() % 8 == 1 or x.stride(0) > K
        with on_face(backend):
            got_s = sgmv_shrink(x, a, *routing)
            got_out = sgmv_expand(base, s, b, m["scalings"], *routing)
        assert_close(got_s, m["s_ref"], dtype, msg=f"sgmv_shrink, {layout.__name__}")
        assert_close(got_out, m["out_ref"], dtype, msg=f"sgmv_expand, {layout.__name__}")
