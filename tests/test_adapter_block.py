"""adapter_block: the reference against float64 and autograd, every face against the reference, the
bottleneck block that uses it, and bad input."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.methods.bottleneck import AdapterBlock
from fastpeft.nn import PHMLinear
from fastpeft.ops import adapter_block, adapter_block_fwd, record_faces
from fastpeft.ops.adapter_block import ACTIVATIONS, adapter_block_bwd_reference, adapter_block_fwd_reference

from conftest import (DTYPES, TOLERANCES, assert_close, assert_refused_before_any_face, face_params, offset_view, on_face,
                      wide_rows)

TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
                     "silu": F.silu, "tanh": torch.tanh, "identity": lambda z: z}
# The rows and bottleneck widths the brief asks for; the Triton interpreter's tiles are 16 wide, so
# 7 and 33 rows and widths 5 and 48 leave ragged tiles, and 48 takes the kernels' bottleneck-chunk loop.
ROWS = [1, 7, 33]
WIDTHS = [1, 5, 16, 48]
# (in_features, out_features): sequential blocks read h itself (in = out); the parallel one reads
# the module's input, of another width.
FEATURES = {"sequential": (40, 40), "parallel": (24, 40)}


def make_block(M, K, N, R, dtype, device="cpu", bias=True):
    """Fresh random inputs scaled so every output is O(1) (never zeros: Wu is random too)."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
    return dict(x=rnd(M, K), h=rnd(M, N), w_down=rnd(R, K, scale=K ** -0.5), b_down=rnd(R, scale=0.5) if bias else None,
                w_up=rnd(N, R, scale=R ** -0.5), b_up=rnd(N, scale=0.5) if bias else None)


def upstream_grad(shape, like):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(like)


def run(inputs, scaling, activation, backend, sequential=False, layout=None):
    """y and the gradients of every input through the public op on one backend (x is h when sequential).
    layout: a function placing x, h and both weights' values in memory (offset_view, wide_rows;
    default: clones)."""
    place = {k: layout or torch.clone for k in ("x", "h", "w_down", "w_up")}
    leaves = {k: place.get(k, torch.clone)(v.detach()).requires_grad_() for k, v in inputs.items() if v is not None}
    x = leaves["h"] if sequential else leaves["x"]
    with on_face(backend):
        y = adapter_block(x, leaves["h"], leaves["w_down"], leaves.get("b_down"), leaves["w_up"], leaves.get("b_up"),
                          scaling, activation)
        y.backward(upstream_grad(y.shape, y))
    return {"y": y, **{f"grad_{k}": v.grad for k, v in leaves.items() if v.grad is not None}}


def bias_grad_magnitudes(inputs, scaling, activation, sequential=False):
    """Σ over rows of |each row's term| for the two bias gradients (sums over rows). Rows of opposite
    sign cancel, so the error of a half-precision sum scales with these, not with the sum itself."""
    b = {k: v.float() for k, v in inputs.items() if v is not None}
    x = b["h"] if sequential else b["x"]
    dy = upstream_grad(b["h"].shape, b["h"])
    z = (x @ b["w_down"].T + b.get("b_down", 0)).requires_grad_()
    dz, = torch.autograd.grad(TORCH_ACTIVATIONS[activation](z), z, scaling * dy @ b["w_up"])
    return {"grad_b_down": dz.abs().sum(0).max().item(), "grad_b_up": (scaling * dy).abs().sum(0).max().item()}


def compare(actual, expected, dtype, what, magnitudes=None):
    """Each output within the dtype's tolerance of the reference; atol scales with the largest
    expected value, or for a sum over rows with the sum of its terms' magnitudes (`magnitudes`)."""
    assert set(actual) == set(expected), what
    for name, exp in expected.items():
        got = actual[name]
        assert got.dtype == exp.dtype and got.shape == exp.shape, f"{name} {what}"
        if magnitudes and name in magnitudes and dtype != torch.float32:
            rtol, atol = TOLERANCES[dtype]
            scale = max(1.0, exp.abs().max().item(), magnitudes[name])
            torch.testing.assert_close(got.float(), exp.float(), rtol=rtol, atol=atol * scale, msg=f"{name} ({what})")
        else:
            assert_close(got, exp, dtype, msg=f"{name} ({what})")


