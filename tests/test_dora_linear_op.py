"""dora_linear: the reference and every face's row norms against float64, every face against the
reference forward and backward, and bad input refused before any face runs."""

import pytest
import torch

import fastpeft

from fastpeft.ops import dora_linear, record_faces
from fastpeft.ops.dora_linear import (dora_linear_bwd_reference, dora_linear_fwd, dora_linear_fwd_reference,
                                      norm_from_products, qdora_linear, row_norms_sq)

from conftest import (DTYPES, assert_close, assert_refused_before_any_face, device_params, face_params, fresh_seed,
                      offset_view, on_face, wide_rows)

# (M, K, N, r): one token; sizes that are not multiples of any block (16, 32, 64, 128); r = 1 and
# r = 128 (A's rows fill several row tiles; the rank loops run twice); K smaller than r.
SHAPES = [(1, 16, 16, 1), (37, 45, 70, 5), (64, 64, 96, 16), (130, 96, 40, 128), (5, 300, 17, 3), (3, 24, 33, 64)]

# How the base weight's rows compare with the adapter's: ‖Wᵢ‖ dominating (a fresh adapter), the
# adapter dominating (W tiny), and the two nearly cancelling (W ≈ −0.9·s·B·A: each row's norm a
# tenth of its parts, the one case where the expansion's terms cancel).
REGIMES = ["base-dominates", "adapter-dominates", "near-cancelling"]
SCALING = 1.5


def make_inputs(M, K, N, r, dtype, device, bias=True, regime="base-dominates", seed=0):
    """x, W, bias, A, B, magnitude, built in float64 for the regime, then cast."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(M, K)
    a = rnd(r, K, scale=K ** -0.5)
    b = rnd(N, r, scale=r ** -0.5)
    if regime == "base-dominates":
        b = b * 1e-3  # a young adapter: s·B·A a thousandth of W
    delta = SCALING * b @ a
    if regime == "base-dominates":
        w = rnd(N, K, scale=K ** -0.5)
    elif regime == "adapter-dominates":
        w = rnd(N, K, scale=1e-3 * K ** -0.5)
    else:
        w = -0.9 * delta + 0.05 * rnd(N, K, scale=K ** -0.5) * delta.norm(dim=1, keepdim=True)
    # magnitudes start at the row norms (g = 1) and drift: g in [0.5, 1.5] keeps every output O(1)
    m = (w + delta).norm(dim=1) * (0.5 + torch.rand(N, generator=g, dtype=torch.float64))
    bias_t = rnd(N) if bias else None
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, bias_t, a, b, m)]


def truth(x, w, bias, a, b, m, scaling, x_lora=None):
    """The float64 definition, written out independently: y and the row norm (detached)."""
    x, w, a, b, m = (t.double() for t in (x, w, a, b, m))
    merged = w + scaling * b @ a
    norm = merged.norm(dim=1).detach()
    g = m / norm
    x_l = x if x_lora is None else x_lora.double()
    y = x @ w.T + (g - 1) * (x_l @ w.T) + g * (scaling * (x_l @ a.T) @ b.T)
    return (y if bias is None else y + bias.double()), norm


def run_op(x, w, b, a, bb, m, backend, dropout_p=0.0, seed=0, weight_norm_sq=None, layout=None):
    """Forward and backward through the public op on one backend; y and the grads of x, A, B, m, bias.
    layout: a function placing x, W, A and B's values in memory (offset_view, wide_rows; default:
    x, A, B and m cloned, W as given)."""
    place = layout or torch.clone
    w = w if layout is None else layout(w)
    leaves = [place(t.detach()).requires_grad_() for t in (x, a, bb)] + [m.detach().clone().requires_grad_()]
    bias = None if b is None else b.detach().clone().requires_grad_()
    xx, aa, bbb, mm = leaves
    torch.manual_seed(seed)
    with on_face(backend):
        y = dora_linear(xx, w, bias, aa, bbb, mm, SCALING, weight_norm_sq, dropout_p=dropout_p)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        y.backward(grad_y)
    return [y] + [t.grad for t in leaves] + ([] if bias is None else [bias.grad])


NAMES = ["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_magnitude", "grad_bias"]


# ---------------------------------------------------------------- the reference and the norms against float64

@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("M,K,N,r", SHAPES[:3])
def test_reference_matches_float64(M, K, N, r, regime):
    x, w, b, a, bb, m = make_inputs(M, K, N, r, torch.float64, "cpu", regime=regime)
    y_true, norm_true = truth(x, w, b, a, bb, m, SCALING)
    args = [t.float() for t in (x, w, b, a, bb, m)]
    y, s, z, norm = dora_linear_fwd_reference(*args[:6], row_norms_sq(args[1]), SCALING)
    assert_close(y, y_true, torch.float32)
    assert_close(norm, norm_true, torch.float32)
    assert_close(s, x @ a.T, torch.float32)
    assert_close(z, x @ (w + SCALING * bb @ a).T, torch.float32)

    # the backward against float64 autograd through the definition, the norm a constant
    leaves = [t.clone().requires_grad_() for t in (x, a, bb, m)]
    xx, aa, bbb, mm = leaves
    norm64 = (w + SCALING * bbb @ aa).norm(dim=1).detach()
    y64 = (mm / norm64) * (xx @ w.T + SCALING * (xx @ aa.T) @ bbb.T) + b
    dy = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y64.backward(dy)
    grads = dora_linear_bwd_reference(dy.float(), args[0], args[1], args[3], args[4], args[5], s, z, norm, SCALING)
    gx, gxl, ga, gb, gm = grads
    assert gxl.numel() == 0
    for got, want in zip((gx, ga, gb, gm), (xx.grad, aa.grad, bbb.grad, mm.grad)):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("regime", REGIMES)
def test_expanded_norm_matches_float64(regime):
    """‖Wᵢ‖² + 2s·Bᵢ·(A·Wᵢᵀ) + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ in float32 against ‖Wᵢ + s·Bᵢ·A‖ in float64."""
    _, w, _, a, bb, _ = make_inputs(1, 200, 300, 8, torch.float64, "cpu", regime=regime)
    want = (w + SCALING * bb @ a).norm(dim=1)
    w32, a32, b32 = w.float(), a.float(), bb.float()
    got = norm_from_products(row_norms_sq(w32), a32 @ w32.T, a32, b32, SCALING)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
@pytest.mark.parametrize("regime", REGIMES)
def test_face_norms_match_float64(device, backend, regime):
    """Each fast face's norms, from the expansion, against float64 on the float32 inputs."""
    x, w, b, a, bb, m = make_inputs(21, 130, 75, 6, torch.float32, device, regime=regime)
    _, norm_true = truth(x, w, b, a, bb, m, SCALING)
    with on_face(backend):
        y, _, _, norm = dora_linear_fwd(x, w, b, a, bb, m, row_norms_sq(w), SCALING)
    assert_close(norm, norm_true, torch.float32)
    assert_close(y, truth(x, w, b, a, bb, m, SCALING)[0], torch.float32)


