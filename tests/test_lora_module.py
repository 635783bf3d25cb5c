"""LoRALinear: a drop-in layer, equal to PEFT's LoRA layer on the same weights."""

import math

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.nn import LoRALinear

from conftest import DTYPES, assert_close, device_params


def make_layer(in_f=24, out_f=18, r=4, alpha=8.0, bias=True, dtype=torch.float32, device="cpu", **kw):
    base = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    return base, LoRALinear.from_linear(base, r=r, lora_alpha=alpha, init_lora_weights=kw.pop("init", False), **kw)


def test_from_linear_shares_the_weight_and_freezes_the_base():
    base, layer = make_layer()
    assert layer.weight is base.weight and layer.base_layer is base
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.default.weight", "lora_B.default.weight"]
    with torch.no_grad():
        base.weight[0, 0] = 123.0
    assert layer.weight[0, 0] == 123.0


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_at_the_base_layer(init):
    base, layer = make_layer(init=init)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    x = torch.randn(7, 24)
    assert_close(layer(x), base(x))


def test_inits_follow_peft():
    torch.manual_seed(0)
    _, kaiming = make_layer(in_f=400, r=64, init=True)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    a = kaiming.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    _, gauss = make_layer(in_f=400, r=64, init="gaussian")
    assert abs(gauss.lora_A["default"].weight.std().item() - 1 / 64) < 0.05 / 64


@pytest.mark.parametrize("use_rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(use_rslora, expected):
    _, layer = make_layer(r=4, alpha=16, use_rslora=use_rslora)
    assert layer.scaling["default"] == expected


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_peft_lora_layer(device, dtype):
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(40, 24)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    ref = peft.get_peft_model(Block(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"],
                                                       init_lora_weights=False)).to(device=device, dtype=dtype)
    peft_layer = ref.base_model.model.proj
    ours = LoRALinear.from_linear(peft_layer.base_layer, r=8, lora_alpha=16)
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(2, 9, 40, device=device, dtype=dtype)
    y_ref, y = ref(x), ours(x)
    assert_close(y, y_ref, dtype)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    for name in ("lora_A", "lora_B"):
        assert_close(getattr(ours, name)["default"].weight.grad, getattr(peft_layer, name)["default"].weight.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge_round_trip(dtype):
    base, layer = make_layer(dtype=dtype)
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, w0)
    assert_close(layer(x), y, dtype)
    assert_close(base(x), y, dtype)  # the base layer itself now carries the adapter
    layer.unmerge()
    assert not layer.merged
    # one rounding each way: within a couple of units in the last place of the weight
    ulp = torch.finfo(dtype).eps * w0.abs().max().item()
    assert (base.weight.float() - w0.float()).abs().max().item() <= 2 * ulp
    assert_close(layer(x), y, dtype)


def test_disable_adapter():
    base, layer = make_layer()
    x = torch.randn(5, 24)
    y_adapted = layer(x)
    with layer.disable_adapter():
        assert_close(layer(x), base(x))
        assert not torch.allclose(layer(x), y_adapted)
    assert_close(layer(x), y_adapted)
    layer.merge()
    with layer.disable_adapter():
        assert_close(layer(x), x @ layer.weight.T + base.bias)  # unmerged inside
        assert not layer.merged
    assert layer.merged
    assert_close(layer(x), y_adapted)


def test_conv1d_fan_in_fan_out():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=18, nx=24)  # weight [in=24, out=18]
    nn.init.normal_(conv.bias)
    layer = LoRALinear.from_linear(conv, r=3, lora_alpha=6, init_lora_weights=False)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (24, 18)
    x = torch.randn(2, 5, 24)
    expected = conv(x) + 2.0 * (x @ layer.lora_A["default"].weight.T) @ layer.lora_B["default"].weight.T
    assert_close(layer(x), expected)
    y = layer(x)
    layer.merge()
    assert_close(conv(x), y)


def test_dropout_only_in_training():
    _, layer = make_layer(lora_dropout=0.5)
    x = torch.randn(64, 24)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(y1, layer(x))


def test_non_contiguous_input_and_autocast():
    _, layer = make_layer()
    x = torch.randn(24, 10).t()  # [10, 24] with strides (1, 10)
    assert_close(layer(x), layer(x.contiguous()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, layer(x.contiguous()), torch.bfloat16)


def test_training_reduces_loss():
    torch.manual_seed(0)
    _, layer = make_layer(in_f=16, out_f=8, r=4, init=True)
    target = nn.Linear(16, 8)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(256, 16)
    losses = []
    for _ in range(60):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(16, 32)[1], nn.GELU(), make_layer(32, 8)[1])
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)
    y_eager, y_compiled = model(x), compiled(x)
    assert_close(y_compiled, y_eager)
    y_compiled.sum().backward()
    grads_compiled = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y_eager.sum().backward()
    for gc, ge in zip(grads_compiled, [p.grad for p in model.parameters() if p.requires_grad]):
        assert_close(gc, ge)


def test_state_dict_holds_base_and_adapter():
    _, layer = make_layer()
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                       "lora_B.default.weight"}


def test_forced_backends_agree_in_a_module():
    _, layer = make_layer()
    x = torch.randn(9, 24)
    with fastpeft.use_backend("torch"):
        expected = layer(x)
    assert_close(layer(x), expected)


def test_named_adapters():
    base, layer = make_layer()
    x = torch.randn(5, 24)
    y_default = layer(x)
    layer.add_adapter("other", r=2, lora_alpha=4, init_lora_weights=False)
    assert layer.active_adapter == "default" and torch.equal(layer(x), y_default)
    layer.set_adapter("other")
    expected = base(x) + 2.0 * (x @ layer.lora_A["other"].weight.T) @ layer.lora_B["other"].weight.T
    assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="adapter 'other' already exists"):
        layer.add_adapter("other", r=2, lora_alpha=4)
    with pytest.raises(KeyError, match="no adapter named 'missing'"):
        layer.set_adapter("missing")
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"] and layer.active_adapter == "default"
    assert_close(layer(x), y_default)
