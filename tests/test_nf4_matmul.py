"""nf4_matmul: every face against the dequantise-then-matmul reference, the CPU kernels' paths per
instruction set, the fused LoRA term, and clear refusals."""

import pytest
import torch

import fastpeft
from fastpeft import backends
from fastpeft.nn import Linear4bit
from fastpeft.ops import nf4_matmul
from fastpeft.ops.nf4_matmul import nf4_matmul_reference

from conftest import (DTYPES, ISAS, assert_close, face_params, gpu_face_params, needs_extension, offset_view, on_face,
                      wide_rows)


def nested_args(q) -> dict:
    """nf4_matmul's double-quantisation arguments of an NF4Weight (none when it is single-quantised)."""
    return ({"nested_absmax": q.nested_absmax, "nested_quant_map": q.nested_quant_map, "absmax_offset": q.offset}
            if q.double_quant else {})


def test_reference_op_rejects_inconsistent_inputs():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    q = layer.q
    with pytest.raises(ValueError, match=r"packed bytes do not hold a \[32, 63\] weight"):
        nf4_matmul(torch.randn(2, 63), q.packed, q.absmax, q.quant_map, 64, 32, None, False)
    with pytest.raises(ValueError, match="absmax must be torch.float32 with 32 entries"):
        nf4_matmul(torch.randn(2, 64), q.packed, q.absmax[:31], q.quant_map, 64, 32, None, False)
    dq = Linear4bit.from_linear(torch.nn.Linear(64, 32), double_quant=True).q
    with pytest.raises(ValueError, match="absmax must be torch.uint8 with 32 entries"):
        nf4_matmul(torch.randn(2, 64), dq.packed, dq.block_absmax(), dq.quant_map, 64, 32, None, False,
                   nested_absmax=dq.nested_absmax, nested_quant_map=dq.nested_quant_map)
    with pytest.raises(ValueError, match="nested_absmax and nested_quant_map come together"):
        nf4_matmul(torch.randn(2, 64), dq.packed, dq.absmax, dq.quant_map, 64, 32, None, False,
                   nested_absmax=dq.nested_absmax)
    with pytest.raises(ValueError, match="nested_absmax must be float32 with 1 entries"):
        nf4_matmul(torch.randn(2, 64), dq.packed, dq.absmax, dq.quant_map, 64, 32, None, False,
                   nested_absmax=torch.ones(2), nested_quant_map=dq.nested_quant_map)
    with pytest.raises(TypeError, match="absmax_offset must be a number, got NoneType"):
        nf4_matmul(torch.randn(2, 64), q.packed, q.absmax, q.quant_map, 64, 32, absmax_offset=q.offset)
    assert nf4_matmul_reference(torch.randn(2, 64), q.packed, q.absmax, q.quant_map, 64, 32).shape == (2, 32)


@pytest.mark.parametrize("device,backend", face_params(nf4_matmul))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 96, 70), (17, 45, 33), (40, 128, 64), (3, 6208, 3)])  # last: 291 blocks
@pytest.mark.parametrize("double_quant", [False, True])
def test_faces_match_the_reference(device, backend, dtype, M, K, N, double_quant):
    op = nf4_matmul
    lin = torch.nn.Linear(K, N).to(dtype)
    q = Linear4bit.from_linear(lin, 64, double_quant).to(device).q
    x, dy = torch.randn(M, K, dtype=dtype, device=device), torch.randn(M, N, dtype=dtype, device=device)
    bias = lin.bias.detach().to(device)
    # double quantisation in both forms: codes decoded in the kernel, and absmax decoded beforehand
    nested = nested_args(q)
    forms = [(q.absmax, nested), (q.block_absmax(), {})] if double_quant else [(q.absmax, {})]
    expected = [nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, N, bias, False),
                nf4_matmul_reference(dy, q.packed, q.block_absmax(), q.quant_map, 64, N, None, True)]
    for absmax, extra in forms:
        with on_face(backend):
            got = [op(x, q.packed, absmax, q.quant_map, 64, N, bias, False, **extra),
                   op(dy, q.packed, absmax, q.quant_map, 64, N, None, True, **extra)]
        for g, e in zip(got, expected):
            assert_close(g, e, dtype)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _level_of_flags(flags: set[str]) -> str:
    level = "portable"
    if {"avx2", "fma", "f16c"} <= flags:
        level = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            level = "avx512"
            if "avx512_bf16" in flags:
                level = "avx512_bf16"
    return level


