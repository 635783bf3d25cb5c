"""SGMV (segmented gathered LoRA products) and the AdapterBatch routing it reads: every face against
the per-row reference, and clear refusals."""

import pytest
import torch

from fastpeft.ops import AdapterBatch, sgmv_expand, sgmv_shrink
from fastpeft.ops.bgmv import bgmv_shrink_reference

from adapter_stacks import FACE_SHAPES, S, id_patterns, mixed_batch, stacks
from conftest import DTYPES, assert_close, device_params, face_params, on_face


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
