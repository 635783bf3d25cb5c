"""Every op's variants on the cases of `fastpeft bench` (fastpeft/bench/): the base op, fastpeft,
its reference and the peers, by role. A case with `layers` > 1 runs that many weights per call
(the group name says "xN layers"): these times are per call, `fastpeft bench` reports them per layer.
The ops are those `fastpeft bench` runs by default: the e2e ones in quick runs only (on a tiny Llama)."""

import pytest

from fastpeft.bench import selected

from conftest import DEVICE, QUICK, synchronized

PARAMS = [pytest.param(op, case, variant, id=f"{op.name}-{case.label}-{case.mode}-{case.dtype}-"
                                             f"{case.shape.replace(' ', '-')}-{variant}")
          for op in selected(None, QUICK) for case in op.cases(DEVICE, QUICK) for variant in op.variant_names]


@pytest.mark.parametrize("op, case, variant", PARAMS)
def test_op(benchmark, op, case, variant, device):
    variants = op.variants(case, device)
    if variant not in variants:
        pytest.skip(f"{variant} is not available here (not installed?)")
    benchmark.group = f"{op.name} {case}"
    benchmark(synchronized(variants[variant], device))
