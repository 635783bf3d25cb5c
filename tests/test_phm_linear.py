"""phm_linear: the reference against the block formula, every face against the reference, PHMLinear."""

import pytest
import torch
import torch.nn.functional as F

from fastpeft.nn import PHMLinear
from fastpeft.ops import phm_linear, phm_linear_fwd, record_faces
from fastpeft.ops.phm_linear import phm_dense_weight, phm_linear_fwd_reference

from conftest import DTYPES, assert_close, face_params, offset_view, on_face, wide_rows

# (phm_dim, in/n, out/n): n = 2, 3 (no power of two), 4, 8 with blocks that are not multiples of any
# tile (16, 32).
DIMS = [(2, 9, 5), (3, 7, 5), (4, 5, 3), (8, 3, 2)]


def make_factors(n, q, p, rank, dtype, device="cpu", generator=None):
    """Random factors scaled so y is O(1); rank None: full Bᵢ."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
    rule = rnd(n, n, n, scale=n ** -0.5)
    if rank is None:
        return dict(phm_rule=rule, phm_b=rnd(n, p, q, scale=(n * q) ** -0.5))
    return dict(phm_rule=rule, phm_b_left=rnd(n, p, rank, scale=rank ** -0.5),
                phm_b_right=rnd(n, rank, q, scale=(n * q) ** -0.5))


def run(x, factors, bias, backend, layout=None):
    """y and the gradients of x, every factor and bias through the public op on one backend.
    layout: a function placing x's values in memory (offset_view, wide_rows; default: a clone)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in dict(factors, x=x, bias=bias).items()}
    if layout is not None:
        leaves["x"] = layout(x.detach()).requires_grad_()
    with on_face(backend):
        y = phm_linear(leaves["x"], leaves["phm_rule"], leaves.get("phm_b"), leaves.get("phm_b_left"),
                       leaves.get("phm_b_right"), leaves["bias"])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
    return {"y": y, **{f"grad_{k}": v.grad for k, v in leaves.items()}}


def test_reference_is_the_kronecker_block_formula():
    """W = Σ kron(Aᵢ, Bᵢ): block (a, b) of W is Σᵢ Aᵢ[a, b]·Bᵢ, written out by hand in float64."""
    n, q, p, r = 3, 4, 2, 2
    f = make_factors(n, q, p, r, torch.float64)
    b = f["phm_b_left"] @ f["phm_b_right"]
    w = torch.zeros(n * p, n * q, dtype=torch.float64)
    for a in range(n):
        for bb in range(n):
            w[a * p:(a + 1) * p, bb * q:(bb + 1) * q] = sum(f["phm_rule"][i, a, bb] * b[i] for i in range(n))
    assert torch.equal(phm_dense_weight(**f), w)
    x = torch.randn(5, n * q, dtype=torch.float64)
    assert_close(phm_linear_fwd_reference(x, **f), x @ w.T, torch.float32)


@pytest.mark.parametrize("rank", [None, 2], ids=["fullB", "rank2"])
def test_reference_backward_matches_autograd(rank):
    n, q, p = 4, 3, 2
    f = make_factors(n, q, p, rank, torch.float32)
    x, bias = torch.randn(6, n * q), torch.randn(n * p)
    got = run(x, f, bias, "torch")
    leaves = {k: v.clone().requires_grad_() for k, v in dict(f, x=x, bias=bias).items()}
    w = phm_dense_weight(leaves["phm_rule"], leaves.get("phm_b"), leaves.get("phm_b_left"), leaves.get("phm_b_right"))
    y = F.linear(leaves["x"], w, leaves["bias"])
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    for k, v in leaves.items():
        assert_close(got[f"grad_{k}"], v.grad, msg=k)


@pytest.mark.parametrize("device,backend", face_params(phm_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,q,p", DIMS)
@pytest.mark.parametrize("rank", [None, 2], ids=["fullB", "rank2"])
@pytest.mark.parametrize("M", [1, 19])
def test_face_matches_reference(device, backend, dtype, n, q, p, rank, M):
    f = make_factors(n, q, p, rank, dtype, device)
    x = torch.randn(M, n * q).to(device, dtype)
    bias = torch.randn(n * p).to(device, dtype)
    expected = run(x, f, bias, "torch")
    actual = run(x, f, bias, backend)
    assert set(actual) == set(expected)
    for name, exp in expected.items():
        got = actual[name]
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} ({backend} vs reference, n={n}, rank={rank}, M={M})")



@pytest.mark.parametrize("device,backend", face_params(phm_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [None, 2], ids=["fullB", "rank2"])
def test_face_takes_no_tokens(device, backend, dtype, rank):
    """M = 0: y of no rows, an empty grad_x, and factor and bias gradients of zeros, forward and backward."""
    f = make_factors(3, 7, 5, rank, dtype, device)
    x, bias = torch.randn(0, 21).to(device, dtype), torch.randn(15).to(device, dtype)
    expected = run(x, f, bias, "torch")
    actual = run(x, f, bias, backend)
    assert set(actual) == set(expected)
    for name, exp in expected.items():
        got = actual[name]
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got, torch.zeros_like(got)), name


@pytest.mark.parametrize("device,backend", face_params(phm_linear_fwd))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [None, 2], ids=["fullB", "rank2"])
@pytest.mark.parametrize("layout", [offset_view, wide_rows])
def test_face_reads_offset_and_strided_rows(device, backend, dtype, rank, layout):
    """x one element into its storage (a pointer off 16-byte alignment), or its rows strided beyond
    in_features (a slice of a wider tensor): forward and backward against the reference."""
    f = make_factors(3, 7, 5, rank, dtype, device)
    x, bias = torch.randn(19, 21).to(device, dtype), torch.randn(15).to(device, dtype)
    expected = run(x, f, bias, "torch")
    actual = run(x, f, bias, backend, layout=layout)
    for name, exp in expected.items():
        assert_close(actual[name], exp, dtype, msg=f"{name} ({backend}, {layout.__name__}, rank={rank})")

