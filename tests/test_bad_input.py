"""Bad input to lora_linear: a clear error naming the problem, raised before any kernel runs."""

import pytest
import torch

from fastpeft.nn import LoRALinear
from fastpeft.ops import lora_linear
from fastpeft.ops.lora_linear import lora_linear_fwd

from conftest import assert_refused_before_any_face


def good(M=5, K=12, N=10, r=3, dtype=torch.float32):
    return dict(x=torch.randn(M, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype), bias=torch.randn(N, dtype=dtype),
                lora_a=torch.randn(r, K, dtype=dtype), lora_b=torch.randn(N, r, dtype=dtype))


def call(args):
    return lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0)


CASES = {
    "x features differ from weight": (dict(x=torch.randn(5, 13)), ValueError, r"x has 13 features but weight is \[10, 12\]"),
    "lora_a wrong in_features": (dict(lora_a=torch.randn(3, 11)), ValueError, r"lora_a must be \[r, in_features\] = \[r, 12\]; got \[3, 11\]"),
    "lora_b wrong out_features": (dict(lora_b=torch.randn(9, 3)), ValueError, r"lora_b must be \[out_features, r\] = \[10, 3\]; got \[9, 3\]"),
    "lora_b rank differs from lora_a": (dict(lora_b=torch.randn(10, 4)), ValueError, r"lora_b must be .*\[10, 3\]; got \[10, 4\]"),
    "bias wrong length": (dict(bias=torch.randn(11)), ValueError, r"bias must be \[out_features\] = \[10\]; got \[11\]"),
    "rank zero": (dict(lora_a=torch.randn(0, 12), lora_b=torch.randn(10, 0)), ValueError, r"rank r must be >= 1"),
    "unsupported dtype": ({k: v.double() for k, v in good().items()}, TypeError, r"x has dtype torch.float64; supported"),
    "integer input": (dict(x=torch.ones(5, 12, dtype=torch.int32)), TypeError, r"x has dtype torch.int32"),
    "mixed dtypes": (dict(lora_a=torch.randn(3, 12, dtype=torch.float16)), TypeError, r"lora_a has dtype torch.float16 but x has torch.float32"),
    "mixed devices": (dict(lora_b=torch.randn(10, 3, device="meta")), ValueError, r"lora_b is on meta but x is on cpu"),
    "non-contiguous input": (dict(x=torch.randn(5, 24)[:, ::2]), ValueError, r"x must be contiguous in its last dimension; got strides \[24, 2\]"),
    "weight not 2-D": (dict(weight=torch.randn(10, 12, 1)), ValueError, r"weight must be 2-D"),
    "x not a tensor": (dict(x=[[1.0] * 12] * 5), TypeError, r"x must be a Tensor, got list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_before_any_face(case, monkeypatch):
    change, exc, pattern = CASES[case]
    args = {**good(), **change}
    assert_refused_before_any_face(monkeypatch, lora_linear_fwd, lambda: call(args), exc, pattern)


@pytest.mark.parametrize("case", ["x features differ from weight", "mixed dtypes", "mixed devices",
                                  "non-contiguous input", "rank zero"])
def test_bad_input_that_requires_grad_raises_before_any_face(case, monkeypatch):
    """Inputs that require grad go through the op's derivative: checked first all the same."""
    change, exc, pattern = CASES[case]
    args = {k: v.requires_grad_() for k, v in {**good(), **change}.items()}
    assert_refused_before_any_face(monkeypatch, lora_linear_fwd, lambda: call(args), exc, pattern)


def test_dropout_probability_out_of_range():
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.0"):
        lora_linear(**good(), scaling=1.0, dropout_p=1.0)


def test_direct_op_call_checks_too():
    """torch.ops.fastpeft.* called directly (no Python entry) still refuses bad shapes."""
    a = good()
    with pytest.raises((ValueError, RuntimeError), match="lora_a"):
        torch.ops.fastpeft.lora_linear_fwd(a["x"], a["weight"], a["bias"], torch.randn(3, 11), a["lora_b"], 1.0)


@pytest.mark.parametrize("r", [0, -1, 2.5, None])
def test_module_rejects_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
        LoRALinear.from_linear(torch.nn.Linear(4, 4), r=r)


def test_module_rejects_layer_without_weight():
    with pytest.raises(TypeError, match="is not a linear layer"):
        LoRALinear.from_linear(torch.nn.ReLU(), r=2)


def test_module_rejects_bad_dropout_and_init():
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(torch.nn.Linear(4, 4), r=2, lora_dropout=1.5)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear.from_linear(torch.nn.Linear(4, 4), r=2, init_lora_weights="orthogonal-ish")
    with pytest.raises(ValueError, match="rank r must be an integer >= 1, got True"):
        LoRALinear.from_linear(torch.nn.Linear(4, 4), r=True)
