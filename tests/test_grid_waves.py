"""Grids of at least one wave of SMs (issue 15, item 8), or a reason the launcher gives.

* the LoRA shrink splits K across programs (fp32 partial sums, one [parts, M, R] buffer, summed in a
  fixed order) until the grid reaches the SM count, and matches the reference through the
  interpreter at every split;
* the matmul tile rule (LoRA's fused kernel, DoRA's) takes a smaller tile when the large or small_m
  one leaves SMs idle, and the smaller tiles match the reference through the interpreter;
* the adapter block halves its rows per program until the grid fills the SMs;
* every Triton launch of these ops at the GPU bench shapes, planned for sm_90 (132 SMs) and sm_80
  (108), has a program per SM or a noted reason, and the static model's check fails one without.
"""

import math

import pytest
import torch

from fastpeft.kernels import _common, aot
from fastpeft.kernels import adapter_block as kab
from fastpeft.kernels import dora_linear as kdora
from fastpeft.kernels import lora_linear as kl

from conftest import DTYPES, assert_close

triton = pytest.importorskip("triton")


@pytest.fixture
def sms():
    """Set the SM count launches plan for (restored after)."""
    def set_count(count):
        _common.set_sm_count_override(count)
    yield set_count
    _common.set_sm_count_override(None)


def spy_launches(monkeypatch, module):
    """Record (kernel name, grid) of every launch `module` makes, and still run it."""
    seen = []
    original = module.wrap_triton

    def recording(kernel):
        launcher = original(kernel)

        class Grid:
            def __getitem__(self, grid):
                seen.append((kernel.fn.__name__, tuple(grid)))
                return launcher[grid]
        return Grid()
    monkeypatch.setattr(module, "wrap_triton", recording)
    return seen


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


# ---------------------------------------------------------------- LoRA shrink: split-K