def test_autograd_of_reference_matches_torch_autograd_with_the_norm_detached():
    x, w, b, a, bb, m = make_inputs(9, 20, 11, 4, torch.float32, "cpu", regime="adapter-dominates")
    got = run_op(x, w, b, a, bb, m, "torch")
    xx, aa, bbb, mm, bias = (t.clone().requires_grad_() for t in (x, a, bb, m, b))
    norm = (w + SCALING * bbb @ aa).norm(dim=1).detach()
    y = mm / norm * (xx @ w.T + SCALING * (xx @ aa.T) @ bbb.T) + bias
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    for name, g, e in zip(NAMES, got, [y, xx.grad, aa.grad, bbb.grad, mm.grad, bias.grad]):
        assert_close(g, e, msg=name)


# ---------------------------------------------------------------- every face against the reference

@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_face_matches_reference(device, backend, dtype, M, K, N, r, bias):
    x, w, b, a, bb, m = make_inputs(M, K, N, r, dtype, device, bias=bias, regime="adapter-dominates")
    expected = run_op(x, w, b, a, bb, m, "torch")
    actual = run_op(x, w, b, a, bb, m, backend)
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} ({backend} vs reference)")



@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_face_takes_no_tokens(device, backend, dtype):
    """M = 0: y of no rows, an empty grad_x, and A, B, magnitude and bias gradients of zeros
    (nothing flowed into them), forward and backward."""
    x, w, b, a, bb, m = make_inputs(0, 24, 33, 4, dtype, device, regime="adapter-dominates", seed=fresh_seed())
    expected = run_op(x, w, b, a, bb, m, "torch")
    actual = run_op(x, w, b, a, bb, m, backend)
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got, torch.zeros_like(got)), name


