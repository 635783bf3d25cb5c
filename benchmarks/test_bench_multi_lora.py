"""Mixed-adapter batches (base, fastpeft, each adapter separately, PEFT) on the cases of `fastpeft bench`."""

import pytest

from fastpeft import bench as fb

from conftest import DEVICE, QUICK, synchronized

CASES = fb.multi_lora_cases(DEVICE, QUICK)


@pytest.mark.parametrize("variant", ["base", "fastpeft", "separately", "peft"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label}-{c.dtype}-T{c.T}-K{c.K}-N{c.N}-r{c.r}-U{c.U}")
def test_multi_lora(benchmark, case, variant, device):
    variants = fb.multi_lora_variants(case, device)
    if variant not in variants:
        pytest.skip(f"{variant} is not available here (peft not installed?)")
    benchmark.group = f"multi_lora {case.label} {case.shape} {case.dtype}"
    benchmark(synchronized(variants[variant], device))
