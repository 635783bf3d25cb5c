"""pytest-benchmark harness over the cases of ``fastpeft bench`` (fastpeft/bench/).

    .venv/bin/python -m pytest benchmarks --benchmark-only           # full cases for this device
    FASTPEFT_BENCH_QUICK=1 .venv/bin/python -m pytest benchmarks     # the quick cases (CI)
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FASTPEFT_BENCH_QUICK", "0") not in ("", "0")


@pytest.fixture
def device():
    return DEVICE


def synchronized(fn, device):
    """pytest-benchmark times wall clock: on the GPU each call must wait for its kernels."""
    if device != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run
