"""PHM linear training step (fastpeft's factored faces, the materialised reference, a same-shape nn.Linear)
on the cases of `fastpeft bench`."""

import pytest

from fastpeft import bench as fb

from conftest import DEVICE, QUICK, synchronized

CASES = fb.phm_cases(DEVICE, QUICK)


@pytest.mark.parametrize("variant", ["linear", "fastpeft", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label}-{c.dtype}-M{c.M}-K{c.K}-n{c.n}-r{c.rank or 'full'}")
def test_phm_linear(benchmark, case, variant, device):
    variants = fb.phm_variants(case, device)
    benchmark.group = f"phm_linear {case.label} {case.shape} {case.dtype}"
    benchmark(synchronized(variants[variant], device))
