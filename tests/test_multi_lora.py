"""MultiLoRALinear: each row gets its own adapter, per token or per sequence, and gradients reach only those.

The ops beneath it are tested in test_bgmv.py and test_sgmv.py."""

import pytest
import torch

from fastpeft.nn import LoRALinear, MultiLoRALinear, use_adapter_batch
from fastpeft.ops import AdapterBatch

from adapter_stacks import S
from conftest import assert_close, device_params


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


# ---------------------------------------------------------------- torch.compile: no host read anywhere

def _trainable_layer():
    _, layer, _ = multi_layer()
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    return layer


def _grads(layer, x):
    grads = (x.grad, layer.lora_a.grad, layer.lora_b.grad)
    x.grad = layer.lora_a.grad = layer.lora_b.grad = None
    return grads


@pytest.mark.parametrize("T", [6, 40])  # BGMV and SGMV
@pytest.mark.parametrize("where", ["ids given", "batch pushed"])
def test_compiled_forward_and_backward_have_no_graph_break(T, where):
    """The routing is built on the device and the backward reads no segment on the host: one
    graph (dynamo's explain: no break; fullgraph=True compiles), one compilation for every batch
    of that size whatever its ids, and eager's outputs and gradients."""
    import torch._dynamo.testing

    layer = _trainable_layer()

    def step(x, ids):
        if where == "ids given":
            return layer(x, ids)
        with use_adapter_batch(AdapterBatch.build(ids, S, layer.loaded)):  # built in the graph, routed by the stack
            return layer(x)

    x = torch.randn(T, 24, requires_grad=True)
    ids = torch.tensor(([0, 2, -1, 1] * T)[:T])
    explained = torch._dynamo.explain(step)(x, ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for seed in range(3):  # new ids each step: the same graph
        ids = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(seed))
        y = compiled(x, ids)
        (y * y).sum().backward()
        got = _grads(layer, x)
        y_eager = layer(x, ids)
        (y_eager * y_eager).sum().backward()
        assert_close(y, y_eager)
        for g, e in zip(got, _grads(layer, x)):
            assert_close(g, e)
    assert counter.frame_count == 1


@pytest.mark.parametrize("T", [6, 40])
def test_compiled_inference_has_no_graph_break(T):
    """Without gradients the layer runs the ops alone (no autograd node): one graph as well."""
    _, layer, _ = multi_layer()
    x, ids = torch.randn(T, 24), torch.tensor(([0, 2, -1, 1] * T)[:T])
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda x, ids: layer(x, ids))(x, ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        assert_close(torch.compile(lambda x, ids: layer(x, ids), fullgraph=True)(x, ids), layer(x, ids))


def test_compiled_layer_with_a_prebuilt_batch():
    """A batch built outside the compiled function (as an AdapterPool builds it) enters as tensors:
    another batch of the same size runs the same graph."""
    import torch._dynamo.testing

    layer = _trainable_layer()
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda x: layer(x), backend=counter, fullgraph=True)
    for ids in (torch.tensor([2, -1, 0]), torch.tensor([1, 1, 2])):
        batch = layer.batch_for(x, ids)
        with use_adapter_batch(batch):
            y = compiled(x)
            y.sum().backward()
        got = _grads(layer, x)
        y_eager = layer(x, ids)
        y_eager.sum().backward()
        assert_close(y, y_eager)
        for g, e in zip(got, _grads(layer, x)):
            assert_close(g, e)
    assert counter.frame_count == 1


def test_bad_ids_under_compile_are_refused_on_the_device():
    """Compiled, the ids are checked by the graph itself (no host read): the call fails, naming the rule."""
    layer = _trainable_layer()
    compiled = torch.compile(lambda x, ids: layer(x, ids), fullgraph=True)
    x = torch.randn(4, 24)
    compiled(x, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(RuntimeError, match=r"adapter id out of range: ids must be -1 \(base model\) or a slot in \[0, 6\)"):
        compiled(x, torch.tensor([0, 1, 9, -1]))
    with pytest.raises(RuntimeError, match="an adapter id points at an empty slot"):
        compiled(x, torch.tensor([0, 1, 4, -1]))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [6, 40])
def test_a_gpu_training_step_never_waits_for_the_host(T):
    """Ids from the host are checked there and copied without waiting; the routing, the forward
    and the backward run on the GPU with nothing read back (CUDA's sync debug mode raises on any
    synchronising call)."""
    _, layer, _ = multi_layer(device="cuda")
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    x = torch.randn(T, 24, device="cuda", requires_grad=True)
    ids = torch.tensor(([0, 2, -1, 1] * T)[:T])
    layer(x, ids).sum().backward()  # warm-up: first-call work (kernel loading) is not the step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, ids).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
