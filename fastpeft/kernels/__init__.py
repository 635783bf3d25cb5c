"""Triton kernels of fastpeft, one file per op (the ``triton`` face; see :mod:`fastpeft.backends`).

Each module exposes launchers named and shaped like the ops they implement (see
``fastpeft/ops/<op>.py``, which declares the module as its Triton face) and ``aot_configs()``: every
(kernel, constexpr) combination it may launch, which CI compiles ahead of time for sm_80 and sm_90
(``.ci/triton_aot.py``). A kernel module imports triton, torch and :mod:`fastpeft.backends` only,
never an op or the registry.
"""
