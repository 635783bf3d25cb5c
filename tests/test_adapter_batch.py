"""AdapterBatch builds SGMV's routing on first use, once per batch: a decode batch in inference
(BGMV) never builds it; a prefill (SGMV) builds it in its first layer and every other layer and
every copy of the batch shares it; what it builds is route()'s routing of the ids."""

import torch

from fastpeft.nn import MultiLoRALinear, use_adapter_batch
from fastpeft.ops import AdapterBatch
from fastpeft.ops.adapter_batch import SEGMENT_MIN_TOKENS, route
from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference

from conftest import assert_close

S = 4


def _layers(n=2, K=20, N=20, R=4):
    layers = []
    for _ in range(n):
        layer = MultiLoRALinear(torch.nn.Linear(K, N), S, R)
        for slot in range(S):
            layer.set_adapter(slot, torch.randn(R, K) / K ** 0.5, torch.randn(N, R), 0.5 + slot)
        layers.append(layer)
    return layers


def _reference(layer, x, ids):
    return bgmv_expand_reference(layer.base_layer(x), bgmv_shrink_reference(x, layer.lora_a, ids), layer.lora_b,
                                 layer.scalings, ids)


def test_decode_inference_builds_no_routing():
    layers = _layers()
    T = SEGMENT_MIN_TOKENS - 1
    ids = torch.randint(-1, S, (T,))
    batch = AdapterBatch.build(ids, S, layers[0].loaded)
    assert not batch.prefers_segments() and not batch.routing_built
    x = torch.randn(T, 20)
    with torch.no_grad(), use_adapter_batch(batch):
        h = layers[0](x)
        y = layers[1](h)
    assert not batch.routing_built  # BGMV read the ids alone
    assert_close(h, _reference(layers[0], x, batch.adapter_ids))
    assert_close(y, _reference(layers[1], h, batch.adapter_ids))


def test_prefill_builds_the_routing_once_for_every_layer():
    layers = _layers(3)
    T = SEGMENT_MIN_TOKENS + 7
    ids = torch.randint(-1, S, (T,))
    batch = AdapterBatch.build(ids, S, layers[0].loaded).with_lease(object())
    calls = []
    import fastpeft.ops.adapter_batch as module
    original = module.route
    module.route = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        x = torch.randn(T, 20)
        with torch.no_grad(), use_adapter_batch(batch):
            h = x
            for layer in layers:
                expected = _reference(layer, h, batch.adapter_ids)
                h = layer(h)
                assert_close(h, expected)
    finally:
        module.route = original
    assert batch.prefers_segments() and batch.routing_built and len(calls) == 1
    want = route(batch.adapter_ids, S)
    for got, expected in zip(batch.segments, want):
        assert torch.equal(got, expected)


def test_copies_share_the_routing_and_training_builds_it():
    """with_lease's copy and the original share one routing whichever builds it; a decode batch
    that trains builds it (the stacks' gradients sum per segment) and trains correctly."""
    (layer,) = _layers(1)
    T = 5
    ids = torch.randint(-1, S, (T,))
    ids[0] = 1
    batch = AdapterBatch.build(ids, S, layer.loaded)
    leased = batch.with_lease(object())
    assert not batch.routing_built and not leased.routing_built
    x = torch.randn(T, 20, requires_grad=True)
    layer.lora_a.requires_grad_(True)
    with use_adapter_batch(leased):
        y = layer(x)
    assert leased.routing_built and batch.routing_built and batch.sorted_tokens is leased.sorted_tokens
    y.square().sum().backward()
    xr, ar = x.detach().requires_grad_(), layer.lora_a.detach().requires_grad_()
    ref = bgmv_expand_reference(layer.base_layer(xr), bgmv_shrink_reference(xr, ar, batch.adapter_ids),
                                layer.lora_b.detach(), layer.scalings, batch.adapter_ids)
    ref.square().sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(layer.lora_a.grad, ar.grad)


def test_per_sequence_ids_of_a_decode_step_are_the_tokens_ids():
    """One token per sequence: the ids are used as they are (no repeat), int32 on the device."""
    ids = torch.randint(-1, S, (7,))
    batch = AdapterBatch.build(ids, S, tokens_per_row=1, per_sequence=True)
    assert batch.per_sequence is None and batch.adapter_ids.dtype == torch.int32
    assert torch.equal(batch.adapter_ids, ids.to(torch.int32))
    prompt = AdapterBatch.build(ids, S, tokens_per_row=3, per_sequence=True)
    assert torch.equal(prompt.adapter_ids, ids.to(torch.int32).repeat_interleave(3))
    assert torch.equal(prompt.per_sequence.adapter_ids, ids.to(torch.int32))


def test_gpu_ids_take_sgmv_from_the_static_models_threshold():
    """Ids on the CPU switch to SGMV at SEGMENT_MIN_TOKENS (16); ids anywhere else (a GPU; meta
    tensors here, as the static model records a GPU's launches) at SEGMENT_MIN_TOKENS_GPU (64)."""
    from fastpeft.ops.adapter_batch import SEGMENT_MIN_TOKENS_GPU, segment_min_tokens
    assert (SEGMENT_MIN_TOKENS, SEGMENT_MIN_TOKENS_GPU) == (16, 64)
    assert segment_min_tokens(torch.device("cpu")) == 16 and segment_min_tokens(torch.device("meta")) == 64
    for T in (16, 32, 63, 64, 65):
        cpu = AdapterBatch.from_ids(torch.zeros(T, dtype=torch.int32), S)
        gpu = AdapterBatch.from_ids(torch.zeros(T, dtype=torch.int32, device="meta"), S)
        assert cpu.prefers_segments()
        assert gpu.prefers_segments() == (T >= 64), T