# ---------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_float64_formula(activation):
    b = make_block(6, 12, 10, 4, torch.float64)
    truth = b["h"] + 1.5 * (TORCH_ACTIVATIONS[activation](b["x"] @ b["w_down"].T + b["b_down"]) @ b["w_up"].T
                            + b["b_up"])
    y = adapter_block_fwd_reference(*(v.float() for v in b.values()), 1.5, activation)
    assert_close(y, truth.float(), torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_matches_autograd(activation):
    """The hand-written backward (with its act') against autograd through the reference forward."""
    b = make_block(9, 12, 10, 5, torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in b.items()}
    y = adapter_block_fwd_reference(*leaves.values(), 0.7, activation)
    dy = torch.randn(y.shape)
    y.backward(dy)
    gx, gwd, gbd, gwu = adapter_block_bwd_reference(dy, b["x"], b["w_down"], b["b_down"], b["w_up"], 0.7, activation)
    for got, leaf in ((gx, "x"), (gwd, "w_down"), (gbd, "b_down"), (gwu, "w_up")):
        assert_close(got, leaves[leaf].grad, msg=leaf)
    assert leaves["w_down"].grad.abs().max() > 0  # the test can fail: the down-projection is reached


# ---------------------------------------------------------------- every face against the reference

@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("R", WIDTHS)
def test_face_matches_reference(device, backend, dtype, M, R):
    # Every activation and both layouts come round across the grid (each also has its own test below).
    activation = ACTIVATIONS[(ROWS.index(M) * len(WIDTHS) + WIDTHS.index(R)) % len(ACTIVATIONS)]
    layout = "sequential" if (ROWS.index(M) + WIDTHS.index(R)) % 2 else "parallel"
    b = make_block(M, *FEATURES[layout], R, dtype, device)
    what = f"{backend} vs reference, {activation}, {layout}, M={M}, R={R}"
    sequential = layout == "sequential"
    compare(run(b, 1.5, activation, backend, sequential), run(b, 1.5, activation, "torch", sequential), dtype, what,
            bias_grad_magnitudes(b, 1.5, activation, sequential))


@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", list(FEATURES))
def test_each_activation_matches_reference(device, backend, dtype, activation, layout):
    b = make_block(33, *FEATURES[layout], 48, dtype, device)
    sequential = layout == "sequential"
    compare(run(b, 0.8, activation, backend, sequential), run(b, 0.8, activation, "torch", sequential), dtype,
            f"{backend} vs reference, {activation}, {layout}", bias_grad_magnitudes(b, 0.8, activation, sequential))


@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [257, 300])
def test_bottleneck_wider_than_the_largest_rank_block(device, backend, dtype, R):
    # Above 256 the GPU kernels loop over 256-wide chunks, each adding onto y (forward) and dx
    # (backward) written by the previous chunk, with a barrier between; the interpreter's 16-wide
    # chunks take the same loop 17-19 times.
    b = make_block(33, *FEATURES["parallel"], R, dtype, device)
    compare(run(b, 1.25, "gelu", backend), run(b, 1.25, "gelu", "torch"), dtype, f"{backend} vs reference, R={R}",
            bias_grad_magnitudes(b, 1.25, "gelu"))


@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
def test_without_biases_frozen_weights_and_leading_dimensions(device, backend):
    b = make_block(2 * 5, 24, 40, 6, torch.float32, device, bias=False)
    x = b["x"].view(2, 5, 24).requires_grad_()
    h = b["h"].view(2, 5, 40)
    with on_face(backend):
        y = adapter_block(x, h, b["w_down"], None, b["w_up"], None, 2.0, "silu")
        y.square().sum().backward()
    assert y.shape == (2, 5, 40)
    expected = adapter_block_fwd_reference(b["x"], b["h"], b["w_down"], None, b["w_up"], None, 2.0, "silu")
    assert_close(y.reshape(10, 40), expected)
    ref_x = b["x"].clone().requires_grad_()
    ref_y = adapter_block_fwd_reference(ref_x, b["h"], b["w_down"], None, b["w_up"], None, 2.0, "silu")
    ref_y.square().sum().backward()
    assert_close(x.grad.reshape(10, 24), ref_x.grad)
    assert b["w_down"].grad is None and b["w_up"].grad is None


