"""lora_linear: the reference against float64, and every face against the reference."""

import pytest
import torch

from fastpeft import backends
from fastpeft.ops import dense_linear, lora_linear, record_faces
from fastpeft.ops.lora_linear import (lora_linear_bwd_reference, lora_linear_fwd,
                                      lora_linear_fwd_reference)

from conftest import (ROWS_PAST_INT32, DTYPES, assert_close, device_params, face_params, fresh_seed, gpu_face_params,
                      needs_extension, offset_view, on_face, wide_rows)

# (M, K, N, r): one token; sizes that are not multiples of any block (32, 64, 128); r = 1 and r = 128
# (128 > the 64-wide rank chunk: the rank loop runs twice); K smaller than r.
SHAPES = [(1, 16, 16, 1), (37, 45, 70, 5), (64, 64, 96, 16), (130, 96, 40, 128), (5, 300, 17, 3), (3, 24, 33, 64)]


def make_inputs(M, K, N, r, dtype, device, bias=True, seed=None):
    """Fresh random inputs scaled so every output is O(1) (never zeros: B is random too)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    x = rnd(M, K)
    w = rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    a = rnd(r, K, scale=K ** -0.5)
    bb = rnd(N, r, scale=r ** -0.5)
    return x, w, b, a, bb


def run_op(x, w, b, a, bb, scaling, backend, dropout_p=0.0, seed=0, layout=None):
    """Forward and backward through the public op on one backend; returns y and all grads.
    layout: a function placing x, W, A and B's values in memory (offset_view, wide_rows; default:
    x, A and B cloned, W as given)."""
    place = layout or torch.clone
    w = w if layout is None else layout(w)
    leaves = [place(t.detach()).requires_grad_() for t in (x, a, bb)]
    bias = None if b is None else b.detach().clone().requires_grad_()
    xx, aa, bbb = leaves
    torch.manual_seed(seed)
    with on_face(backend):
        y = lora_linear(xx, w, bias, aa, bbb, scaling, dropout_p=dropout_p)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        y.backward(grad_y)
    grads = [xx.grad, aa.grad, bbb.grad] + ([] if bias is None else [bias.grad])
    return [y] + grads


# ---------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,N,r", SHAPES[:3])
def test_reference_matches_float64_formula(M, K, N, r, dtype):
    x, w, b, a, bb = make_inputs(M, K, N, r, torch.float64, "cpu")
    scaling = 1.7
    y, s = lora_linear_fwd_reference(*(t.to(dtype) for t in (x, w, b, a, bb)), scaling)
    # Written out independently, in float64: base + scaling·B·A applied to x.
    truth = x @ (w + scaling * bb @ a).T + b
    assert_close(y, truth, torch.float32)
    assert_close(s, x @ a.T, torch.float32)

    dy = torch.randn(M, N, dtype=torch.float64)
    gx, gxl, ga, gb = lora_linear_bwd_reference(*(t.to(dtype) for t in (dy, x, w, a, bb, s.double())), scaling)
    assert gxl.numel() == 0
    assert_close(gx, dy @ (w + scaling * bb @ a), torch.float32)
    assert_close(ga, scaling * (dy @ bb).T @ x, torch.float32)
    assert_close(gb, scaling * dy.T @ (x @ a.T), torch.float32)


def test_autograd_of_reference_matches_torch_autograd():
    """The hand-written backward equals what autograd derives from the plain expression."""
    x, w, b, a, bb = make_inputs(9, 20, 11, 4, torch.float32, "cpu")
    got = run_op(x, w, b, a, bb, 0.5, "torch")
    leaves = [t.clone().requires_grad_() for t in (x, a, bb, b)]
    xx, aa, bbb, bias = leaves
    y = xx @ w.T + bias + 0.5 * (xx @ aa.T) @ bbb.T
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    for g, e in zip(got, [y, xx.grad, aa.grad, bbb.grad, bias.grad]):
        assert_close(g, e)


# ---------------------------------------------------------------- every face against the reference

@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_face_matches_reference(device, backend, dtype, M, K, N, r, bias):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, device, bias=bias)
    scaling = 2.0
    expected = run_op(x, w, b, a, bb, scaling, "torch")
    actual = run_op(x, w, b, a, bb, scaling, backend)
    for name, got, exp in zip(["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_bias"], actual, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} ({backend} vs reference)")


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
def test_face_selected_is_the_face_that_runs(device, backend):
    """Forward and backward both run the face forced, and the automatic choice is the one select() names."""
    x, w, b, a, bb = make_inputs(4, 8, 8, 2, torch.float32, device)
    with on_face(backend) as taken:
        lora_linear(x, w, b, a.clone().requires_grad_(), bb, 1.0).sum().backward()
    assert taken == [("lora_linear_fwd", backend), ("lora_linear_bwd", backend)]
    with record_faces() as taken:
        lora_linear_fwd(x, w, b, a, bb, 1.0)
    assert taken == [("lora_linear_fwd", lora_linear_fwd.select(x.device, x, w, b, a, bb, 1.0, None))]


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_face_with_dropout_matches_reference_under_same_mask(device, backend, dtype):
    """With dropout the LoRA branch sees a masked x: same seed, same mask, same results on every face."""
    x, w, b, a, bb = make_inputs(33, 40, 19, 4, dtype, device)
    expected = run_op(x, w, b, a, bb, 1.5, "torch", dropout_p=0.3, seed=7)
    actual = run_op(x, w, b, a, bb, 1.5, backend, dropout_p=0.3, seed=7)
    without = run_op(x, w, b, a, bb, 1.5, "torch", dropout_p=0.0)
    assert not torch.allclose(expected[0].float(), without[0].float()), "dropout changed nothing"
    for got, exp in zip(actual, expected):
        assert_close(got, exp, dtype)


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
def test_face_accepts_transposed_weight_views(device, backend):
    """Conv1D-style weights arrive as Wᵀ views: no copy, same result."""
    x, w, b, a, bb = make_inputs(17, 36, 50, 8, torch.float32, device)
    w_view = w.t().contiguous().t()
    assert not w_view.is_contiguous()
    with on_face(backend):
        y_view, _ = lora_linear_fwd(x, w_view, b, a, bb, 0.5)
    assert_close(y_view, lora_linear_fwd_reference(x, w, b, a, bb, 0.5)[0])


@pytest.mark.parametrize("device", device_params())
def test_leading_dimensions_are_flattened_and_restored(device):
    x, w, b, a, bb = make_inputs(24, 16, 12, 4, torch.float32, device)
    y = lora_linear(x.view(2, 3, 4, 16), w, b, a, bb, 1.0)
    assert y.shape == (2, 3, 4, 12)
    assert_close(y.reshape(24, 12), lora_linear_fwd_reference(x, w, b, a, bb, 1.0)[0])


def test_frozen_weight_gets_no_gradient_but_a_trainable_one_does():
    x, w, b, a, bb = make_inputs(6, 10, 7, 2, torch.float32, "cpu")
    wt = w.clone().requires_grad_()
    y = lora_linear(x, wt, b, a, bb, 1.0)
    y.sum().backward()
    assert_close(wt.grad, torch.ones(6, 7).T @ x)
    w_frozen = w.clone()
    lora_linear(x, w_frozen, b, a.requires_grad_(), bb, 1.0).sum().backward()
    assert w_frozen.grad is None and a.grad is not None


# ---------------------------------------------------------------- op registration

@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_opcheck(device, with_x_lora):
    x, w, b, a, bb = make_inputs(9, 24, 20, 4, torch.float32, device)
    x_lora = torch.nn.functional.dropout(x, 0.5) if with_x_lora else None
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, x_lora))
    _, s = lora_linear_fwd_reference(x, w, b, a, bb, 0.5, x_lora)
    dy = torch.randn(9, 20, device=device)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_bwd.default, (dy, x, w, a, bb, s, 0.5, x_lora))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_triton_face(dtype):
    x, w, b, a, bb = make_inputs(70, 64, 96, 16, dtype, "cuda")
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_fwd_triton.default, (x, w, b, a, bb, 0.5, None))
    _, s = lora_linear_fwd_reference(x, w, b, a, bb, 0.5)
    dy = torch.randn(70, 96, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_bwd_triton.default, (dy, x, w, a, bb, s, 0.5, None))


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
def test_face_accepts_a_strided_bias(device, backend):
    """A bias that is a strided view (a column of a matrix) is read through its stride."""
    x, w, _, a, bb = make_inputs(19, 24, 30, 4, torch.float32, device)
    bias = torch.randn(30, 3, device=device)[:, 1]
    assert bias.stride(0) == 3
    with on_face(backend):
        y, _ = lora_linear_fwd(x, w, bias, a, bb, 0.5)
    assert_close(y, lora_linear_fwd_reference(x, w, bias.contiguous(), a, bb, 0.5)[0])


def test_triton_face_under_the_new_fp32_precision_api():
    """torch's newer fp32_precision switch makes reading the legacy allow_tf32 flag raise."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, fastpeft
        from fastpeft.kernels._common import input_precision
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert input_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert input_precision(torch.float32) == "tf32"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def cuda_face():
    """The C++ CUDA face where a GPU and the built extension are here (none otherwise: no test then)."""
    return [p for p in face_params(lora_linear_fwd) if p.values[1] == "cuda"]


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 8, 9, 12, 16])
def test_cuda_decode_gemv_takes_every_row_in_one_pass(device, backend, dtype, M):
    """csrc/cuda/lora_linear.cu's GEMV (all M <= 16 rows in one pass over W, two features per warp,
    ragged N and K), against the reference: K = 4100 leaves a tail beyond the 4-load unrolled groups
    and the 16-byte vectors, N = 33 an odd feature for the last warp."""
    K, N, r = 4100, 33, 16
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, device)
    expected, s = lora_linear_fwd_reference(x, w, b, a, bb, 0.5)
    with on_face(backend):
        got, got_s = lora_linear_fwd(x, w, b, a, bb, 0.5)
    assert_close(got, expected, dtype)
    assert_close(got_s, s, dtype)


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_decode_gemv_reads_offset_and_strided_rows(device, backend, dtype):
    """x and W starting one element into their storage (pointers off 16 bytes: the scalar-load
    instantiation), and rows of x and W strided beyond K (a padded view)."""
    M, K, N, r = 11, 512, 70, 8
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, device)
    shifted = [torch.empty(t.numel() + 1, dtype=dtype, device=device)[1:].view(t.shape).copy_(t) for t in (x, w)]
    padded = [torch.empty(t.shape[0], K + 8, dtype=dtype, device=device)[:, :K].copy_(t) for t in (x, w)]
    expected, _ = lora_linear_fwd_reference(x, w, b, a, bb, 0.5)
    for xi, wi in (shifted, padded):
        with on_face(backend):
            got, _ = lora_linear_fwd(xi, wi, b, a, bb, 0.5)
        assert_close(got, expected, dtype)