@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [offset_view, wide_rows])
def test_face_reads_offset_and_strided_rows(device, backend, dtype, layout):
    """x, W, A and B one element into their storage (pointers off 16-byte alignment), or rows of
    each strided beyond its length (slices of wider tensors): forward and backward against the
    reference on contiguous inputs."""
    x, w, b, a, bb, m = make_inputs(21, 40, 33, 5, dtype, device, regime="adapter-dominates", seed=fresh_seed())
    expected = run_op(x, w, b, a, bb, m, "torch")
    actual = run_op(x, w, b, a, bb, m, backend, layout=layout)
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} ({backend}, {layout.__name__})")

@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_face_with_dropout_matches_reference_under_same_mask(device, backend, dtype):
    """With dropout PEFT's formula keeps x·Wᵀ for the base and adds (g − 1)⊙(x_l·Wᵀ): same seed,
    same mask, same results on every face; and dropout does change them."""
    x, w, b, a, bb, m = make_inputs(33, 40, 19, 4, dtype, device, regime="adapter-dominates")
    expected = run_op(x, w, b, a, bb, m, "torch", dropout_p=0.3, seed=7)
    actual = run_op(x, w, b, a, bb, m, backend, dropout_p=0.3, seed=7)
    without = run_op(x, w, b, a, bb, m, "torch", dropout_p=0.0)
    assert not torch.allclose(expected[0].float(), without[0].float()), "dropout changed nothing"
    for name, got, exp in zip(NAMES, actual, expected):
        assert_close(got, exp, dtype, msg=f"{name} ({backend} vs reference, dropout)")


def test_reference_with_dropout_is_peft_formula_in_float64():
    x, w, b, a, bb, m = make_inputs(12, 20, 9, 3, torch.float64, "cpu", regime="adapter-dominates")
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    x_lora = x * keep / 0.6  # what F.dropout(x, 0.4) gives for that mask
    y, *_ = dora_linear_fwd_reference(*(t.float() for t in (x, w, b, a, bb, m)), torch.zeros(9), SCALING,
                                      x_lora.float())
    assert_close(y, truth(x, w, b, a, bb, m, SCALING, x_lora)[0], torch.float32)


@pytest.mark.skipif(not fastpeft.backends.availability("cpu", torch.device("cpu")).usable,
                    reason="the C++ CPU face is not usable here")
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_cpu_face_row_passes_match_reference_at_every_isa_level(isa, dtype, dropout_p, monkeypatch):
    """The C++ face's [M, N] passes (the delta and the scale, g⊙dy and the magnitude's sums) are
    compiled per instruction-set level and chosen by cpu_isa(): each level the CPU has, forced
    through FASTPEFT_CPU_ISA, against the reference; N = 70 and r = 5 leave remainders after every
    vector width and after the rank loop's steps of four."""
    levels = ["portable", "avx2", "avx512", "avx512_bf16"]
    supported = fastpeft.backends.extension().cpu_isa_supported()
    if levels.index(isa) > levels.index(supported):
        pytest.skip(f"this CPU's kernels reach {supported}, not {isa}")
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    x, w, b, a, bb, m = make_inputs(37, 45, 70, 5, dtype, "cpu", regime="adapter-dominates")
    expected = run_op(x, w, b, a, bb, m, "torch", dropout_p=dropout_p, seed=4)
    actual = run_op(x, w, b, a, bb, m, "cpu", dropout_p=dropout_p, seed=4)
    for name, got, exp in zip(NAMES, actual, expected):
        assert_close(got, exp, dtype, msg=f"{name} (cpu face at {isa} vs reference)")


@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
def test_face_selected_is_the_face_that_runs(device, backend):
    """Forward and backward both run the face forced, and the automatic choice is the one select() names."""
    x, w, b, a, bb, m = make_inputs(4, 8, 8, 2, torch.float32, device)
    wsq = row_norms_sq(w)
    with on_face(backend) as taken:
        dora_linear(x, w, b, a, bb, m.clone().requires_grad_(), 1.0, wsq).sum().backward()
    assert taken == [("dora_linear_fwd", backend), ("dora_linear_bwd", backend)]
    with record_faces() as taken:
        dora_linear_fwd(x, w, b, a, bb, m, wsq, 1.0)
    assert taken == [("dora_linear_fwd", dora_linear_fwd.select(x.device, x, w, b, a, bb, m, wsq, 1.0, None))]