@needs_extension
def test_cpu_isa_follows_the_cpu_and_the_cap(monkeypatch):
    ext = backends.extension()
    flags = _cpu_flags()
    if flags:  # Linux: what the kernel reports is what CPUID and XGETBV said
        assert ext.cpu_isa_supported() == _level_of_flags(flags)
        features = ext.cpu_features()
        assert {name for name, present in features.items() if present} == set(features) & flags
    monkeypatch.delenv("FASTPEFT_CPU_ISA", raising=False)
    assert ext.cpu_isa() == ext.cpu_isa_supported()
    for isa in ISAS:  # a cap, never a promotion
        monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
        assert ext.cpu_isa() == ISAS[min(ISAS.index(isa), ISAS.index(ext.cpu_isa_supported()))]
    monkeypatch.setenv("FASTPEFT_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="FASTPEFT_CPU_ISA='avx9000' is not one of portable, avx2, avx512"):
        ext.cpu_isa()
    x = torch.randn(1, 64)
    q = Linear4bit.from_linear(torch.nn.Linear(64, 8), 64).q
    with fastpeft.use_backend("cpu"), pytest.raises(RuntimeError, match="FASTPEFT_CPU_ISA='avx9000'"):
        nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, 8)


def expected_cpu_path(isa: str, dtype: torch.dtype, M: int, K: int, blocksize: int, transposed: bool) -> str:
    """The path nf4_matmul's rule should pick (csrc/cpu/nf4_matmul.cpp), written out independently."""
    simd = K % 32 == 0 and blocksize >= 32
    at_least = lambda level: simd and ISAS.index(isa) >= ISAS.index(level)  # noqa: E731
    bf16_dots = at_least("avx512_bf16") and dtype == torch.bfloat16
    if not transposed and M <= (4 if bf16_dots else 16):
        return ("gemv-bf16-avx512" if bf16_dots else "gemv-avx512" if at_least("avx512")
                else "gemv-avx2" if at_least("avx2") else "gemv-portable")
    return "tiles-bf16-avx512" if bf16_dots else "tiles-fp32-avx2" if at_least("avx2") else "tiles-portable"