NAMES = ["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_bias"]


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_face_takes_no_tokens(device, backend, dtype):
    """M = 0: y of no rows, an empty grad_x, and A, B and bias gradients of zeros, forward and backward."""
    x, w, b, a, bb = make_inputs(0, 24, 33, 4, dtype, device, seed=fresh_seed())
    expected = run_op(x, w, b, a, bb, 2.0, "torch")
    actual = run_op(x, w, b, a, bb, 2.0, backend)
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got, torch.zeros_like(got)), name


@pytest.mark.parametrize("device,backend", face_params(lora_linear_fwd))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [3, 21])
@pytest.mark.parametrize("layout", [offset_view, wide_rows])
def test_face_reads_offset_and_strided_rows(device, backend, dtype, M, layout):
    """x, W, A and B one element into their storage (pointers off 16-byte alignment), or rows of
    each strided beyond its length (slices of wider tensors): forward (the Triton face's shrink
    and fused kernels, the CUDA GEMV at M <= 16) and backward, against the reference on
    contiguous inputs."""
    x, w, b, a, bb = make_inputs(M, 40, 33, 5, dtype, device, seed=fresh_seed())
    expected = run_op(x, w, b, a, bb, 2.0, "torch")
    actual = run_op(x, w, b, a, bb, 2.0, backend, layout=layout)
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} ({backend}, {layout.__name__})")


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", [(1, 300, 130, 1), (3, 129, 300, 8), (4, 576, 67, 16), (5, 300, 70, 4)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cpu_face_above_one_pass_takes_its_base_from_dense_linear(cpu_isa, dtype, M, K, N, r, bias):
    """A layer too large for the CPU face's one-pass loop (M·K·(N + r) > 2^15) computes its base
    through dense_linear's CPU face, whose path (the GEMV for a few rows with AVX2, torch's matmul
    otherwise) it then reports. Forward and backward against the reference. dense_linear is called
    first on the other path, so the path read afterwards is this call's (on the portable level both
    paths are torch's: only the values are checked there)."""
    ext = backends.extension()
    assert M * K * (N + r) > 2 ** 15
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, "cpu", bias=bias)
    expected = run_op(x, w, b, a, bb, 2.0, "torch")
    path = ext.dense_cpu_path(M, str(dtype).removeprefix("torch."))
    with on_face("cpu"):  # one row takes the GEMV with AVX2, 64 rows torch's matmul
        dense_linear(torch.randn(64 if path == "gemv-avx2" else 1, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype))
    assert cpu_isa == "portable" or ext.dense_cpu_last_path() != path
    actual = run_op(x, w, b, a, bb, 2.0, "cpu")
    assert ext.dense_cpu_last_path() == path
    for name, got, exp in zip(NAMES, actual, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert_close(got, exp, dtype, msg=f"{name} (cpu vs reference)")


@pytest.mark.parametrize("device,backend", gpu_face_params(lora_linear_fwd))
def test_face_indexes_x_beyond_int32(release_gpu_memory, device, backend):
    """x [M, 4096] bf16 with M·K > 2³¹ (M = ROWS_PAST_INT32, 4.3 GB): the last rows' element
    offsets pass int32's range. The first and last 16 rows of y against the reference on those
    rows alone. About 4.5 GB of GPU memory; x read once (~1 ms at 4.3 TB/s) after its kernels' JIT:
    a few seconds on an H200 (estimate)."""
    K, N, r, dtype = 4096, 64, 8, torch.bfloat16
    M = ROWS_PAST_INT32
    _, w, b, a, bb = make_inputs(1, K, N, r, dtype, device, seed=fresh_seed())
    x = torch.randn(M, K, dtype=dtype, device=device)
    assert (M - 1) * x.stride(0) >= 2**31
    with on_face(backend):
        y, s = lora_linear_fwd(x, w, b, a, bb, 0.5)
    assert y.shape == (M, N) and s.shape == (M, r)
    for rows in (slice(0, 16), slice(M - 16, M)):
        expected, expected_s = lora_linear_fwd_reference(x[rows], w, b, a, bb, 0.5)
        assert_close(y[rows], expected, dtype, msg=f"rows {rows}")
        assert_close(s[rows], expected_s, dtype, msg=f"s, rows {rows}")
