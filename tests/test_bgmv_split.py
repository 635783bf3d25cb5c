"""The Triton BGMV shrink's K split (fastpeft/kernels/bgmv.py: a [BLOCK_R, BLOCK_K] fp32
accumulator reduced once per program, K split into parts when the tokens and rank blocks make less
than a wave, the parts' fp32 sums added in a fixed order by a second kernel), through the
interpreter, against the per-row reference: ragged shapes, rank 1, one token, ids -1 mixed in,
no tokens, forward and backward."""

import pytest
import torch

from fastpeft.kernels import aot
from fastpeft.kernels import bgmv as triton_bgmv
from fastpeft.nn import MultiLoRALinear, use_adapter_batch
from fastpeft.ops import AdapterBatch, bgmv_shrink
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from conftest import DTYPES, assert_close, on_face

S = 5

# (T, K, R, parts the plan must choose under the interpreter's BLOCK_K of 32, for 132 SMs: what the
# interpreter's CPU tensors plan for)
SHAPES = [
    (1, 45, 8, 2),     # one token, ragged K over two parts
    (1, 1, 1, 1),      # rank 1, one input
    (3, 200, 1, 7),    # rank 1, a part per trip, the last one short
    (5, 33, 40, 2),    # R = 40 in one 64-row block; the second part one column
    (37, 300, 3, 4),   # many tokens, still under a wave: 4 parts of 3, 3, 3 and 1 trips
    (70, 24, 16, 1),   # K within one trip: no split
    (9, 129, 70, 5),   # R above the largest rank block: two rank blocks, a part per trip
    (1, 96, 8, 3),     # split 4 ways over 3 trips: 3 parts
]


def _ids(T):
    ids = torch.randint(-1, S, (T,), dtype=torch.int32)
    ids[0] = -1 if T > 1 else ids[0]
    ids[-1] = S - 1
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,R,parts", SHAPES)
def test_triton_shrink_matches_reference(T, K, R, parts, dtype):
    x = torch.randn(T, K).to(dtype)
    a = (torch.randn(S, R, K) / K ** 0.5).to(dtype)
    ids = _ids(T)
    assert triton_bgmv.shrink_plan(T, K, R, 132)[2] == parts
    with aot.record_launches() as launches:  # what the launcher launches, nothing run
        triton_bgmv.bgmv_shrink(x, a, ids)
    names = [launch.name for launch in launches]
    assert names == ["_bgmv_shrink_kernel"] + (["_sum_parts_kernel"] if parts > 1 else []), names
    assert launches[0].grid[2] == parts
    with on_face("triton"):
        s = bgmv_shrink(x, a, ids)
    expected = bgmv_shrink_reference(x.float(), a.float(), ids)
    assert s.dtype == dtype and s.shape == (T, R)
    assert_close(s, expected, dtype)
    assert torch.equal(s[ids == -1].float(), torch.zeros((ids == -1).sum(), R))
    with pytest.raises(AssertionError):  # the comparison sees an error of 5 % of the largest output
        assert_close(s.float() + 0.05 * max(1.0, expected.abs().max().item()), expected, dtype)


def test_every_part_is_summed():
    """A split whose second part were dropped (or counted twice) would differ: the parts' sums
    are each a large share of the result."""
    T, K, R = 2, 64, 4
    x, a = torch.ones(T, K), torch.ones(S, R, K)
    ids = torch.tensor([0, 3], dtype=torch.int32)
    assert triton_bgmv.shrink_plan(T, K, R, 132)[2] == 2
    with on_face("triton"):
        assert torch.equal(bgmv_shrink(x, a, ids), torch.full((T, R), float(K)))


@pytest.mark.parametrize("T,K,R", [(0, 45, 8), (3, 0, 8)])
def test_no_tokens_or_no_inputs(T, K, R):
    x, a = torch.randn(T, K), torch.randn(S, R, K)
    ids = torch.randint(0, S, (T,), dtype=torch.int32)
    s = triton_bgmv.bgmv_shrink(x, a, ids)
    assert s.shape == (T, R) and torch.equal(s, torch.zeros(T, R))