@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
def test_face_accepts_transposed_weight_views(device, backend):
    """Conv1D-style weights arrive as Wᵀ views: no copy, same result."""
    x, w, b, a, bb, m = make_inputs(17, 36, 50, 8, torch.float32, device)
    w_view = w.t().contiguous().t()
    assert not w_view.is_contiguous()
    with on_face(backend):
        y = dora_linear_fwd(x, w_view, b, a, bb, m, row_norms_sq(w_view), 0.5)[0]
    assert_close(y, dora_linear_fwd_reference(x, w, b, a, bb, m, None, 0.5)[0])


@pytest.mark.parametrize("device,backend", face_params(dora_linear_fwd))
def test_a_stale_norm_cache_changes_the_fast_faces(device, backend):
    """The fast faces do use ‖Wᵢ‖² as given (so a layer must refresh it when W changes); the
    reference, the definition, does not read it."""
    x, w, b, a, bb, m = make_inputs(5, 24, 12, 3, torch.float32, device)
    stale = row_norms_sq(w) * 1.5
    with on_face(backend):
        y_stale = dora_linear_fwd(x, w, b, a, bb, m, stale, 1.0)[0]
    y_ref = dora_linear_fwd_reference(x, w, b, a, bb, m, stale, 1.0)[0]
    assert_close(y_ref, dora_linear_fwd_reference(x, w, b, a, bb, m, row_norms_sq(w), 1.0)[0])
    assert not torch.allclose(y_stale, y_ref, atol=1e-3)


@pytest.mark.parametrize("device", device_params())
def test_leading_dimensions_and_a_missing_norm_cache(device):
    x, w, b, a, bb, m = make_inputs(24, 16, 12, 4, torch.float32, device)
    y = dora_linear(x.view(2, 3, 4, 16), w, b, a, bb, m, 1.0)
    assert y.shape == (2, 3, 4, 12)
    assert_close(y.reshape(24, 12), dora_linear_fwd_reference(x, w, b, a, bb, m, None, 1.0)[0])


def test_row_norms_sq_in_blocks_of_rows(monkeypatch):
    """Blocks of rows (and strided views) sum to the whole weight's row norms."""
    import importlib

    op = importlib.import_module("fastpeft.ops.dora_linear")  # the module: fastpeft.ops.dora_linear is the function
    w = torch.randn(37, 50, dtype=torch.bfloat16)
    monkeypatch.setattr(op, "_NORM_CHUNK_ELEMENTS", 50 * 4)
    got = row_norms_sq(w.t().contiguous().t())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, w.double().square().sum(1).float(), rtol=1e-6, atol=0)


def test_frozen_weight_gets_no_gradient_but_a_trainable_one_does():
    x, w, b, a, bb, m = make_inputs(6, 10, 7, 2, torch.float32, "cpu", regime="adapter-dominates")
    wt = w.clone().requires_grad_()
    dora_linear(x, wt, b, a, bb, m, SCALING).sum().backward()
    norm = (w + SCALING * bb @ a).norm(dim=1)
    assert_close(wt.grad, (m / norm * torch.ones(6, 7)).T @ x)  # the norm detached, as PEFT
    w_frozen = w.clone()
    dora_linear(x, w_frozen, b, a, bb, m.clone().requires_grad_(), SCALING).sum().backward()
    assert w_frozen.grad is None


def test_qdora_matches_dora_on_the_dequantised_weight():
    """Over NF4 bytes, forward and backward equal the dense op on the dequantised weight (with and
    without dropout); the weight is decoded by the NF4 op's faces, never kept."""
    from fastpeft.quant.nf4 import dequantize_nf4, quantize_nf4

    x, w, b, a, bb, m = make_inputs(19, 128, 40, 4, torch.float32, "cpu", regime="adapter-dominates")
    q = quantize_nf4(w, 64, double_quant=True)
    dense = dequantize_nf4(q)
    wsq = row_norms_sq(dense)
    for p in (0.0, 0.3):
        results = []
        for fn in (lambda *t: qdora_linear(t[0], q, t[4], t[1], t[2], t[3], SCALING, wsq, p),
                   lambda *t: dora_linear(t[0], dense, t[4], t[1], t[2], t[3], SCALING, wsq, p)):
            leaves = [t.clone().requires_grad_() for t in (x, a, bb, m, b)]
            torch.manual_seed(5)
            with record_faces() as taken:
                y = fn(*leaves)
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
            results.append(([y] + [t.grad for t in leaves], {op for op, _ in taken}))
        (got, ops_q), (want, ops_d) = results
        assert ops_q == {"nf4_matmul"} and ops_d == {"dora_linear_fwd", "dora_linear_bwd"}
        for name, g, e in zip(NAMES, got, want):
            assert_close(g, e, msg=f"{name}, dropout {p}")