def varied_blocks(K: int, N: int, blocksize: int, double_quant: bool):
    """The NF4Weight of a random [N, K] weight whose absmax blocks differ by factors of up to e^6
    (each scaled by e^s, s in [-3, 3]: y stays far inside fp16's range): a kernel that scales a step
    by the wrong block's absmax is off by far more than any tolerance (nn.Linear's uniform weights
    give every block nearly the same absmax)."""
    w = torch.randn(N * K)
    blocks = -(-w.numel() // blocksize)
    w *= torch.exp(1.5 * torch.randn(blocks).clamp(-2, 2)).repeat_interleave(blocksize)[: w.numel()]
    return fastpeft.quant.quantize_nf4(w.reshape(N, K), blocksize, double_quant=double_quant)


def run_cpu_face(isa, x, q, blocksize, N, bias, transposed):
    """nf4_matmul on the CPU face; asserts the path it took is the one the rule names for `isa`."""
    ext = backends.extension()
    with on_face("cpu"):
        y = nf4_matmul(x, q.packed, q.absmax, q.quant_map, blocksize, N, bias, transposed, **nested_args(q))
    path = expected_cpu_path(isa, x.dtype, x.shape[0], q.shape[1], blocksize, transposed)
    assert ext.nf4_cpu_last_path() == path
    # finite x and bitsandbytes' map: gemv-avx2 takes bf16 x as 16-bit integers
    assert ext.nf4_cpu_last_levels() == (expected_levels(isa, x.dtype, bool(x.isfinite().all()))
                                         if path == "gemv-avx2" else "")
    assert ext.nf4_cpu_path(x.shape[0], q.shape[1], blocksize, str(x.dtype).removeprefix("torch."), transposed) == path
    return y


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("M,K,N,blocksize", [
    (1, 32, 1, 32), (2, 96, 7, 32), (3, 160, 33, 32), (5, 96, 17, 64),  # 32-weight steps (K % 64 or blocksize 32)
    (1, 320, 11, 64), (2, 64, 5, 64), (3, 128, 7, 128), (6, 192, 9, 64), (16, 256, 9, 128),  # 64-weight steps
    (4, 256, 3, 64),                                             # the bf16 dot-product GEMV's last row count
    (1, 128, 200, 64), (4, 96, 130, 64),                         # several row blocks for the threads
    (2, 4096 + 64, 3, 4096),                                     # rows that start inside a block
    (9, 6208, 3, 64),                                            # 291 blocks: two nested absmax groups
    (4, 45, 6, 64)])                                             # K % 32 != 0: the portable loop
def test_cpu_gemv_paths_match_the_reference(cpu_isa, dtype, double_quant, M, K, N, blocksize):
    """M <= 16 takes a GEMV (bf16 x with AVX512_BF16: M <= 4, the bf16 tiles above): SIMD where
    the level allows and K % 32 == 0 (64-weight steps when K % 64 == 0 and blocksize >= 64, else
    32; up to 4 rows per decoded step), the portable loop otherwise; every level the CPU has."""
    q = varied_blocks(K, N, blocksize, double_quant)
    x, bias = torch.randn(M, K, dtype=dtype), torch.randn(N, dtype=dtype)
    # The product of the same bytes in float64, rounded once: the reference rounds every weight to
    # x's dtype first, which a GEMV accumulating in fp32 never does, and with blocks scaled this
    # unevenly that alone put the reference ~7 fp16 ulps off (M=1, K=32, N=1) where the GEMV was right.
    exact = nf4_matmul_reference(x.double(), q.packed, q.block_absmax().double(), q.quant_map.double(), blocksize,
                                 N, bias.double(), False)
    assert_close(run_cpu_face(cpu_isa, x, q, blocksize, N, bias, False), exact.to(dtype), dtype)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N", [(1, 1), (1, 17), (3, 200), (1, 1003)])
def test_cpu_gemv_rows_shared_among_threads_are_each_computed_once(cpu_isa, dtype, M, N):
    """The GEMVs give each thread a contiguous share of the row blocks, and a thread done with its
    own takes blocks from the back of the others': every row is computed by one thread with the
    same arithmetic whatever the thread count, so each count gives the one-thread result bit for
    bit (a block skipped would leave the output's uninitialised memory, one taken twice is raced)."""
    q = varied_blocks(128, N, 64, True)
    x = torch.randn(M, 128, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3, 5, 8):
            torch.set_num_threads(count)
            results[count] = run_cpu_face(cpu_isa, x, q, 64, N, None, False)
    finally:
        torch.set_num_threads(threads)
    for count, y in results.items():
        assert torch.equal(y, results[1]), f"{count} threads"


@needs_extension
@pytest.mark.parametrize("isa", ["avx2", "avx512_bf16"])
@pytest.mark.parametrize("M,K", [(1, 4096), (3, 4096), (1, 4096 - 32)])  # 64- and 32-weight steps
def test_cpu_bf16_gemv_is_as_accurate_as_the_output_rounding(monkeypatch, isa, M, K):
    """The bf16 GEMVs decode levels apart from the absmax: AVX512_BF16's as bf16, AVX2's as 16-bit
    integers. Rounded to the nearest bf16 each, levels err the same way often enough that x of
    nonzero mean (SiLU outputs) adds the error up K times: 2.2e-2 RMS off the exact product here,
    5.8x the reference's bf16 weights. Dithered over 8 tables (AVX512_BF16), or as integers within
    3.1e-5 (AVX2), they stay near the cost of rounding y to bf16 (2.2e-3), below the reference's
    own error (3.8e-3)."""
    supported = backends.extension().cpu_isa_supported()
    if ISAS.index(isa) > ISAS.index(supported):
        pytest.skip(f"this CPU's kernels reach {supported}, not {isa}")
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    torch.manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(K, 256, bias=False), 64, double_quant=True).q
    x = (torch.randn(M, K) + 2).bfloat16()
    exact = x.double() @ fastpeft.quant.dequantize_nf4(q).double().t()
    y = run_cpu_face(isa, x, q, 64, 256, None, False)
    assert backends.extension().nf4_cpu_last_path() in ("gemv-avx2", "gemv-bf16-avx512")
    reference = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, 256)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    error, reference_error = rms(y.double() - exact) / rms(exact), rms(reference.double() - exact) / rms(exact)
    assert error < 4e-3 and error < reference_error, (error, reference_error)