def test_strided_stack_as_the_backward_passes_it():
    """ds = shrink(dy, Bᵀ): the stack is a transposed view (unit stride along R, not K)."""
    T, N, R = 6, 70, 8
    dy, b = torch.randn(T, N), torch.randn(S, N, R)
    ids = _ids(T)
    assert triton_bgmv.shrink_plan(T, N, R, 132)[2] > 1
    with on_face("triton"):
        s = bgmv_shrink(dy, b.transpose(1, 2), ids)
    assert_close(s, bgmv_shrink_reference(dy, b.transpose(1, 2), ids))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_layer_trains_through_the_split(dtype):
    """A decode batch (BGMV) through MultiLoRALinear on the Triton face, forward and backward,
    K and N split: the gradients of x and both stacks are the reference's."""
    T, K, N, R = 7, 70, 45, 8
    base = torch.nn.Linear(K, N).to(dtype)
    layer = MultiLoRALinear(base, S, R)
    for slot in range(S):
        r = 1 + slot % R
        layer.set_adapter(slot, torch.randn(r, K).to(dtype) / K ** 0.5, torch.randn(N, r).to(dtype), 0.5 + slot)
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    ids = _ids(T)
    x = torch.randn(T, K).to(dtype).requires_grad_()
    dy = torch.randn(T, N).to(dtype)
    batch = AdapterBatch.build(ids, S, layer.loaded)
    assert not batch.prefers_segments()
    assert triton_bgmv.shrink_plan(T, K, R, 132)[2] > 1 and triton_bgmv.shrink_plan(T, N, R, 132)[2] > 1
    with on_face("triton") as taken, use_adapter_batch(batch):
        out = layer(x)
        (out.float() * dy.float()).sum().backward()
    assert ("bgmv_shrink", "triton") in taken
    got = (out, x.grad, layer.lora_a.grad, layer.lora_b.grad)

    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, layer.lora_a, layer.lora_b))
    ref = bgmv_expand_reference(base.float()(xr), bgmv_shrink_reference(xr, ar, batch.adapter_ids), br,
                                layer.scalings, batch.adapter_ids)
    (ref * dy.float()).sum().backward()
    for g, want in zip(got, (ref, xr.grad, ar.grad, br.grad)):
        assert_close(g, want.to(dtype), dtype)


def test_aot_list_holds_every_launch(monkeypatch):
    """Every launch the shrink makes on a GPU (one part and split, each rank block) has its
    configuration in aot_configs, which CI compiles (the GPU's tiles: not the interpreter's)."""
    from fastpeft.kernels import _common
    monkeypatch.setattr(triton_bgmv, "triton_interpreting", lambda: False)
    listed = {(kernel.fn.__name__, tuple(sorted(constexprs.items())), sig.get("out_ptr", sig.get("s_ptr")))
              for kernel, sig, constexprs, _ in (*triton_bgmv.aot_configs(), *_common.aot_configs())}
    import fastpeft.kernels.bgmv as mod
    meta = dict(device="meta", dtype=torch.bfloat16)
    for T, R in [(64, 16), (1, 16), (200, 16), (64, 64), (8, 32), (300, 64), (4, 8)]:
        with aot.target_arch(90), aot.record_launches() as launches:
            mod.bgmv_shrink(torch.empty(T, 4096, **meta), torch.empty(8, R, 4096, **meta),
                            torch.zeros(T, dtype=torch.int32, device="meta"))
        for launch in launches:
            consts = {k: v for k, v in launch.kwargs.items() if k.isupper()}
            out = launch.args[3] if launch.name == "_bgmv_shrink_kernel" else launch.args[1]
            ptr = "*fp32" if out.dtype == torch.float32 else "*bf16"
            assert (launch.name, tuple(sorted(consts.items())), ptr) in listed, (launch.name, consts, ptr)
