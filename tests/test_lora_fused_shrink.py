"""LoRA's fused-shrink forward (x·Aᵀ accumulated in the base GEMM's K loop, one launch) through the
interpreter against the reference, the rule that picks it or the separate shrink or cuBLAS, and the
static model's count of its recompute."""

import math

import pytest
import torch

from fastpeft.kernels import _common, aot
from fastpeft.kernels import lora_linear as kl
from fastpeft.ops import record_faces
from fastpeft.ops.lora_linear import fwd_face_order_cuda, lora_linear_fwd, lora_linear_fwd_reference

from conftest import DTYPES, assert_close
from test_grid_waves import spy_launches
from test_lora_linear_op import make_inputs

triton = pytest.importorskip("triton")

# (M, K, N, r) off the interpreter's 32-wide blocks: one token and rank 1; rank 17 (BLOCK_R 32,
# 15 masked columns); rank 64 (the largest held whole), K of one partial block.
SHAPES = [(1, 40, 33, 1), (37, 70, 45, 17), (45, 20, 70, 64)]


@pytest.fixture
def sms():
    def set_count(count):
        _common.set_sm_count_override(count)
    yield set_count
    _common.set_sm_count_override(None)


def check_one_launch(seen, programs=None):
    """The forward was the fused-shrink kernel alone: no shrink launch, nothing else."""
    assert [name for name, _ in seen] == ["_fused_shrink_matmul_kernel"], seen
    if programs is not None:
        assert math.prod(seen[0][1]) == programs, seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_shrink_matches_the_reference(monkeypatch, dtype, M, K, N, r, bias):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, "cpu", bias=bias)
    seen = spy_launches(monkeypatch, kl)
    y, s = kl.fused_shrink_matmul(x, w, b, a, bb, 2.0)
    check_one_launch(seen)
    y_ref, s_ref = lora_linear_fwd_reference(x, w, b, a, bb, 2.0)
    assert y.dtype == s.dtype == dtype and y.shape == (M, N) and s.shape == (M, r)
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(s, s_ref, dtype, msg="s")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_tiles_per_program_share_one_shrink(monkeypatch, sms, dtype):
    """With one SM to fill, a program takes N_GROUP = 4 column tiles: N = 70 is 3 tiles of 32 (one
    group, its last tile ragged), N = 200 is 7 (two groups, the second of 3). Every tile gets the
    delta from the first tile's x·Aᵀ, and s is written once per row block."""
    sms(1)
    for M, K, N, r in ((37, 70, 70, 5), (65, 33, 200, 16)):
        x, w, b, a, bb = make_inputs(M, K, N, r, dtype, "cpu")
        assert kl.fused_shrink_plan(M, N, r, dtype, x.device)[1] == 4
        seen = spy_launches(monkeypatch, kl)
        y, s = kl.fused_shrink_matmul(x, w, b, a, bb, 0.5)
        check_one_launch(seen, programs=math.ceil(M / 32) * math.ceil(N / (32 * 4)))
        y_ref, s_ref = lora_linear_fwd_reference(x, w, b, a, bb, 0.5)
        assert_close(y, y_ref, dtype, msg=f"y, N = {N}")
        assert_close(s, s_ref, dtype, msg=f"s, N = {N}")


def test_strided_x_and_transposed_weight(monkeypatch):
    """x a view whose rows are strided past K (a padded buffer), W a transposed view: read as they lie."""
    M, K, N, r = 19, 50, 41, 6
    x, w, b, a, bb = make_inputs(M, K, N, r, torch.float32, "cpu")
    x_view = torch.empty(M, K + 7)[:, :K].copy_(x)
    w_view = w.t().contiguous().t()
    assert x_view.stride(0) == K + 7 and not w_view.is_contiguous()
    seen = spy_launches(monkeypatch, kl)
    y, s = kl.fused_shrink_matmul(x_view, w_view, b, a, bb, 1.5)
    check_one_launch(seen)
    y_ref, s_ref = lora_linear_fwd_reference(x, w, b, a, bb, 1.5)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


