"""Faces run on their inputs' GPU, whichever is current (device_map="auto" spreads a model over GPUs)."""

import pytest
import torch

import fastpeft
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
