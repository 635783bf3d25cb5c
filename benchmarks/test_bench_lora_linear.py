"""lora_linear variants (base, fastpeft, reference, PEFT) on the cases of `fastpeft bench`."""

import pytest

from fastpeft import bench as fb

from conftest import DEVICE, QUICK, synchronized

CASES = fb.lora_cases(DEVICE, QUICK)


@pytest.mark.parametrize("variant", ["base", "fastpeft", "reference", "peft"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label}-{c.mode}-{c.dtype}-M{c.M}-K{c.K}-N{c.N}-r{c.r}")
def test_lora_linear(benchmark, case, variant, device):
    variants = fb.lora_variants(case, device)
    if variant not in variants:
        pytest.skip(f"{variant} is not available here (peft not installed?)")
    benchmark.group = f"lora_linear {case.label} {case.mode} {case.shape} {case.dtype}"
    benchmark(synchronized(variants[variant], device))