def expected_levels(isa: str, dtype: torch.dtype, integers: bool) -> str:
    """What gemv-avx2 decodes into (nf4_cpu_last_levels): bf16 x as 16-bit integers where it takes
    them (`integers`: finite x, a map within [-1, 1]), else bf16 levels; fp32 levels for other x."""
    if isa != "avx2":
        return ""
    return ("int16" if integers else "bf16") if dtype == torch.bfloat16 else "fp32"


def assert_rows_close(y: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    """Each row of y against the float64 product, both divided by that row's largest |exact|: a
    row of 1e-31 is held to the tolerance of a row of ones."""
    for row in range(y.shape[0]):
        scale = exact[row].abs().max().clamp_min(1e-300)
        assert_close((y[row].double() / scale).to(dtype), (exact[row] / scale).to(dtype), dtype, msg=f"{msg}, row {row}")


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [256, 256 - 32])  # 64- and 32-weight steps
def test_cpu_gemvs_take_x_of_any_magnitude_and_any_levels(cpu_isa, dtype, K):
    """The AVX2 GEMV of bf16 x sums 16-bit integers: x in steps scaled by powers of two, levels
    times 16383. Steps of x that differ by up to 2^16 within a row, rows of 1e-31 and 1e31 (fp16
    keeps to its range), a row of subnormal x with a step of zeros, a quant map beyond [-1, 1],
    and x that is not finite (inf, nan: those rows must come out as float64's do, the others
    exact) all match the product in float64; the integers are taken where they can be."""
    ext = backends.extension()
    N, blocksize = 24, 64
    q = varied_blocks(K, N, blocksize, True)
    spread, big = (8, 1e31) if dtype != torch.float16 else (3, 1.0)  # fp16: y within its range
    steps = torch.randint(-spread, spread + 1, (5, K // 32)).repeat_interleave(32, dim=1)
    x = torch.randn(5, K, dtype=torch.float64) * torch.pow(2.0, steps)
    x[1] *= 1 / big
    x[2] *= big
    x[4] = torch.randn(K, dtype=torch.float64) * torch.finfo(dtype).tiny / 16  # subnormal in x's dtype
    x[4, :64] = 0
    x = x.to(dtype)
    assert x[4, 64:].abs().max() < torch.finfo(dtype).tiny
    for name, quant_map in {"nf4": q.quant_map, "wide": q.quant_map * 3}.items():
        exact = nf4_matmul_reference(x.double(), q.packed, q.block_absmax().double(), quant_map.double(), blocksize,
                                     N, None, False)
        with on_face("cpu"):
            y = nf4_matmul(x, q.packed, q.absmax, quant_map, blocksize, N, None, False, **nested_args(q))
        assert ext.nf4_cpu_last_levels() == expected_levels(cpu_isa, dtype, name == "nf4"), name
        if ext.nf4_cpu_last_path() in ("gemv-bf16-avx512", "tiles-bf16-avx512"):
            # vdpbf16ps takes subnormal inputs as zero (the instruction's definition, whatever MXCSR says)
            assert torch.equal(y[4], torch.zeros_like(y[4]))
            exact[4] = 0
        assert_rows_close(y, exact, dtype, f"{name} map")
    for row, value in [(0, float("inf")), (3, float("nan"))]:  # each alone in its call
        bad = x.clone()
        bad[row, 7] = value
        exact = nf4_matmul_reference(bad.double(), q.packed, q.block_absmax().double(), q.quant_map.double(),
                                     blocksize, N, None, False)
        with on_face("cpu"):
            y = nf4_matmul(bad, q.packed, q.absmax, q.quant_map, blocksize, N, None, False, **nested_args(q))
        assert ext.nf4_cpu_last_levels() == expected_levels(cpu_isa, dtype, False), value
        assert torch.equal(y.isnan(), exact.isnan()) and torch.equal(y.isinf(), exact.isinf()), value
        assert (y[row].isinf() | y[row].isnan()).all(), value
        others = [other for other in range(4) if other != row]  # row 4, subnormal, checked above
        assert_rows_close(y[others], exact[others], dtype, f"{value} in row {row}")


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("M,K,N,blocksize", [
    (17, 96, 300, 64), (20, 160, 40, 32),   # 32-weight steps; 300 rows: several panels and tiles
    (33, 128, 257, 128),                     # 64-weight steps, a one-row last tile and a padded panel
    (5, 64, 49, 64), (6, 64, 7, 64),         # the fewest rows the bf16 tiles take; padded panels
    (7, 256, 13, 64),                        # x's rows in tiles of 4, 3 left over
    (24, 4096 + 64, 3, 4096),                # rows that start inside a block; a ragged column tile
    (17, 45, 6, 64)])                        # K % 32 != 0: the portable dequantiser
def test_cpu_tiles_match_the_reference(cpu_isa, dtype, double_quant, M, K, N, blocksize):
    """Above the GEMV's rows, and the backward (transposed), tiles: bf16 tiles and AVX512_BF16 dot
    products for bf16 x where the level allows (the backward through torch's bf16 matmul on
    natural-order column tiles), SIMD-decoded fp32 tiles and fp32 GEMMs with AVX2 and K % 32 == 0,
    tiles in x's dtype from the portable loop otherwise; every level the CPU has."""
    q = varied_blocks(K, N, blocksize, double_quant)
    x, dy, bias = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype), torch.randn(N, dtype=dtype)
    got = [run_cpu_face(cpu_isa, x, q, blocksize, N, bias, False),
           run_cpu_face(cpu_isa, dy, q, blocksize, N, None, True)]
    expected = [nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, blocksize, N, bias, False),
                nf4_matmul_reference(dy, q.packed, q.block_absmax(), q.quant_map, blocksize, N, None, True)]
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert_close(g, e, dtype)