def test_a_dropped_or_misscaled_lora_term_is_caught():
    """The comparison has teeth: the delta is far above the tolerance, so the kernel's output matches
    the reference at its own scaling and at no other (0: the term dropped; 1 and 4: scaled wrong)."""
    x, w, b, a, bb = make_inputs(33, 64, 40, 8, torch.bfloat16, "cpu")
    y, _ = kl.fused_shrink_matmul(x, w, b, a, bb, 2.0)
    assert_close(y, lora_linear_fwd_reference(x, w, b, a, bb, 2.0)[0], torch.bfloat16)
    for wrong in (0.0, 1.0, 4.0):
        with pytest.raises(AssertionError):
            assert_close(y, lora_linear_fwd_reference(x, w, b, a, bb, wrong)[0], torch.bfloat16)


def test_ranks_above_the_register_block_are_refused_before_any_launch(monkeypatch):
    x, w, b, a, bb = make_inputs(5, 16, 8, 65, torch.float32, "cpu")
    seen = spy_launches(monkeypatch, kl)
    with pytest.raises(ValueError, match="rank 65 is above 64"):
        kl.fused_shrink_matmul(x, w, b, a, bb, 1.0)
    assert seen == []


def test_the_ops_triton_face_runs_the_mode_the_rule_picks(monkeypatch):
    """Through the op: with the rule saying "fused_shrink" the forward is one launch of the fused-
    shrink kernel, and with "shrink_then_fused" the shrink and the fused GEMM; both equal the
    reference, s included."""
    x, w, b, a, bb = make_inputs(40, 36, 50, 7, torch.float16, "cpu")
    y_ref, s_ref = lora_linear_fwd_reference(x, w, b, a, bb, 2.0)
    for mode, kernels in (("fused_shrink", ["_fused_shrink_matmul_kernel"]),
                          ("shrink_then_fused", ["_shrink_kernel", "_fused_matmul_kernel"])):
        monkeypatch.setattr(kl, "fwd_mode", lambda *args, mode=mode: mode)
        seen = spy_launches(monkeypatch, kl)
        with record_faces() as taken:
            import fastpeft
            with fastpeft.use_backend("triton"):
                y, s = lora_linear_fwd(x, w, b, a, bb, 2.0)
        assert taken == [("lora_linear_fwd", "triton")]
        assert [name for name, _ in seen] == kernels, (mode, seen)
        assert_close(y, y_ref, torch.float16, msg=mode)
        assert_close(s, s_ref, torch.float16, msg=mode)


# ---------------------------------------------------------------- the rule

def at_arch(monkeypatch, arch):
    """Plan as on sm_`arch` (the tile rule off the interpreter's tile)."""
    monkeypatch.setattr(kl, "triton_interpreting", lambda: False)
    return aot.target_arch(arch)


