"""Faces run on their inputs' GPU, whichever is current (device_map="auto" spreads a model over GPUs):
on two GPUs where there are, and the guards that make it so wherever the tests run."""

import contextlib
import pathlib
import re

import pytest
import torch

import fastpeft
from fastpeft.ops import all_ops
from fastpeft.nn import Linear4bit
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.nf4_matmul import nf4_matmul_reference

from conftest import assert_close, on_face

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_faces_run_on_the_inputs_gpu_not_the_current_one(backend):
    device = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    x, w = torch.randn(5, 64, device=device), torch.randn(48, 64, device=device)
    a, b = torch.randn(4, 64, device=device), torch.randn(48, 4, device=device)
    with on_face("torch"):
        expected = lora_linear(x, w, None, a, b, 0.5)
    q = Linear4bit.from_linear(torch.nn.Linear(64, 48), 64).to(device).q
    nf4_expected = nf4_matmul_reference(x, q.packed, q.absmax, q.quant_map, 64, 48)
    with on_face(backend):
        got = lora_linear(x, w, None, a, b, 0.5)
        nf4_got = fastpeft.ops.nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, 48)
    torch.cuda.synchronize(device)
    assert got.device == device and nf4_got.device == device
    assert_close(got, expected)
    assert_close(nf4_got, nf4_expected)


# ---------------------------------------------------------------- the registry's device guard, without a GPU

class _InputOn:
    """Stands for an op's first input on a device: all Op.run reads of it before launching is .device."""

    def __init__(self, device):
        self.device = torch.device(device)


@pytest.fixture
def cuda_device_switches(monkeypatch):
    """torch.cuda's current device (cuda:0 at the start) and its device context, replaced by a
    recorder: the devices entered, in order, and which device is current."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device_context(device):
        device = torch.device(device)
        previous, state["current"] = state["current"], device.index
        state["entered"].append(device)
        try:
            yield
        finally:
            state["current"] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device_context)
    return state


TRITON_OPS = [op for op in all_ops().values() if op.triton_module is not None]


@pytest.mark.parametrize("op", TRITON_OPS, ids=lambda op: op.name)
def test_triton_face_launches_on_the_inputs_device(monkeypatch, cuda_device_switches, op):
    """Op.run enters the inputs' device around a Triton launch when another device is current
    (Triton launches on the current device and its stream), and leaves it after; inputs on the
    current device, or on the CPU (the interpreter), launch with no switch."""
    pytest.importorskip("triton")
    launched_on = []

    def launcher(*args):
        launched_on.append(cuda_device_switches["current"])
        return "launched"

    # both launchers: the interpreter's direct call and the triton_op a GPU runs
    monkeypatch.setattr(op, "_triton_eager", launcher)
    monkeypatch.setattr(op, "_triton", launcher)
    assert op.run("triton", _InputOn("cuda:1")) == "launched"
    assert launched_on == [1] and cuda_device_switches["entered"] == [torch.device("cuda", 1)]
    assert cuda_device_switches["current"] == 0
    for device in ("cuda:0", "cpu"):
        launched_on.clear()
        assert op.run("triton", _InputOn(device)) == "launched"
        assert launched_on == [0] and cuda_device_switches["entered"] == [torch.device("cuda", 1)], device


CUDA_SOURCES = sorted((pathlib.Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


def _function_body(source: str, name: str) -> str | None:
    """The body of the function `name` defined in `source` (None if it is defined elsewhere)."""
    match = re.search(rf"\b{name}\([^;{{]*\)\s*{{", source)
    if match is None:
        return None
    depth, start = 0, match.end() - 1
    for i in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i + 1]
    raise AssertionError(f"{name}: unbalanced braces")


@pytest.mark.parametrize("path", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_entry_points_guard_the_inputs_device(path):
    """Every CUDA kernel csrc/cuda/<op>.cu registers and defines makes its input's device current
    (c10::cuda::CUDAGuard) before it launches: the C++ faces' half of the guard, read from the
    source where no two GPUs run it. An entry point defined elsewhere (lora_linear_bwd_aten, ATen
    calls alone) follows its tensors' devices by itself."""
    source = path.read_text()
    impls = re.findall(r'm\.impl\("(\w+)",\s*&fastpeft::(\w+)\)', source)
    assert impls, f"{path.name} registers no CUDA kernel"
    guarded = 0
    for op_name, function in impls:
        body = _function_body(source, function)
        if body is None:
            continue
        guard = re.search(r"c10::cuda::CUDAGuard \w+\([\w.]+\.device\(\)\);", body)
        assert guard, f"{path.name}: {function} ({op_name}) runs without a CUDAGuard of its input's device"
        guarded += 1
    assert guarded, f"{path.name}: none of {impls} is defined there"