@pytest.mark.parametrize("device,backend", face_params(nf4_matmul))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", [(1, 96, 70, 1), (3, 64, 33, 16), (17, 45, 33, 5), (40, 128, 64, 70)])
def test_faces_add_the_fused_lora_term(device, backend, dtype, M, K, N, r):
    """The LoRA term in the NF4 GEMM's accumulator: forward (s·Bᵀ) and transposed (t·A), ranks 1
    to 70 (above one 64-wide rank chunk), the GEMV rows (M <= 16) and the tiled ones."""
    op = nf4_matmul
    q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, double_quant=True).to(device).q
    absmax = q.block_absmax()
    nested = nested_args(q)
    x, dy = torch.randn(M, K, dtype=dtype, device=device), torch.randn(M, N, dtype=dtype, device=device)
    s, t = torch.randn(M, r, dtype=dtype, device=device), torch.randn(M, r, dtype=dtype, device=device)
    b_t, a = torch.randn(r, N, dtype=dtype, device=device), torch.randn(r, K, dtype=dtype, device=device)
    cases = [(x, None, False, s, b_t.t().contiguous().t()), (dy, None, True, t, a)]  # B as a transposed view
    for inp, bias, transposed, ls, ll in cases:
        expected = nf4_matmul_reference(inp, q.packed, absmax, q.quant_map, 64, N, bias, transposed, ls, ll, 0.5)
        with on_face(backend):
            got = op(inp, q.packed, q.absmax, q.quant_map, 64, N, bias, transposed, ls, ll, 0.5, **nested)
        assert_close(got, expected, dtype)


