"""Test set-up: devices, faces, and the dtype-keyed tolerance table.

Without a GPU the Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported (``@triton.jit`` reads it at decoration), hence here, at the top.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import backends  # noqa: E402
from fastpeft.ops import record_faces  # noqa: E402
from fastpeft.testing import TOLERANCES, assert_close  # noqa: E402,F401  (the one table; tests take it from here)
from fastpeft.testing import full_precision_reductions  # noqa: E402

full_precision_reductions()

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_params():
    return [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


def face_params(op=None):
    """(device, backend) for every fast face that can run here (of those `op` has, given one: an op
    without a CUDA source has no cuda face to test); the reference is what they are tested against."""
    params = []
    for device in DEVICES:
        for backend in ("cpu", "triton", "cuda"):
            if op is not None and backend not in op.faces(device):
                continue
            avail = backends.availability(backend, torch.device(device))
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if not avail.usable:
                marks.append(pytest.mark.skip(reason=avail.reason))
            if backend == "cpu" and device != "cpu" or backend == "cuda" and device != "cuda":
                continue
            params.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return params


def gpu_face_params(op):
    """(device, backend) of `op`'s GPU faces, marked gpu: collected everywhere, run only on a GPU
    (for tests too large for the interpreter: the index-width ones)."""
    params = []
    for backend in ("triton", "cuda"):
        if backend not in op.faces("cuda"):
            continue
        marks = [pytest.mark.gpu]
        if HAS_GPU:
            avail = backends.availability(backend, torch.device("cuda"))
            if not avail.usable:
                marks.append(pytest.mark.skip(reason=avail.reason))
        params.append(pytest.param("cuda", backend, marks=marks, id=f"cuda-{backend}"))
    return params


# The row count that puts a [rows, 4096] tensor's last elements beyond 2³¹ (int32's range): 7 rows
# (28,672 elements) past it.
ROWS_PAST_INT32 = 2**31 // 4096 + 7


@pytest.fixture
def release_gpu_memory():
    """Hands the GPU memory a test cached back when it ends (tests of tensors of several GB)."""
    yield
    if HAS_GPU:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def on_face(backend):
    """Force `backend` inside the block and prove that it ran: some fastpeft op was called, and
    every call took that face (a face test that quietly ran another path proves nothing).
    Yields the recorded ``(op name, face)`` calls."""
    with fastpeft.use_backend(backend), record_faces() as taken:
        yield taken
    assert taken, f"no fastpeft op ran under use_backend({backend!r})"
    assert all(face == backend for _, face in taken), f"forced {backend!r}, but the calls took {taken}"


def assert_refused_before_any_face(monkeypatch, op, call, exc, pattern):
    """`call()` raises `exc` matching `pattern` before `op` picks a face or runs one. An op checks
    its inputs before it chooses a face, so this one call speaks for every face."""
    def no_face(*args, **kwargs):
        raise AssertionError(f"{op.name} went on to a face with bad input")

    monkeypatch.setattr(op, "select", no_face)
    monkeypatch.setattr(op, "run", no_face)
    with pytest.raises(exc, match=pattern):
        call()


# The CPU kernels' instruction-set levels, each a superset of the one before.
ISAS = ["portable", "avx2", "avx512", "avx512_bf16"]
needs_extension = pytest.mark.skipif(backends.extension() is None, reason="fastpeft._C is not built")


@pytest.fixture(params=ISAS)
def cpu_isa(request, monkeypatch):
    """Each level the CPU has, forced through FASTPEFT_CPU_ISA; a level above the CPU's is skipped."""
    supported = backends.extension().cpu_isa_supported()
    if ISAS.index(request.param) > ISAS.index(supported):
        pytest.skip(f"this CPU's kernels reach {supported}, not {request.param}")
    monkeypatch.setenv("FASTPEFT_CPU_ISA", request.param)
    return request.param


def fresh_seed() -> int:
    """A seed drawn from torch's global generator: fresh inputs each run, reproducible within it."""
    return int(torch.randint(2**31 - 1, ()))


def offset_view(t):
    """t's values in a tensor starting one element into its storage (a pointer off 16-byte alignment)."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


def wide_rows(t, pad=8):
    """t's values (2-D) in a slice of a wider tensor: rows strided beyond the row length, from column 3."""
    return torch.empty(t.shape[0], t.shape[1] + pad, dtype=t.dtype, device=t.device)[:, 3:3 + t.shape[1]].copy_(t)


def peak_cpu_bytes_above_start(fn) -> int:
    """Peak of the CPU bytes `fn` allocates and has not yet freed (torch's profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models train far faster so than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _automatic_backend():
    """Every test starts with automatic backend selection, whatever FASTPEFT_BACKEND says."""
    with fastpeft.use_backend(None):
        yield