def test_mode_rule(monkeypatch):
    bf16 = torch.bfloat16
    with at_arch(monkeypatch, 90):
        # sm_90, large tile, 2 column tiles per program: recompute 16/512 of the GEMM against a read of
        # x; at Triton's measured 0.37 of the MMA peak the recompute costs more (486.7 against 480.4 us;
        # the one launch measured 465 us on an H200)
        assert kl.fused_shrink_plan(4096, 4096, 16, bf16) == ("large", 2, None)
        assert kl.fwd_mode(4096, 4096, 4096, 16, bf16) == "shrink_then_fused"
        # wide N: the shrink's read of x is the smaller share
        assert kl.fwd_mode(4096, 14336, 4096, 16, bf16) == "shrink_then_fused"
        # the separate shrink where the one launch cannot win or run
        assert kl.fwd_mode(4096, 4096, 4096, 64, bf16) == "shrink_then_fused"
        assert kl.fwd_mode(4096, 4096, 4096, 65, bf16) == "shrink_then_fused"
        assert kl.fwd_mode(64, 4096, 4096, 16, bf16) == "shrink_then_fused"
        assert kl.fwd_mode(4096, 4096, 4096, 16, torch.float32) == "shrink_then_fused"
        assert kl.fwd_mode(4096, 4096, 4096, 16, bf16, dropout=True) == "shrink_then_fused"
        est = kl.fwd_estimates(4096, 4096, 4096, 16, bf16)
        # cuBLAS at 0.84 of the peak against Triton's 0.37 (measured, H200): cuBLAS first on sm_90
        assert est["base"] < est["cublas"] < est["shrink_then_fused"] < est["fused_shrink"]
        assert kl.fastest_fwd_face(4096, 4096, 4096, 16, bf16, torch.device("cuda")) == "cuda"
    with at_arch(monkeypatch, 80):
        # sm_80: one 128-wide tile per program (recompute 16/128): the shrink wins at N = 4096, the one
        # launch at N = 1024; Triton level with cuBLAS, which pays two memory passes
        assert kl.fused_shrink_plan(4096, 4096, 16, bf16) == ("large_99k", 1, None)
        assert kl.fwd_mode(4096, 4096, 4096, 16, bf16) == "shrink_then_fused"
        assert kl.fwd_mode(4096, 1024, 4096, 16, bf16) == "fused_shrink"
        assert kl.fastest_fwd_face(4096, 4096, 4096, 16, bf16, torch.device("cuda")) == "triton"


def test_recompute_is_counted_in_the_estimate(monkeypatch):
    """The rule's fused-shrink time is the base Triton GEMM's plus BLOCK_R/(N_GROUP·BLOCK_N) of its
    MMA work: dropping the recompute from the count would make it win everywhere."""
    bf16 = torch.bfloat16
    with at_arch(monkeypatch, 90):
        est = kl.fwd_estimates(4096, 4096, 4096, 16, bf16)
        peak = kl.MMA_EFFICIENCY["triton"][90] * 790e12
        gemm = 2.0 * 4096 * 4096 * (4096 + 16) / peak
        assert est["fused_shrink"] == pytest.approx(gemm + 2.0 * 4096 * 4096 * 16 * 8 / peak)
        assert _common.GPU_ROOFLINE[90]["flops"] == 790e12


def test_the_ops_cuda_rule_orders_the_faces_by_the_estimates(monkeypatch):
    def order(M, N, dtype=torch.bfloat16):
        x, w = torch.empty(M, 4096, device="meta", dtype=dtype), torch.empty(N, 4096, device="meta", dtype=dtype)
        a, b = torch.empty(16, 4096, device="meta", dtype=dtype), torch.empty(N, 16, device="meta", dtype=dtype)
        return fwd_face_order_cuda(torch.device("cuda"), x, w, None, a, b, 2.0, None)
    with at_arch(monkeypatch, 90):
        assert order(1, 4096)[0] == order(16, 4096)[0] == "cuda"         # the GEMV, every row in one pass
        assert order(4096, 4096) == ("cuda", "triton", "torch")
        assert order(4096, 4096, torch.float32)[0] == "triton"
    with at_arch(monkeypatch, 80):
        assert order(4096, 4096) == ("triton", "cuda", "torch")


# ---------------------------------------------------------------- the static model's count

def test_static_model_counts_the_recompute(monkeypatch):
    from fastpeft.bench import static
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    a, b = torch.empty(16, 4096, dtype=torch.bfloat16, device="meta"), torch.empty(4096, 16, dtype=torch.bfloat16,
                                                                                     device="meta")
    with at_arch(monkeypatch, 90), aot.record_launches() as launches:
        kl.fused_shrink_matmul(x, x, None, a, b, 2.0)
    (launch,) = launches
    trips, flops = static.trips_and_flops(launch)
    base = 2.0 * 4096 * 4096 * (4096 + 16)
    assert trips == 2 * 4096 // 64                       # two column tiles per program
    assert flops == base + 2.0 * 256 * 128 * 4096 * 16   # 256 programs, each x·Aᵀ of its 128 rows once
    assert static.useful_flops(launch) == base + 2.0 * 4096 * 4096 * 16