@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_up_projection_returns_h_exactly(device, backend, activation):
    """Identity init (Wu = 0, bu = 0) must leave h bit-for-bit: the bottleneck adapters promise it."""
    b = make_block(7, 24, 40, 5, torch.float32, device)
    b["w_up"].zero_()
    b["b_up"].zero_()
    with on_face(backend):
        y = adapter_block(*b.values(), 3.0, activation)
    assert torch.equal(y, b["h"])


@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
def test_empty_batch(device, backend):
    b = make_block(0, 24, 40, 5, torch.float32, device)
    out = run(b, 1.0, "relu", backend)
    assert out["y"].shape == (0, 40)
    assert torch.equal(out["grad_w_down"], torch.zeros(5, 24, device=device))



@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [offset_view, wide_rows])
def test_face_reads_offset_and_strided_rows(device, backend, dtype, layout):
    """x, h and both weights one element into their storage (pointers off 16-byte alignment), or
    rows of each strided beyond its length (slices of wider tensors): forward and backward of the
    parallel block against the reference on contiguous inputs."""
    b = make_block(19, *FEATURES["parallel"], 5, dtype, device)
    what = f"{backend} vs reference, {layout.__name__}"
    compare(run(b, 1.5, "gelu", backend, layout=layout), run(b, 1.5, "gelu", "torch"), dtype, what,
            bias_grad_magnitudes(b, 1.5, "gelu"))

@pytest.mark.parametrize("device,backend", face_params(adapter_block_fwd))
def test_face_selected_is_the_face_that_runs(device, backend):
    """Forward and backward both run the face forced, and the automatic choice is the one select() names."""
    b = make_block(4, 8, 8, 2, torch.float32, device)
    trained = {**b, "w_down": b["w_down"].clone().requires_grad_()}
    with on_face(backend) as taken:
        adapter_block(*trained.values(), 1.0, "relu").sum().backward()
    assert taken == [("adapter_block_fwd", backend), ("adapter_block_bwd", backend)]
    with record_faces() as taken:
        adapter_block_fwd(*b.values(), 1.0, "relu")
    assert taken == [("adapter_block_fwd", adapter_block_fwd.select(b["x"].device, *b.values(), 1.0, "relu"))]


