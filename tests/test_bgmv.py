"""BGMV (per-token gathered LoRA products): every face against the per-row reference, and clear refusals."""

import pytest
import torch

from fastpeft.ops import AdapterBatch, bgmv_expand, bgmv_shrink
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from adapter_stacks import FACE_SHAPES, S, id_patterns, mixed_batch, stacks
from conftest import DTYPES, assert_close, device_params, face_params, on_face


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