def triton_devices():
    """The devices the Triton face runs on here: the interpreter on the CPU, a GPU when there is one."""
    return [pytest.param(p.values[0], marks=p.marks, id=p.values[0])
            for p in face_params(nf4_matmul) if p.values[1] == "triton"]


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels nf4_matmul's face launches (each launch still runs)."""
    pytest.importorskip("triton")
    from fastpeft.kernels import nf4_matmul as kernels
    names = []
    original = kernels.wrap_triton

    def recording(kernel):
        names.append(kernel.fn.__name__)
        return original(kernel)

    monkeypatch.setattr(kernels, "wrap_triton", recording)
    return names


# (M, K, N, blocksize, programs asked for, the split that gives): M from 1 to 16 with ragged N (not
# a multiple of any BLOCK_N), each split (1, 2, 4), blocksizes 32 (BLOCK_K 32), 64 and 128 (two
# trips per absmax block), and parts of an odd number of blocks (384 = 2 x 3 x 64).
GEMV_SHAPES = [(1, 256, 70, 64, 1, 1), (16, 512, 33, 64, 10**6, 4), (9, 256, 300, 128, 5, 2),
               (5, 192, 17, 32, 10**6, 2), (13, 384, 129, 64, 5, 2), (2, 320, 1, 64, 1, 1)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,blocksize,programs,split", GEMV_SHAPES)
def test_triton_decode_gemv_matches_the_reference(monkeypatch, triton_launches, device, dtype, M, K, N, blocksize,
                                                   programs, split):
    """Rows M <= 16 take the GEMV (split-K views of W and x, the byte-pair level table, a scale per
    chunk) with bias, the fused LoRA term and double quantisation, against the reference."""
    from fastpeft.kernels import nf4_matmul as kernels
    monkeypatch.setattr(kernels, "GEMV_MIN_PROGRAMS", programs)
    assert kernels.gemv_split(M, K, N, blocksize, False) == split
    lin = torch.nn.Linear(K, N).to(dtype)
    for double_quant in (False, True):
        q = Linear4bit.from_linear(lin, blocksize, double_quant).to(device).q
        x = torch.randn(M, K, dtype=dtype, device=device)
        bias = lin.bias.detach().to(device)
        s, b_t = torch.randn(M, 7, dtype=dtype, device=device), torch.randn(7, N, dtype=dtype, device=device)
        for extra in ({}, {"lora_s": s, "lora_l": b_t, "lora_scaling": 0.5}):
            expected = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, blocksize, N, bias, **extra)
            triton_launches.clear()
            with on_face("triton"):
                got = nf4_matmul(x, q.packed, q.absmax, q.quant_map, blocksize, N, bias, **extra,
                                 **nested_args(q))
            assert triton_launches == ["_nf4_gemv_kernel"]
            assert_close(got, expected, dtype)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_decode_gemv_reads_strided_and_offset_inputs(triton_launches, device, dtype):
    """x with a row stride above K, x starting one element into its storage (a pointer off 16 bytes),
    and an output of M = 0 rows."""
    M, K, N = 11, 256, 90
    q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, True).to(device).q
    wide = torch.randn(M, K + 24, dtype=dtype, device=device)[:, 8:8 + K]
    shifted = torch.randn(M * K + 1, dtype=dtype, device=device)[1:].view(M, K)
    for x in (wide, shifted):
        expected = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, N)
        triton_launches.clear()
        with on_face("triton"):
            got = nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, N, **nested_args(q))
        assert triton_launches == ["_nf4_gemv_kernel"]
        assert_close(got, expected, dtype)
    with on_face("triton"):
        empty = nf4_matmul(torch.randn(0, K, dtype=dtype, device=device), q.packed, q.absmax, q.quant_map, 64, N,
                           **nested_args(q))
    assert empty.shape == (0, N)