# (M, K, R): one token, rank 1, sizes off the interpreter's 32-wide blocks, K of one block, M = 0.
SHRINK_SHAPES = [(1, 300, 1), (37, 200, 5), (70, 45, 16), (3, 20, 3), (0, 64, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,R", SHRINK_SHAPES)
def test_shrink_splits_k_to_fill_the_sms_and_matches_the_reference(monkeypatch, sms, dtype, M, K, R):
    x, a = rnd(M, K, dtype=dtype), rnd(R, K, dtype=dtype, scale=K ** -0.5)
    expected = (x.double() @ a.double().T).to(dtype)
    blocks = math.ceil(K / 32)
    tiles = math.ceil(M / 32)
    # 132 SMs: every K block its own part (these products are far below a wave); one SM: no split;
    # twice the tiles: the fewest parts of whole blocks that reach it
    for count, parts in ((132, {blocks}), (1, {1}), (2 * tiles, set(range(min(blocks, 2), blocks + 1)))):
        sms(count)
        seen = spy_launches(monkeypatch, kl)
        got = kl.shrink(x, a)
        assert got.dtype == dtype and got.shape == (M, R)
        assert_close(got, expected, dtype, msg=f"{count} SMs")
        if M == 0:
            assert seen == []  # an empty output launches nothing
            continue
        ((name, grid),) = seen
        assert name == "_shrink_kernel" and grid[2] in parts, (count, grid)


def test_shrink_sums_every_part():
    """Each of the parts adds its own share: dropping any one of them changes the result past the
    tolerance (so the comparison above would catch a lost partial sum)."""
    _common.set_sm_count_override(132)
    try:
        x, a = rnd(5, 256, dtype=torch.float32), rnd(3, 256, dtype=torch.float32, scale=256 ** -0.5)
        full = kl.shrink(x, a)
        for p in range(8):   # 8 parts of 32: drop each one's columns of K
            keep = torch.ones(256)
            keep[32 * p:32 * (p + 1)] = 0
            with pytest.raises(AssertionError):
                assert_close(kl.shrink(x * keep, a), full, torch.float32)
    finally:
        _common.set_sm_count_override(None)


def test_split_shrink_runs_in_the_ops_forward_and_backward(monkeypatch, sms):
    """Through the op on the Triton face: the forward's shrink and the backward's dy·B are both split,
    and every output and gradient matches the reference."""
    from test_lora_linear_op import make_inputs, run_op
    sms(132)
    seen = spy_launches(monkeypatch, kl)
    for dtype in DTYPES:
        x, w, b, a, bb = make_inputs(9, 150, 40, 3, dtype, "cpu")
        expected = run_op(x, w, b, a, bb, 2.0, "torch")
        actual = run_op(x, w, b, a, bb, 2.0, "triton")
        for got, exp in zip(actual, expected):
            assert_close(got, exp, dtype)
    # forward x·Aᵀ: K = 150 is 5 blocks of 32; backward dy·B: N = 40 is 2
    shrinks = [grid[2] for name, grid in seen if name == "_shrink_kernel"]
    assert shrinks == [5, 2] * len(DTYPES), shrinks


# ---------------------------------------------------------------- the matmul tile rule

def plan(monkeypatch, arch, M, N, dtype=torch.bfloat16, extra_rows=0):
    monkeypatch.setattr(kl, "triton_interpreting", lambda: False)
    with aot.target_arch(arch):
        return kl.matmul_plan(M, N, dtype, torch.device("cuda"), 16, extra_rows)


def programs(tile, M, N, extra_rows=0):
    bm, bn = kl.MATMUL_TILES[tile][:2]
    return (math.ceil(M / bm) + math.ceil(extra_rows / bm)) * math.ceil(N / bn)


@pytest.mark.parametrize("arch", [90, 80])
def test_matmul_tile_fills_the_sms_at_the_bench_shapes(monkeypatch, arch):
    count = _common.SM_COUNT[arch]
    for M, N, extra, want in ((1, 4096, 0, "small_m_narrow"), (16, 4096, 0, "small_m_narrow"),
                              (4096, 4096, 0, "large"), (256, 4096, 0, "medium"), (256, 4096, 16, "medium"),
                              (4096, 4096, 16, "large"), (1024, 1024, 0, "medium")):
        tile, reason = plan(monkeypatch, arch, M, N, extra_rows=extra)
        assert (tile, reason) == (want, None), (M, N, tile, reason)
        assert programs(tile, M, N, extra) >= count
    # fp32 prefers its tile and narrows when it is short
    # (1024 / 64)·(1024 / 128) = 128 tiles: enough for 108 SMs, not for 132
    assert plan(monkeypatch, arch, 1024, 1024, torch.float32) == ("fp32_narrow" if arch == 90 else "fp32", None)
    assert plan(monkeypatch, arch, 4096, 4096, torch.float32) == ("fp32", None)
    # a product smaller than a wave: the tile with the most programs, and the reason
    tile, reason = plan(monkeypatch, arch, 16, 256)
    assert tile == "small_m_narrow" and "16 tiles of 16x16" in reason and f"{count} SMs" in reason


@pytest.mark.parametrize("tile,dtype", [("fp32_narrow", torch.float32)] + [
    (tile, dtype) for tile in ("small_m_narrow", "medium") for dtype in (torch.float16, torch.bfloat16)], ids=str)
def test_smaller_matmul_tiles_match_the_reference(monkeypatch, tile, dtype):
    """The fused kernel at each tile the rule may now pick (the fp32 one for fp32, the others for the
    half types), through the interpreter, on ragged shapes (a single row, rank 1, sizes off every
    block), forward and backward."""
    from test_lora_linear_op import make_inputs, run_op
    monkeypatch.setitem(kl.MATMUL_TILES, "interpret", kl.MATMUL_TILES[tile])
    seen = spy_launches(monkeypatch, kl)
    for M, K, N, r in ((1, 300, 17, 1), (37, 70, 45, 5)):
        x, w, b, a, bb = make_inputs(M, K, N, r, dtype, "cpu")
        for got, exp in zip(run_op(x, w, b, a, bb, 2.0, "triton"), run_op(x, w, b, a, bb, 2.0, "torch")):
            assert_close(got, exp, dtype)
    assert any(name == "_fused_matmul_kernel" for name, _ in seen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_at_the_medium_tile_matches_the_reference(monkeypatch, dtype):
    """DoRA's matmul kernel shares the tile rule: at the medium tile its x and A row tiles still
    meet the reference (forward and backward)."""
    from test_dora_linear_op import make_inputs, run_op
    tile = "fp32_narrow" if dtype == torch.float32 else "medium"
    monkeypatch.setitem(kl.MATMUL_TILES, "interpret", kl.MATMUL_TILES[tile])
    seen = spy_launches(monkeypatch, kdora)
    x, w, b, a, bb, m = make_inputs(37, 70, 45, 5, dtype, "cpu", seed=int(torch.randint(1 << 30, ())))
    for got, exp in zip(run_op(x, w, b, a, bb, m, "triton"), run_op(x, w, b, a, bb, m, "torch")):
        assert_close(got, exp, dtype)
    assert any(name == "_dora_matmul_kernel" for name, _ in seen)


# ---------------------------------------------------------------- adapter block rows per program

@pytest.mark.parametrize("arch,want", [(90, 16), (80, 32)])
def test_adapter_block_rows_per_program_fill_the_sms(monkeypatch, arch, want):
    monkeypatch.setattr(kab, "triton_interpreting", lambda: False)
    with aot.target_arch(arch):
        for kernel in ("fwd", "bwd"):
            for R in (64, 256):
                params, reason = kab._launch_params(kernel, 4096, R, torch.bfloat16, torch.device("cuda"))
                assert params["BLOCK_M"] == want and reason is None
                assert math.ceil(4096 / want) >= _common.SM_COUNT[arch]
            params, reason = kab._launch_params(kernel, 64 * 132, 64, torch.bfloat16, torch.device("cuda"))
            assert params["BLOCK_M"] == 64 and reason is None  # a wave at the table's rows: kept
        params, reason = kab._launch_params("fwd", 1000, 64, torch.bfloat16, torch.device("cuda"))
        assert params["BLOCK_M"] == 16 and "63 row tiles of 16" in reason


# ---------------------------------------------------------------- the bench launches and the static check

@pytest.mark.parametrize("arch", [90, 80])
def test_every_bench_launch_fills_the_sms_or_says_why(monkeypatch, arch):
    """Every Triton launch of lora_linear, dora_linear and adapter_block at the GPU bench shapes,
    planned for the architecture (meta tensors, nothing runs): a program per SM, or a reason."""
    from fastpeft.bench import static
    for module in (kl, kdora, kab):
        monkeypatch.setattr(module, "triton_interpreting", lambda: False)
    count = _common.SM_COUNT[arch]
    seen = 0
    for op, case in static.bench_cases():
        if op not in ("lora_linear", "dora_linear", "adapter_block"):
            continue
        for launch in static.record_case(op, case, arch):
            grid = math.prod(launch.grid)
            assert grid >= count or launch.short_grid_reason, (op, case, launch.name, launch.grid)
            seen += 1
    assert seen > 20


def test_static_check_fails_a_short_grid_without_a_reason(monkeypatch):
    from fastpeft.bench import static
    for module in (kl,):
        monkeypatch.setattr(module, "triton_interpreting", lambda: False)
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    a = torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")
    for arch in (90, 80):
        with aot.target_arch(arch), aot.record_launches() as launches:
            kl.shrink(x[:1], a)       # decode: 32 programs, with the reason
            kl.shrink(x, a)           # prefill: split until a wave
        short, full = launches
        assert short.short_grid_reason and "32 programs" in short.short_grid_reason
        assert full.short_grid_reason is None and math.prod(full.grid) >= _common.SM_COUNT[arch]
        assert static.grid_problem(math.prod(short.grid), arch, short.short_grid_reason) is None
        assert "below one wave" in static.grid_problem(math.prod(short.grid), arch, None)
        assert static.grid_problem(math.prod(full.grid), arch, None) is None
    # a note left by a launch outside a recording is not the next recorded launch's
    _common.note_short_grid("stale")
    with aot.target_arch(90), aot.record_launches() as launches:
        kl.shrink(x, a)
    assert launches[0].short_grid_reason is None
