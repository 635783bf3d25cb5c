"""Models built on the meta device and materialised later (``to_empty`` + a state dict load), as big
models are made: every fastpeft module and get_peft_model work there, and compute afterwards what
the same module built on the CPU computes."""

import pytest
import torch
import torch.nn as nn

from fastpeft.nn import LoRALinear

from conftest import assert_close


def _materialise(module: nn.Module, state: dict) -> nn.Module:
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_on_meta_then_loaded(bias):
    torch.manual_seed(0)
    real = LoRALinear(nn.Linear(64, 48, bias=bias), r=4, init_lora_weights=False)
    with torch.device("meta"):
        meta = LoRALinear(nn.Linear(64, 48, bias=bias), r=4, init_lora_weights=False)
    x = torch.randn(5, 64)
    out = meta(x.to("meta"))  # shapes known before any weight is
    assert out.is_meta and out.shape == (5, 48)
    _materialise(meta, real.state_dict())
    assert_close(meta(x), real(x))
