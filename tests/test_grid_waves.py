"""Grids of at least one wave of SMs (issue 15, item 8), or a reason the launcher gives.

* the LoRA shrink splits K across programs (fp32 partial sums, one [parts, M, R] buffer, summed in a
  fixed order) until the grid reaches the SM count, and matches the reference through the
  interpreter at every split;
* the matmul tile rule (LoRA's fused kernel, DoRA's) takes a smaller tile when the large or small_m
  one leaves SMs idle, and the smaller tiles match the reference through the interpreter;
* the adapter block halves its rows per program until the grid fills the SMs;
* the SGMV shrink splits K (16-row blocks first when a part per trip would not reach a wave), the
  SGMV expand and the BGMV expand narrow their column blocks, PHM's factor gradients split the
  tokens; the split parts are added by one kernel in a fixed order (``_common.sum_parts``); each
  matches the reference through the interpreter, split and unsplit, and repeats bit for bit;
* every Triton and CUDA launch of these ops at the GPU bench shapes, planned for sm_90 (132 SMs)
  and sm_80 (108), has a program per SM or a noted reason, and the static model's check fails one
  without.
"""

import dataclasses
import math

import pytest
import torch

from fastpeft.kernels import _common, aot
from fastpeft.kernels import adapter_block as kab
from fastpeft.kernels import bgmv as kbgmv
from fastpeft.kernels import dora_linear as kdora
from fastpeft.kernels import lora_linear as kl
from fastpeft.kernels import phm_linear as kphm
from fastpeft.kernels import sgmv as ksgmv

from conftest import DTYPES, assert_close

triton = pytest.importorskip("triton")


@pytest.fixture
def sms():
    """Set the SM count launches plan for (restored after)."""
    def set_count(count):
        _common.set_sm_count_override(count)
    yield set_count
    _common.set_sm_count_override(None)


def spy_launches(monkeypatch, *modules):
    """Record (kernel name, grid) of every launch the `modules` make, in order, and still run it."""
    seen = []
    for module in modules:
        original = module.wrap_triton

        def recording(kernel, original=original):
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


# ---------------------------------------------------------------- the split sum

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts,shape", [(1, (5,)), (3, (7, 9)), (64, (130,)), (65, (2, 3, 50)), (130, (1,))])
def test_sum_parts_adds_every_part_in_a_fixed_order(parts, shape, dtype):
    """One trip of 64 parts, a second trip for 65 and 130, sums off the 128-wide block: the fp32 sum
    of every part, rounded once, and the same bits on a second run."""
    planes = torch.randn(parts, *shape)
    planes[-1] += 4.0   # the last part (the second trip's last row from 65 parts on) is a large share
    got = _common.sum_parts(planes, dtype)
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous()
    assert_close(got, planes.double().sum(0).to(dtype), dtype)
    assert torch.equal(_common.sum_parts(planes, dtype), got)
    if parts > 1:   # the last part left out is seen
        with pytest.raises(AssertionError):
            assert_close(got, planes[:-1].double().sum(0).to(dtype), dtype)


# ---------------------------------------------------------------- SGMV: split K, narrow N

def sgmv_inputs(T, K, N, R, dtype, slots=5, seed=None):
    from fastpeft.ops import AdapterBatch
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())) if seed is None else seed)
    ids = torch.randint(-1, slots, (T,), generator=g)
    ids[-1] = slots - 1
    batch = AdapterBatch.build(ids, slots)
    x = torch.randn(T, K, generator=g).to(dtype)
    a = (torch.randn(slots, R, K, generator=g) / K ** 0.5).to(dtype)
    b = (torch.randn(slots, N, R, generator=g) / R ** 0.5).to(dtype)
    base = torch.randn(T, N, generator=g).to(dtype)
    scalings = torch.rand(slots, generator=g) + 0.5
    return x, a, b, base, scalings, batch