# ---------------------------------------------------------------- op registration

@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_opcheck(device, with_x_lora):
    x, w, b, a, bb, m = make_inputs(9, 24, 20, 4, torch.float32, device)
    x_lora = torch.nn.functional.dropout(x, 0.5) if with_x_lora else None
    wsq = row_norms_sq(w)
    torch.library.opcheck(torch.ops.fastpeft.dora_linear_fwd.default, (x, w, b, a, bb, m, wsq, 0.5, x_lora))
    _, s, z, norm = dora_linear_fwd_reference(x, w, b, a, bb, m, wsq, 0.5, x_lora)
    dy = torch.randn(9, 20, device=device)
    torch.library.opcheck(torch.ops.fastpeft.dora_linear_bwd.default, (dy, x, w, a, bb, m, s, z, norm, 0.5, x_lora))


def test_torch_compile_fullgraph_trains_as_eager():
    """dora_linear in one compiled graph (fullgraph=True, the norm cache passed in): the output and
    every gradient (x, bias, A, B, the magnitude) as in eager."""
    x, w, b, a, bb, m = make_inputs(11, 24, 20, 4, torch.float32, "cpu", regime="adapter-dominates")
    wsq = row_norms_sq(w)
    dy = torch.randn(11, 20)
    results = []
    for compile_ in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, b, a, bb, m)]

        def step(x_, b_, a_, bb_, m_):
            return dora_linear(x_, w, b_, a_, bb_, m_, SCALING, wsq)
        fn = torch.compile(step, fullgraph=True) if compile_ else step
        y = fn(*leaves)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for i, (got, want) in enumerate(zip(*results)):
        assert got is not None and want is not None, i
        assert_close(got, want, msg=f"output {i}")


# ---------------------------------------------------------------- bad input

def good():
    return dict(x=torch.randn(5, 12), weight=torch.randn(10, 12), bias=torch.randn(10), lora_a=torch.randn(3, 12),
                lora_b=torch.randn(10, 3), magnitude=torch.rand(10) + 0.5, weight_norm_sq=torch.rand(10) + 1)


BAD = {
    "magnitude wrong length": (dict(magnitude=torch.rand(11)), ValueError,
                               r"magnitude must be \[out_features\] = \[10\]; got \[11\]"),
    "magnitude not 1-D": (dict(magnitude=torch.rand(10, 1)), ValueError, r"magnitude must be \[out_features\]"),
    "magnitude dtype": (dict(magnitude=torch.rand(10, dtype=torch.float16)), TypeError,
                        r"magnitude has dtype torch.float16 but x has torch.float32"),
    "norm cache not float32": (dict(weight_norm_sq=torch.rand(10, dtype=torch.float16)), ValueError,
                               r"weight_norm_sq must be float32 \[out_features\] = \[10\]"),
    "norm cache wrong length": (dict(weight_norm_sq=torch.rand(9)), ValueError, r"weight_norm_sq must be float32"),
    "norm cache elsewhere": (dict(weight_norm_sq=torch.rand(10, device="meta")), ValueError,
                             r"weight_norm_sq is on meta but x is on cpu"),
    "lora_a wrong in_features": (dict(lora_a=torch.randn(3, 11)), ValueError, r"lora_a must be \[r, in_features\]"),
    "non-contiguous input": (dict(x=torch.randn(5, 24)[:, ::2]), ValueError, r"x must be contiguous"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_face(case, monkeypatch):
    change, exc, pattern = BAD[case]
    args = {**good(), **change}
    call = lambda: dora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],  # noqa: E731
                               args["magnitude"], 1.0, args["weight_norm_sq"])
    assert_refused_before_any_face(monkeypatch, dora_linear_fwd, call, exc, pattern)


def test_bad_dropout_and_direct_op_calls_are_refused():
    a = good()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.0"):
        dora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["magnitude"], 1.0, dropout_p=1.0)
    with pytest.raises((ValueError, RuntimeError), match="magnitude"):
        torch.ops.fastpeft.dora_linear_fwd(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], torch.rand(7),
                                           a["weight_norm_sq"], 1.0)
