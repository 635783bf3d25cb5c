"""The whole bottleneck adapter block (fastpeft's op, the unfused reference, copying x) on the cases
of `fastpeft bench`."""

import pytest

from fastpeft import bench as fb

from conftest import DEVICE, QUICK, synchronized

CASES = fb.adapter_block_cases(DEVICE, QUICK)


@pytest.mark.parametrize("variant", ["copy", "fastpeft", "reference"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c.label}-{c.mode}-{c.dtype}-M{c.M}-D{c.D}-R{c.R}-{c.activation}")
def test_adapter_block(benchmark, case, variant, device):
    variants = fb.adapter_block_variants(case, device)
    benchmark.group = f"adapter_block {case.label} {case.mode} {case.shape} {case.dtype}"
    benchmark(synchronized(variants[variant], device))