def sgmv_reference(x, a, b, base, scalings, batch):
    from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference
    s = bgmv_shrink_reference(x.float(), a.float(), batch.adapter_ids)
    return s, bgmv_expand_reference(base.float(), s.to(x.dtype).float(), b.float(), scalings, batch.adapter_ids)


# (T, K, N, R): one token, rank 1, sizes off the interpreter's 16/32 blocks, a rank above 64
SGMV_SHAPES = [(1, 45, 24, 1), (37, 300, 70, 8), (70, 33, 17, 16), (20, 129, 40, 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", SGMV_SHAPES)
def test_sgmv_split_and_narrowed_grids_match_the_reference(monkeypatch, sms, dtype, T, K, N, R):
    """132 SMs: K split into parts (their sum launched) and the expand's columns narrowed to 16
    where the grid is short; one SM: neither. Both match the reference and repeat bit for bit."""
    x, a, b, base, scalings, batch = sgmv_inputs(T, K, N, R, dtype)
    s_ref, out_ref = sgmv_reference(x, a, b, base, scalings, batch)
    U, r_blocks, trips = batch.num_segments, math.ceil(R / 64) if R > 64 else 1, math.ceil(K / 32)
    for count in (132, 1):
        sms(count)
        seen = spy_launches(monkeypatch, ksgmv, _common)
        s = ksgmv.sgmv_shrink(x, a, *batch.routing)
        out = ksgmv.sgmv_expand(base, s_ref.to(dtype), b, scalings, *batch.routing)
        assert_close(s, s_ref, dtype, msg=f"shrink, {count} SMs")
        assert_close(out, out_ref, dtype, msg=f"expand, {count} SMs")
        assert torch.equal(ksgmv.sgmv_shrink(x, a, *batch.routing), s)
        assert torch.equal(ksgmv.sgmv_expand(base, s_ref.to(dtype), b, scalings, *batch.routing), out)
        (shrink_name, shrink_grid), *rest = seen[:len(seen) // 2]
        assert shrink_name == "_sgmv_shrink_kernel"
        parts = shrink_grid[2] // r_blocks
        expand = [grid for name, grid in rest if name == "_sgmv_expand_kernel"]
        if count == 1:
            assert parts == 1 and [name for name, _ in rest] == ["_sgmv_expand_kernel"]
            assert expand[0][2] == math.ceil(N / 32)
        else:
            rows = U * shrink_grid[1] * r_blocks
            assert parts == _common.wave_split(rows, trips, 132) or parts == trips, (parts, rows, trips)
            assert parts > 1 and ("_sum_parts_kernel", (math.ceil(T * R / 128),)) in rest
            assert expand[0][2] == math.ceil(N / 16)   # U·⌈T/16⌉·⌈N/32⌉ < 132 for every shape here


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgmv_gpu_tiles_take_16_rows_when_32_fall_short(monkeypatch, sms, dtype):
    """The GPU table's 32-row tiles run through the interpreter: one segment of 40 tokens splits K
    on 16-row blocks (32 rows with a part per trip would not reach the SMs), and the expand
    narrows its 64 columns; a 4-segment batch keeps 32 rows."""
    monkeypatch.setitem(ksgmv._TILES, "interpret", ksgmv._TILES["gpu"])
    from fastpeft.ops import AdapterBatch
    for slots, count, want_bm in ((1, 12, 16), (4, 12, 32)):
        sms(count)
        x, a, b, base, scalings, _ = sgmv_inputs(40, 300, 200, 16, dtype, slots=slots)
        batch = AdapterBatch.build(torch.arange(40) % slots, slots)
        s_ref, out_ref = sgmv_reference(x, a, b, base, scalings, batch)
        bm, bk, _, parts, _, reason = ksgmv.shrink_plan(slots, 40, 300, 16, count)
        assert (bm, bk, reason) == (want_bm, 64, None) and parts > 1
        seen = spy_launches(monkeypatch, ksgmv, _common)
        assert_close(ksgmv.sgmv_shrink(x, a, *batch.routing), s_ref, dtype)
        assert_close(ksgmv.sgmv_expand(base, s_ref.to(dtype), b, scalings, *batch.routing), out_ref, dtype)
        assert seen[0] == ("_sgmv_shrink_kernel", (slots, math.ceil(40 / bm), parts))
        assert seen[1][0] == "_sum_parts_kernel"
        assert seen[2][0] == "_sgmv_expand_kernel" and seen[2][1][0] * seen[2][1][1] * seen[2][1][2] >= count


@pytest.mark.parametrize("arch", [90, 80])
def test_sgmv_plans_at_the_bench_shapes(monkeypatch, arch):
    monkeypatch.setattr(ksgmv, "triton_interpreting", lambda: False)
    count = _common.SM_COUNT[arch]
    # 64 tokens, K = N = 4096, rank 16, over U adapters: (BLOCK_M, parts) of the shrink
    want = {90: {1: (16, 64), 8: (32, 10), 64: (32, 2)}, 80: {1: (32, 64), 8: (32, 8), 64: (32, 1)}}[arch]
    for U, (bm, parts) in want.items():
        got = ksgmv.shrink_plan(U, 64, 4096, 16, count)
        assert (got[0], got[3], got[5]) == (bm, parts, None), (U, got)
        assert U * math.ceil(64 / bm) * parts >= count
        bm, bn, reason = ksgmv.expand_plan(U, 64, 4096, count)
        assert reason is None and U * math.ceil(64 / bm) * math.ceil(4096 / bn) >= count
    assert ksgmv.expand_plan(1, 64, 4096, 132)[:2] == (32, 32)
    # a problem smaller than any split: the reason names it
    _, _, _, _, _, reason = ksgmv.shrink_plan(1, 8, 64, 16, count)
    assert f"fewer than the {count} SMs" in reason


def test_sgmv_programs_past_their_segment_do_no_work(monkeypatch, sms):
    """The grid is sized by the token count (no host read of the lengths): with every token in the
    last of 6 segments, the other segments' programs store nothing, so a NaN planted in their
    factors never reaches s or out, and tokens of no segment keep s = 0, out = base."""
    sms(132)
    from fastpeft.ops import AdapterBatch
    x, a, b, base, scalings, _ = sgmv_inputs(20, 70, 40, 8, torch.float32, slots=6)
    ids = torch.full((20,), 5)
    ids[:3] = -1
    batch = AdapterBatch.build(ids, 6)
    a[:5], b[:5] = float("nan"), float("nan")
    s_ref, out_ref = sgmv_reference(x, a[5:].expand(6, -1, -1), b[5:].expand(6, -1, -1), base, scalings, batch)
    s = ksgmv.sgmv_shrink(x, a, *batch.routing)
    out = ksgmv.sgmv_expand(base, s, b, scalings, *batch.routing)
    assert not s.isnan().any() and not out.isnan().any()
    assert torch.equal(s[:3], torch.zeros(3, 8)) and torch.equal(out[:3], base[:3])
    assert_close(s, s_ref, torch.float32)
    assert_close(out, out_ref, torch.float32)


# ---------------------------------------------------------------- BGMV expand: narrow N for a few tokens

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,R", [(1, 70, 1), (3, 45, 16), (9, 300, 70)])
def test_bgmv_expand_narrows_its_blocks_for_a_few_tokens(monkeypatch, sms, dtype, T, N, R):
    from fastpeft.ops.bgmv import bgmv_expand_reference
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    base, s = torch.randn(T, N, generator=g).to(dtype), torch.randn(T, R, generator=g).to(dtype)
    b, scalings = (torch.randn(4, N, R, generator=g) / R ** 0.5).to(dtype), torch.rand(4, generator=g) + 0.5
    ids = torch.randint(-1, 4, (T,), generator=g, dtype=torch.int32)
    expected = bgmv_expand_reference(base.float(), s.float(), b.float(), scalings, ids)
    for count, block_n in ((132, 16), (1, 32)):
        sms(count)
        seen = spy_launches(monkeypatch, kbgmv)
        got = kbgmv.bgmv_expand(base, s, b, scalings, ids)
        assert_close(got, expected, dtype)
        assert seen == [("_bgmv_expand_kernel", (T, math.ceil(N / block_n)))]


def test_bgmv_expand_plan_at_decode(monkeypatch):
    monkeypatch.setattr(kbgmv, "triton_interpreting", lambda: False)
    assert kbgmv.expand_plan(8, 4096, 132) == (128, None)
    assert kbgmv.expand_plan(3, 4096, 132) == (64, None)
    assert kbgmv.expand_plan(2, 4096, 132) == (32, None)
    block_n, reason = kbgmv.expand_plan(1, 4096, 132)   # 16 would fill the wave, estimated slower
    assert block_n == 32 and "128 programs" in reason
    assert kbgmv.expand_plan(1, 4096, 108) == (32, None)


# ---------------------------------------------------------------- PHM factor gradients: split the tokens

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [None, 1], ids=["fullB", "rank1"])
@pytest.mark.parametrize("M", [1, 37])
def test_phm_factor_gradients_split_the_tokens(monkeypatch, sms, dtype, rank, M):
    """Forward and backward through the op on the Triton face: at 132 SMs every factor gradient
    splits its tokens (when there is more than one trip of 16) and adds the parts; at one SM none
    does; both match the reference and repeat bit for bit."""
    from test_phm_linear import make_factors, run
    n, q, p = 4, 5, 3
    f = make_factors(n, q, p, rank, dtype)
    x, bias = torch.randn(M, n * q).to(dtype), torch.randn(n * p).to(dtype)
    expected = run(x, f, bias, "torch")
    for count in (132, 1):
        sms(count)
        seen = spy_launches(monkeypatch, kphm, _common)
        got = run(x, f, bias, "triton")
        for name, want in expected.items():
            assert_close(got[name], want, dtype, msg=f"{name}, {count} SMs")
        again = run(x, f, bias, "triton")
        assert all(torch.equal(again[k], got[k]) for k in got)
        factor = [grid for name, grid in seen[:len(seen) // 2] if name == "_phm_grad_factor_kernel"]
        sums = [grid for name, grid in seen[:len(seen) // 2] if name == "_sum_parts_kernel"]
        assert len(factor) == (1 if rank is None else 2)
        parts = {grid[0] // n for grid in factor}
        want = {math.ceil(M / 16)} if count == 132 else {1}
        assert parts == want, (parts, want)
        assert len(sums) == (len(factor) if parts != {1} else 0)


def test_phm_factor_plan_at_the_bench_shapes(monkeypatch):
    monkeypatch.setattr(kphm, "triton_interpreting", lambda: False)
    # compacter, rank 1, 4096 tokens: (n, C, D) of dB_left and dB_right
    for n, count, want in ((4, 132, 4), (4, 108, 2), (8, 132, 2), (8, 108, 1)):
        q = 4096 // n
        (bm, bc, bd), parts, m_part, reason = kphm.factor_plan(4096, n, q, 1, count)
        assert reason is None and parts == want, (n, count, parts)
        assert n * math.ceil(q / bc) * parts >= count and m_part % bm == 0
    assert kphm.factor_plan(4096, 8, 512, 512, 132)[1] == 1   # full B: 1024 tiles, no split
    assert "fewer than the 132 SMs" in kphm.factor_plan(16, 2, 3, 3, 132)[3]


# ---------------------------------------------------------------- every bench launch, Triton and CUDA

@pytest.mark.parametrize("arch", [90, 80])
def test_multi_lora_and_phm_bench_launches_fill_the_sms_or_say_why(monkeypatch, arch):
    from fastpeft.bench import static
    for module in (ksgmv, kbgmv, kphm):
        monkeypatch.setattr(module, "triton_interpreting", lambda: False)
    count = _common.SM_COUNT[arch]
    names = set()
    for op, case in static.bench_cases():
        if op not in ("multi_lora", "phm_linear"):
            continue
        for launch in static.record_case(op, case, arch):
            names.add(launch.name)
            assert math.prod(launch.grid) >= count or launch.short_grid_reason, (op, case, launch.name, launch.grid)
            if launch.name in ("_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_phm_grad_factor_kernel"):
                assert launch.short_grid_reason is None, (case, launch.name, launch.short_grid_reason)
        for launch in static.CUDA_PLANS.get(op, lambda *_: [])(case, arch):
            names.add(launch.label.split("<")[0])
            assert launch.grid >= count or launch.short_grid_reason, (case, launch.label, launch.grid)
    assert {"_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel",
            "_sum_parts_kernel", "_phm_grad_factor_kernel", "bgmv_shrink_kernel", "bgmv_expand_kernel"} <= names


def test_static_check_fails_a_short_cuda_grid_without_a_reason():
    from fastpeft.bench import static
    from fastpeft.bench.case import Case
    from fastpeft.bench.multi_lora import dims
    case = Case("decode", "fwd", "bf16", dims(1, 4096, 4096, 16, 1))
    shrink, expand = static.CUDA_PLANS["multi_lora"](case, 90)
    assert shrink.grid == 16 and "(token, rank) pair" in shrink.short_grid_reason
    assert expand.grid == 128 and expand.threads == 32 and expand.short_grid_reason
    compiled = {("bgmv.cu", 90): {launch.function: (static.Sass(instructions=10, ldg_bytes=16, ldg_ops=1),
                                                     {"REG": 32}) for launch in (shrink, expand)}}
    for launch in (shrink, expand):
        assert not static.analyse_cuda("multi_lora", case, 90, launch, compiled).problems
        bare = dataclasses.replace(launch, short_grid_reason=None)
        (problem,) = static.analyse_cuda("multi_lora", case, 90, bare, compiled).problems
        assert "below one wave of 132 SMs" in problem
    # 8 tokens: the expand's blocks narrow to 128 threads (256 blocks); 64 tokens keep 256
    for T, threads in ((8, 128), (64, 256)):
        _, expand = static.CUDA_PLANS["multi_lora"](Case("decode", "fwd", "bf16", dims(T, 4096, 4096, 16, 8)), 90)
        assert expand.threads == threads and expand.grid >= 132 and expand.short_grid_reason is None


POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


def test_aot_lists_hold_every_bench_launch_of_the_split_kernels(monkeypatch):
    """Each launch of SGMV, BGMV, PHM and the split sum at the bench shapes, planned for sm_90 and
    sm_80, has its block constants and output type among its module's aot_configs (CI's list)."""
    from fastpeft.bench import static
    modules = {"fastpeft.kernels.sgmv": ksgmv, "fastpeft.kernels.bgmv": kbgmv, "fastpeft.kernels.phm_linear": kphm,
               "fastpeft.kernels._common": _common}
    for module in modules.values():
        monkeypatch.setattr(module, "triton_interpreting", lambda: False, raising=False)
    listed = {(kernel.fn.__name__, tuple(sorted((k, v) for k, v in constexprs.items() if k.isupper())),
               tuple(v for v in sig.values() if v.startswith("*")))
              for module in modules.values() for kernel, sig, constexprs, _ in module.aot_configs()}
    checked = 0
    for arch in (90, 80):
        for op, case in static.bench_cases():
            if op not in ("multi_lora", "phm_linear"):
                continue
            for launch in static.record_case(op, case, arch):
                if launch.kernel.fn.__module__ not in modules or launch.name == "_phm_mix_kernel":
                    continue
                consts = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k.isupper()))
                bound = dict(zip(launch.kernel.arg_names, launch.args))
                ptrs = tuple(POINTER[bound[name].dtype] for name in launch.kernel.arg_names
                             if isinstance(bound.get(name), torch.Tensor))
                assert (launch.name, consts, ptrs) in listed, (launch.name, consts, ptrs)
                checked += 1
    assert checked > 30