def test_triton_decode_gemv_takes_rows_of_whole_blocks_only():
    """The tiled kernel takes M > 16, the transposed product and rows not made of whole blocks."""
    pytest.importorskip("triton")
    from fastpeft.kernels.nf4_matmul import GEMV_MAX_M, gemv_split
    assert gemv_split(GEMV_MAX_M, 4096, 14336, 64, False) == 2
    assert gemv_split(1, 4096, 4096, 64, False) == 4
    assert gemv_split(1, 4096, 32768, 64, False) == 1
    assert gemv_split(GEMV_MAX_M + 1, 4096, 14336, 64, False) is None
    assert gemv_split(1, 4096, 14336, 64, True) is None
    assert gemv_split(1, 4096 + 32, 14336, 64, False) is None
    assert gemv_split(1, 64 * 3, 64, 64, False) == 1   # 3 blocks per row: no split keeps whole blocks


def cuda_face():
    """The C++ CUDA face where a GPU and the built extension are here (none otherwise: no test then)."""
    return [p for p in face_params(nf4_matmul) if p.values[1] == "cuda"]


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 8, 9, 13, 16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_face_takes_decode_rows(device, backend, dtype, M, double_quant):
    """csrc/cuda/nf4_matmul.cu's decode shapes against the reference: its GEMV at M = 1 (two features
    per warp, four 16-byte chunks per row per lane in flight), dequantise + cuBLAS above. K = 4160
    (4096 + 64) leaves a group of chunks partly out of range, N = 35 an odd feature for the last warp."""
    K, N = 4160, 35
    lin = torch.nn.Linear(K, N).to(dtype)
    q = Linear4bit.from_linear(lin, 64, double_quant).to(device).q
    x = torch.randn(M, K, dtype=dtype, device=device)
    bias = lin.bias.detach().to(device)
    expected = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, N, bias)
    with on_face(backend):
        got = nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, N, bias, **nested_args(q))
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("device,backend", cuda_face())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 12])
def test_cuda_face_reads_offset_and_strided_rows(device, backend, dtype, M):
    """x one element into its storage (misaligned: the tiled path even at M = 1) and x rows strided
    beyond K (the GEMV at M = 1, dequantise + cuBLAS at 12)."""
    K, N = 512, 40
    q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, True).to(device).q
    x = torch.randn(M, K, dtype=dtype, device=device)
    shifted = torch.empty(M * K + 1, dtype=dtype, device=device)[1:].view(M, K).copy_(x)
    padded = torch.empty(M, K + 24, dtype=dtype, device=device)[:, 8:8 + K].copy_(x)
    expected = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, N)
    for xi in (shifted, padded):
        with on_face(backend):
            got = nf4_matmul(xi, q.packed, q.absmax, q.quant_map, 64, N, **nested_args(q))
        assert_close(got, expected, dtype)