def test_opcheck():
    b = make_block(9, 24, 20, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastpeft.adapter_block_fwd.default, (*b.values(), 0.5, "gelu"))
    dy = torch.randn(9, 20)
    torch.library.opcheck(torch.ops.fastpeft.adapter_block_bwd.default,
                          (dy, b["x"], b["w_down"], b["b_down"], b["w_up"], 0.5, "gelu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_triton_face(dtype):
    b = make_block(70, 96, 64, 48, dtype, "cuda")
    torch.library.opcheck(torch.ops.fastpeft.adapter_block_fwd_triton.default, (*b.values(), 0.5, "gelu_tanh"))
    dy = torch.randn(70, 64, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.fastpeft.adapter_block_bwd_triton.default,
                          (dy, b["x"], b["w_down"], b["b_down"], b["w_up"], 0.5, "gelu_tanh"))


# ---------------------------------------------------------------- the bottleneck block uses it

def _count_fused_calls(monkeypatch):
    calls = []
    original = type(adapter_block_fwd).run

    def counting(self, backend, *args):
        if self is adapter_block_fwd:
            calls.append(backend)
        return original(self, backend, *args)
    monkeypatch.setattr(type(adapter_block_fwd), "run", counting)
    return calls


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_bottleneck_block_runs_the_fused_op_and_equals_its_modules(monkeypatch, non_linearity):
    block = AdapterBlock(nn.Linear(24, 6), nn.Linear(6, 40), non_linearity, scaling=3.0)
    x, h = torch.randn(2, 7, 24), torch.randn(2, 7, 40)
    calls = _count_fused_calls(monkeypatch)
    y = block(x, h)
    assert calls == ["cpu"]
    assert_close(y, h + 3.0 * block.up(block.act(block.down(x))))


def test_compacter_block_keeps_the_module_sequence(monkeypatch):
    block = AdapterBlock(PHMLinear(8, 4, 2), PHMLinear(4, 8, 2), "relu", scaling=1.0)
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(3, 8)
    assert_close(block(x, x), x + block.up(block.act(block.down(x))))
    assert calls == []


# ---------------------------------------------------------------- bad input

def _good():
    return make_block(5, 12, 10, 3, torch.float32)


BAD = {
    "x features differ from w_down": (dict(x=torch.randn(5, 13)), ValueError,
                                      r"w_down must be \[bottleneck, in_features\] = \[R, 13\]; got \[3, 12\]"),
    "w_up bottleneck differs": (dict(w_up=torch.randn(10, 4)), ValueError,
                                r"w_up must be \[out_features, bottleneck\] = \[N, 3\]; got \[10, 4\]"),
    "h width differs from w_up": (dict(h=torch.randn(5, 11)), ValueError,
                                  r"h \(the residual\) must be \[tokens, out_features\] = \[5, 10\]; got \[5, 11\]"),
    "b_down wrong length": (dict(b_down=torch.randn(4)), ValueError, r"b_down must be \[bottleneck\] = \[3\]; got \[4\]"),
    "b_up wrong length": (dict(b_up=torch.randn(9)), ValueError, r"b_up must be \[out_features\] = \[10\]; got \[9\]"),
    "bottleneck zero": (dict(w_down=torch.randn(0, 12), b_down=None, w_up=torch.randn(10, 0)), ValueError,
                        r"bottleneck width R must be >= 1; w_down has shape \[0, 12\]"),
    "leading dimensions differ": (dict(h=torch.randn(6, 10)), ValueError, r"must have the same leading dimensions"),
    "unsupported dtype": ({k: v.double() for k, v in _good().items()}, TypeError,
                          r"x has dtype torch.float64; supported"),
    "mixed dtypes": (dict(w_up=torch.randn(10, 3, dtype=torch.bfloat16)), TypeError,
                     r"w_up has dtype torch.bfloat16 but x has torch.float32"),
    "mixed devices": (dict(b_up=torch.randn(10, device="meta")), ValueError, r"b_up is on meta but x is on cpu"),
    "non-contiguous h": (dict(h=torch.randn(5, 20)[:, ::2]), ValueError,
                         r"h must be contiguous in its last dimension; got strides \[20, 2\]"),
    "w_down not 2-D": (dict(w_down=torch.randn(3, 12, 1)), ValueError, r"w_down must be \[bottleneck, in_features\]"),
    "x not a tensor": (dict(x=[[1.0] * 12] * 5), TypeError, r"x must be a Tensor, got list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_face(case, monkeypatch):
    change, exc, pattern = BAD[case]
    args = {**_good(), **change}
    assert_refused_before_any_face(monkeypatch, adapter_block_fwd, lambda: adapter_block(*args.values(), 1.0, "relu"),
                                   exc, pattern)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(activation="elu"), ValueError, r"activation must be one of \['relu', 'gelu', 'gelu_tanh', 'silu'"),
    (dict(scaling=float("nan")), TypeError, r"scaling must be a finite float, got nan"),
])
def test_bad_activation_and_scaling(kwargs, exc, pattern):
    call = {"scaling": 1.0, "activation": "relu", **kwargs}
    with pytest.raises(exc, match=pattern):
        adapter_block(*_good().values(), call["scaling"], call["activation"])


def test_direct_op_call_checks_too():
    b = _good()
    b["w_up"] = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"w_up must be \[out_features, bottleneck\]"):
        torch.ops.fastpeft.adapter_block_fwd(*b.values(), 1.0, "relu")
