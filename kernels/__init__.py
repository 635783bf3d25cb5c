"""Triton kernels of fastpeft, one file per op; installed as ``fastpeft.kernels``.

Each module exposes launchers with the same signature as the op they implement (see
``fastpeft/ops/<op>.py``) and ``aot_configs()``: every (kernel, constexpr) combination it may launch,
which CI compiles ahead of time for sm_80 and sm_90 (``.ci/triton_aot.py``).
"""