def features_past_int32_check(device, backend, M, K, N, dtype):
    """nf4_matmul of random bytes (N·K/2 of them) on `backend`; the first and last 64 output features
    against the reference on those features' bytes and scales alone."""
    blocksize = 64
    quant_map = Linear4bit.from_linear(torch.nn.Linear(64, 1), blocksize).q.quant_map.to(device)
    packed = torch.randint(0, 256, (N * K // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.rand(N * K // blocksize, device=device) + 0.5
    x = torch.randn(M, K, dtype=dtype, device=device)
    with on_face(backend):
        y = nf4_matmul(x, packed, absmax, quant_map, blocksize, N)
    assert y.shape == (M, N)
    for first in (0, N - 64):  # rows of W are K/2 bytes and K/blocksize scales each
        expected = nf4_matmul_reference(x, packed[first * K // 2:(first + 64) * K // 2],
                                        absmax[first * K // blocksize:(first + 64) * K // blocksize], quant_map,
                                        blocksize, 64)
        assert_close(y[:, first:first + 64], expected, dtype, msg=f"features {first}..{first + 63}")


@pytest.mark.parametrize("device,backend", gpu_face_params(nf4_matmul))
@pytest.mark.parametrize("M", [1, 20])
def test_face_indexes_packed_bytes_beyond_int32(release_gpu_memory, device, backend, M):
    """W [N, 4096] with N·K/2 > 2³¹ packed bytes (N = 2³²/4096 + 64: 2.1 GB of bytes, 268 MB of
    scales; weight elements past 2³²): M = 1 (Triton's GEMV) and M = 20 (its tiled kernel). The
    CUDA face takes its tiled path for both (its GEMV takes N·K < 2³¹ only, nf4_matmul.cu).
    About 2.5 GB of GPU memory; W read once (~0.5 ms at 4.3 TB/s), the CUDA face's 65 tiles of
    16384 rows (the last one partial) dequantised and multiplied in well under a second."""
    K = 4096
    N = 2**32 // K + 64
    assert N * K // 2 > 2**31
    features_past_int32_check(device, backend, M, K, N, torch.bfloat16)


@pytest.mark.parametrize("device,backend", face_params(nf4_matmul))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [offset_view, wide_rows])
def test_faces_read_offset_and_strided_rows_of_many_tokens(triton_launches, device, backend, dtype, layout):
    """M = 20 (above the GEMV's 16 rows: Triton's tiled kernel) with x one element into its storage
    or its rows strided beyond K, in the forward product and the transposed one (dy·W), double
    quantised, against the reference."""
    M, K, N = 20, 128, 40
    q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, True).to(device).q
    for x, transposed in ((torch.randn(M, K, dtype=dtype, device=device), False),
                          (torch.randn(M, N, dtype=dtype, device=device), True)):
        expected = nf4_matmul_reference(x, q.packed, q.block_absmax(), q.quant_map, 64, N, None, transposed)
        placed = layout(x)
        assert placed.storage_offset() % 8 == 1 or placed.stride(0) > x.shape[1]
        triton_launches.clear()
        with on_face(backend):
            got = nf4_matmul(placed, q.packed, q.absmax, q.quant_map, 64, N, None, transposed, **nested_args(q))
        assert triton_launches == (["_nf4_matmul_kernel"] if backend == "triton" else [])
        assert_close(got, expected, dtype, msg=f"transposed={transposed}, {layout.__name__}")


@pytest.mark.parametrize("device,backend", face_params(nf4_matmul))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faces_take_no_tokens(device, backend, dtype):
    """M = 0: outputs of no rows for the forward product (with bias and the LoRA term) and the
    transposed one."""
    K, N = 128, 40
    q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, True).to(device).q
    bias = torch.randn(N, dtype=dtype, device=device)
    lora = {"lora_s": torch.randn(0, 4, dtype=dtype, device=device),
            "lora_l": torch.randn(4, N, dtype=dtype, device=device), "lora_scaling": 0.5}
    with on_face(backend):
        y = nf4_matmul(torch.randn(0, K, dtype=dtype, device=device), q.packed, q.absmax, q.quant_map, 64, N, bias,
                       **lora, **nested_args(q))
        dx = nf4_matmul(torch.randn(0, N, dtype=dtype, device=device), q.packed, q.absmax, q.quant_map, 64, N, None,
                        True, **nested_args(q))
    assert y.shape == (0, N) and dx.shape == (0, K) and y.dtype == dx.dtype == dtype

