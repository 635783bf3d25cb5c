"""NF4 base-weight matmul (nn.Linear in the case's dtype, fastpeft, bitsandbytes) on the cases of
`fastpeft bench`. A decode case's call runs its `layers` weights (the group name says "xN layers"):
these times are per call, `fastpeft bench` reports them per layer."""

import pytest

from fastpeft import bench as fb

from conftest import DEVICE, QUICK, synchronized

CASES = fb.nf4_cases(DEVICE, QUICK)


@pytest.mark.parametrize("variant", ["linear", "fastpeft", "bitsandbytes"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.label}-{c.dtype}-M{c.M}-K{c.K}-N{c.N}")
def test_nf4_matmul(benchmark, case, variant, device):
    variants = fb.nf4_variants(case, device)
    if variant not in variants:
        pytest.skip(f"{variant} is not available here (bitsandbytes not installed?)")
    benchmark.group = f"nf4_matmul {case.label} {case.shape} {case.dtype}"
    benchmark(synchronized(variants[variant], device))
