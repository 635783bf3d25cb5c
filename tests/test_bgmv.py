"""BGMV (per-token gathered LoRA products): every face against the per-row reference, and clear refusals."""

import pytest
import torch

from fastpeft.ops import AdapterBatch, bgmv_expand, bgmv_shrink
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from adapter_stacks import FACE_SHAPES, S, id_patterns, mixed_batch, stacks, wide_rank_batch
from conftest import (ROWS_PAST_INT32, DTYPES, assert_close, device_params, face_params, fresh_seed, gpu_face_params,
                      offset_view, on_face, wide_rows)


@pytest.mark.parametrize("device,backend", face_params(bgmv_shrink))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", FACE_SHAPES)
@pytest.mark.parametrize("pattern", list(id_patterns(8)))
def test_faces_match_per_row_reference(device, backend, dtype, T, K, N, R, pattern):
    m = mixed_batch(T, K, N, R, pattern, dtype, device)
    ids = m["batch"].adapter_ids
    with on_face(backend):
        s = bgmv_shrink(m["x"], m["a"], ids)
        out = bgmv_expand(m["base"], m["s_ref"], m["b"], m["scalings"], ids)
    assert_close(s, m["s_ref"], dtype, msg="bgmv_shrink")
    assert_close(out, m["out_ref"], dtype, msg="bgmv_expand")


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
    ids = AdapterBatch.build(torch.tensor([0, 1, -1, 5, 5, 2, 2, 2, -1, 3, 4]), S, device=device).adapter_ids
    s = bgmv_shrink_reference(x, a, ids)
    torch.library.opcheck(torch.ops.fastpeft.bgmv_shrink.default, (x, a, ids))
    torch.library.opcheck(torch.ops.fastpeft.bgmv_expand.default, (base, s, b, scalings, ids))


@pytest.mark.parametrize("device,backend", face_params(bgmv_shrink))
def test_kernels_never_read_out_of_bounds_for_raw_ids(device, backend):
    """Called directly with ids AdapterBatch would refuse, kernels treat them as 'no adapter':
    never garbage, never a crash."""
    a, b, scalings = stacks(16, 12, 8, torch.float32, device)
    x, base = torch.randn(4, 16, device=device), torch.randn(4, 12, device=device)
    ids = torch.tensor([0, 99, -7, 2**30], dtype=torch.int32, device=device)
    with on_face(backend):
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
    with pytest.raises(TypeError, match="bgmv_expand: scalings must be float32, got torch.float16"):
        bgmv_expand(torch.randn(4, 12), torch.randn(4, 8), b, scalings.half(), torch.zeros(4, dtype=torch.int32))


def cuda_face():
    """The C++ CUDA face where a GPU and the built extension are here (none otherwise: no test then)."""
    return [p for p in face_params(bgmv_expand) if p.values[1] == "cuda"]


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,R", [(64, 4096 + 3, 16), (5, 300, 7), (9, 257, 64), (3, 40, 1), (1, 4096, 16),
                                   (8, 4096 + 5, 16)])
def test_cuda_expand_thread_per_feature_matches_the_reference(device, backend, dtype, T, N, R):
    """csrc/cuda/bgmv.cu's expand (a thread per output feature, the rank in 16-byte steps when it
    divides, scalar otherwise, s in shared memory, blocks narrowed down to a warp for a few tokens:
    T = 1 and 8 at N = 4096 take 32 and 128 threads on a 132-SM GPU): ranks 1 to 64, N beyond
    whole blocks, slots mixed with -1, and B as a transposed view (scalar path)."""
    K = 32
    a, b, scalings = stacks(K, N, R, dtype, device, ranks=tuple(min(r, R) for r in (1, 3, 8, 2, 5, 8)))
    ids = torch.randint(-1, b.shape[0], (T,), dtype=torch.int32, device=device)
    base, s = torch.randn(T, N, dtype=dtype, device=device), torch.randn(T, R, dtype=dtype, device=device)
    expected = bgmv_expand_reference(base, s, b, scalings, ids)
    b_view = b.transpose(1, 2).contiguous().transpose(1, 2)   # the same values, rank stride N
    for factors in (b, b_view):
        with on_face(backend):
            got = bgmv_expand(base, s, factors, scalings, ids)
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,R", [(1, 4096, 16), (8, 4096 + 3, 16), (64, 4096, 64), (5, 45, 1), (3, 1, 7)])
def test_cuda_shrink_block_per_pair_matches_the_reference(device, backend, dtype, T, K, R):
    """csrc/cuda/bgmv.cu's shrink (a block per (token, rank) pair, K shared by its 128 threads, their
    sums added in a fixed order): one token, K off the 16-byte step and shorter than a block's
    share, rank 1 to 64, slots mixed with -1; the same bits on a second run."""
    a, _, _ = stacks(K, 8, R, dtype, device, ranks=tuple(min(r, R) for r in (1, 3, 8, 2, 5, 8)))
    ids = torch.randint(-1, a.shape[0], (T,), dtype=torch.int32, device=device)
    x = torch.randn(T, K, dtype=dtype, device=device)
    expected = bgmv_shrink_reference(x.float(), a.float(), ids)
    with on_face(backend):
        got = bgmv_shrink(x, a, ids)
        again = bgmv_shrink(x, a, ids)
    assert_close(got, expected, dtype)
    assert torch.equal(got, again)