@pytest.mark.parametrize("device,backend", face_params(phm_linear_fwd))
def test_face_selected_is_the_face_that_runs(device, backend):
    """Forward and backward both run the face forced, and the automatic choice is the one select() names."""
    f = make_factors(2, 3, 3, None, torch.float32, device)
    x = torch.randn(4, 6, device=device)
    args = (f["phm_rule"], f["phm_b"], None, None, None)
    with on_face(backend) as taken:
        phm_linear(x, f["phm_rule"].clone().requires_grad_(), f["phm_b"]).sum().backward()
    assert taken == [("phm_linear_fwd", backend), ("phm_linear_bwd", backend)]
    with record_faces() as taken:
        phm_linear_fwd(x, *args)
    assert taken == [("phm_linear_fwd", phm_linear_fwd.select(x.device, x, *args))]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_leading_dimensions_and_no_bias(backend):
    f = make_factors(4, 2, 3, 1, torch.float32)
    x = torch.randn(2, 3, 8)
    with on_face(backend):
        y = phm_linear(x, **f)
    assert y.shape == (2, 3, 12)
    assert_close(y, F.linear(x, phm_dense_weight(**f)))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("rank", [None, 2], ids=["fullB", "rank2"])
def test_shared_rule_gradient_is_summed_across_layers(backend, rank):
    """Two layers of different shapes share one rule: its gradient is the sum of each layer's."""
    rule = torch.nn.Parameter(torch.randn(4, 4, 4) / 2)
    first = PHMLinear(8, 16, 4, phm_rank=rank, shared_A=rule)
    second = PHMLinear(16, 8, 4, phm_rank=rank, shared_A=rule)
    assert first.phm_rule is second.phm_rule is rule
    x = torch.randn(5, 8)
    with on_face(backend):
        second(torch.tanh(first(x))).square().sum().backward()
    together = rule.grad.clone()
    # The same computation with two independent copies of the rule: their gradients add up to it.
    copies = [torch.nn.Parameter(rule.detach().clone()) for _ in range(2)]
    first.phm_rule, second.phm_rule = copies
    with on_face(backend):
        second(torch.tanh(first(x))).square().sum().backward()
    assert copies[0].grad.abs().max() > 0 and copies[1].grad.abs().max() > 0
    assert_close(together, copies[0].grad + copies[1].grad)


@pytest.mark.parametrize("rank", [None, 3], ids=["fullB", "rank3"])
def test_module_dense_weight_is_what_forward_multiplies_by(rank):
    layer = PHMLinear(24, 12, 4, phm_rank=rank)
    with torch.no_grad():
        layer.bias.normal_()
    w = layer.dense_weight()
    assert w.shape == (12, 24)
    x = torch.randn(7, 24)
    assert_close(layer(x), F.linear(x, w, layer.bias))


def test_zero_b_makes_the_zero_map_with_live_gradients():
    layer = PHMLinear(8, 8, 2, phm_rank=1, bias=False)
    layer.zero_b()
    x = torch.randn(3, 8)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert layer.phm_b_left.grad.abs().max() > 0


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(in_features=10, out_features=8, phm_dim=4), "in_features=10 is not divisible by phm_dim=4"),
    (dict(in_features=8, out_features=6, phm_dim=4), "out_features=6 is not divisible by phm_dim=4"),
    (dict(in_features=8, out_features=16, phm_dim=4, phm_rank=3), r"phm_rank must be an int in \[1, .* = 2\]"),
    (dict(in_features=8, out_features=16, phm_dim=4, phm_rank=0), "phm_rank must be"),
    (dict(in_features=8, out_features=8, phm_dim=4, shared_A=torch.zeros(2, 2, 2)), r"shared_A must be \[phm_dim\]\*3"),
])
def test_module_refuses_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PHMLinear(**kwargs)


def test_op_refuses_bad_input_before_any_kernel():
    f = make_factors(4, 3, 2, None, torch.float32)
    with pytest.raises(ValueError, match="in_features 10 is not divisible by phm_dim 4"):
        phm_linear(torch.randn(2, 10), **f)
    with pytest.raises(ValueError, match=r"phm_b must be \[phm_dim, out_features/phm_dim, in_features/phm_dim\]"):
        phm_linear(torch.randn(2, 16), **f)
    with pytest.raises(ValueError, match=r"phm_rule must be \[n, n, n\]"):
        phm_linear(torch.randn(2, 12), torch.randn(4, 4, 3), f["phm_b"])
    with pytest.raises(ValueError, match="give either phm_b"):
        phm_linear(torch.randn(2, 12), f["phm_rule"], f["phm_b"], torch.randn(4, 2, 1), torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match=r"phm_b_right must be \[phm_dim, phm_rank, in_features/phm_dim\]"):
        phm_linear(torch.randn(2, 12), f["phm_rule"], None, torch.randn(4, 2, 1), torch.randn(4, 2, 3))
    with pytest.raises(TypeError, match="phm_b has dtype torch.float16 but x has torch.float32"):
        phm_linear(torch.randn(2, 12), f["phm_rule"], f["phm_b"].half())
    with pytest.raises(ValueError, match=r"bias must be \[out_features\] = \[8\]"):
        phm_linear(torch.randn(2, 12), **f, bias=torch.randn(7))
