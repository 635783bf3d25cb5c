"""QLoRA past one process: FSDP2 (fully_shard) with the 4-bit base sharded, and DDP; gloo, CPU."""

import pytest
import torch
import torch.nn as nn

from fastpeft.nn import Linear4bit


@pytest.mark.parametrize("double_quant", [False, True])
def test_shard_quant_state_holds_the_scales_as_a_shardable_parameter(double_quant):
    """FSDP2 shards parameters, never buffers: with shard_quant_state the per-block scales become a
    frozen uint8 parameter (a row of 4 bytes per float32 scale, so no shard splits one) that no
    mixed-precision cast touches; the layer computes and saves exactly as before, and back."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    x = torch.randn(3, 96)
    before, state = layer(x), layer.state_dict()
    assert layer.shard_quant_state() is layer
    params = dict(layer.named_parameters())
    blocks = 96 * 40 // 64
    assert params["absmax"].dtype == torch.uint8 and not params["absmax"].requires_grad
    assert params["absmax"].shape == ((blocks,) if double_quant else (blocks, 4))
    assert "absmax" not in dict(layer.named_buffers())
    assert torch.equal(layer(x), before)
    after = layer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    other = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant).shard_quant_state()
    other.load_state_dict(state)
    assert torch.equal(other(x), before) and other.absmax.dtype == torch.uint8
    layer.to(torch.bfloat16)  # a model-wide cast leaves the scales' bytes alone
    assert torch.equal(layer.state_dict()["weight.absmax"], state["weight.absmax"])
    layer.shard_quant_state(False)
    assert "absmax" in dict(layer.named_buffers()) and torch.equal(layer.absmax, state["weight.absmax"])


def test_a_cast_of_the_packed_bytes_is_refused_not_computed():
    """FSDP2's MixedPrecisionPolicy casts floating parameters: bytes stored as bf16 and cast to fp16
    would be different bytes. The layer refuses them, naming the fix."""
    layer = Linear4bit.from_linear(nn.Linear(64, 32), quant_storage=torch.bfloat16)
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float16), requires_grad=False)
    with pytest.raises(RuntimeError, match="quant_storage=torch.uint8"):
        layer(torch.randn(2, 64))