# ---------------------------------------------------------------- ranks, no tokens, layouts

@pytest.mark.parametrize("device,backend", face_params(bgmv_shrink))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [40, 300])
def test_faces_match_at_ranks_above_the_rank_blocks(device, backend, dtype, R):
    """R = 40 (one 64-wide rank block, partly masked) and R = 300 (five, the last 44 wide), with
    slots of every rank up to R, tokens mixed with -1, ragged T, K and N."""
    m = wide_rank_batch(11, 21, 19, R, dtype, device)
    ids = m["batch"].adapter_ids
    with on_face(backend):
        s = bgmv_shrink(m["x"], m["a"], ids)
        out = bgmv_expand(m["base"], m["s"], m["b"], m["scalings"], ids)
    assert_close(s, m["s_ref"], dtype, msg=f"bgmv_shrink, R = {R}")
    assert_close(out, m["out_ref"], dtype, msg=f"bgmv_expand, R = {R}")


@pytest.mark.parametrize("device,backend", face_params(bgmv_shrink))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faces_take_no_tokens(device, backend, dtype):
    """T = 0: outputs of no rows, nothing launched that reads a row."""
    a, b, scalings = stacks(16, 12, 8, dtype, device, seed=fresh_seed())
    x, base = torch.randn(0, 16, dtype=dtype, device=device), torch.randn(0, 12, dtype=dtype, device=device)
    ids = torch.zeros(0, dtype=torch.int32, device=device)
    with on_face(backend):
        s = bgmv_shrink(x, a, ids)
        out = bgmv_expand(base, torch.randn(0, 8, dtype=dtype, device=device), b, scalings, ids)
    assert s.shape == (0, 8) and out.shape == (0, 12) and s.dtype == out.dtype == dtype


@pytest.mark.parametrize("device,backend", face_params(bgmv_shrink))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_faces_read_offset_and_strided_rows(device, backend, dtype):
    """x, base and s starting one element into their storage (pointers off 16-byte alignment), then
    as slices of wider tensors (rows strided beyond K, N and R); the stacks one element in."""
    T, K, N, R = 13, 40, 24, 16
    m = wide_rank_batch(T, K, N, R, dtype, device)
    ids = m["batch"].adapter_ids
    a, b = offset_view(m["a"]), offset_view(m["b"])
    for layout in (offset_view, wide_rows):
        x, base, s = (layout(m[name]) for name in ("x", "base", "s"))
        assert x.storage_offset() % 8 == 1 or x.stride(0) > K
        with on_face(backend):
            got_s = bgmv_shrink(x, a, ids)
            got_out = bgmv_expand(base, s, b, m["scalings"], ids)
        assert_close(got_s, m["s_ref"], dtype, msg=f"bgmv_shrink, {layout.__name__}")
        assert_close(got_out, m["out_ref"], dtype, msg=f"bgmv_expand, {layout.__name__}")


def rows_past_int32_check(device, backend, T, K, N, R, dtype):
    """bgmv_shrink of x [T, K] and bgmv_expand of base [T, N] on `backend`; the first and last 8
    tokens against the per-row reference on those tokens alone (x freed before base is made)."""
    a, b, scalings = stacks(K, N, R, dtype, device, ranks=(R, 1, R - 3, 2, R // 2 + 1, R), seed=fresh_seed())
    ids = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    ids[-1] = S - 1
    ends = (slice(0, 8), slice(T - 8, T))
    x = torch.randn(T, K, dtype=dtype, device=device)
    with on_face(backend):
        s = bgmv_shrink(x, a, ids)
    x_ends = [x[rows].clone() for rows in ends]
    del x
    base = torch.randn(T, N, dtype=dtype, device=device)
    with on_face(backend):
        out = bgmv_expand(base, s, b, scalings, ids)
    assert s.shape == (T, R) and out.shape == (T, N)
    for rows, x_rows in zip(ends, x_ends):
        assert_close(s[rows], bgmv_shrink_reference(x_rows, a, ids[rows]), dtype, msg=f"bgmv_shrink, rows {rows}")
        assert_close(out[rows], bgmv_expand_reference(base[rows], s[rows], b, scalings, ids[rows]), dtype,
                     msg=f"bgmv_expand, rows {rows}")


@pytest.mark.parametrize("device,backend", gpu_face_params(bgmv_shrink))
def test_faces_index_rows_beyond_int32(release_gpu_memory, device, backend):
    """x [T, 4096] and base [T, 4096] bf16 with T·K = T·N > 2³¹ (T = ROWS_PAST_INT32: 4.3 GB
    each, x freed before base and out are made: 8.6 GB at most), rank 16: the last tokens' element
    offsets pass int32's range. Each tensor read or written once (~1 ms each at 4.3 TB/s) after
    the kernels' JIT: seconds on an H200 (estimate)."""
    T = ROWS_PAST_INT32
    assert (T - 1) * 4096 >= 2**31
    rows_past_int32_check(device, backend, T, 4096, 4096, 16, torch.bfloat16)
