"""Which face of an op runs: the backend policy and its one switch.

Every op has up to four faces:

========  ==========================================================  =====================
name      what it is                                                  usable when
========  ==========================================================  =====================
torch     the pure-PyTorch reference, the definition of correct       always
triton    Triton kernels (``fastpeft/kernels/``)                      triton imports and a GPU
                                                                      is present, or
                                                                      ``TRITON_INTERPRET=1`` (CPU)
cpu       C++ CPU kernels of the extension ``fastpeft._C``            the extension is built
cuda      C++/CUDA kernels of the extension ``fastpeft._C``           built with CUDA, GPU present
========  ==========================================================  =====================

By default each op picks the fastest usable face for the device and shape of its inputs (its
preference, declared with the op in ``fastpeft/ops/<op>.py``). ``FASTPEFT_BACKEND=<name>`` or
``with fastpeft.use_backend(name):`` force one face; forcing a face that cannot run here raises
:class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (see README, 'Building')"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the requested op here."""


@dataclass(frozen=True)
class Availability:
    usable: bool
    reason: str  # why not, or what it runs on


_EXTENSION = None
_EXTENSION_ERROR = "fastpeft._C was not loaded yet"


def load_extension():
    """Import ``fastpeft._C`` (which registers its C++ kernels with the dispatcher), once.

    Called by ``import fastpeft`` after every op is declared; a failure is remembered, not raised.
    """
    global _EXTENSION, _EXTENSION_ERROR
    if _EXTENSION is None:
        try:
            _EXTENSION = importlib.import_module("fastpeft._C")
            _EXTENSION_ERROR = ""
        except ImportError as e:
            _EXTENSION_ERROR = f"fastpeft._C did not load ({e}); {BUILD_HINT}"
        _AVAILABILITY.clear()
    return _EXTENSION


def extension():
    """The compiled extension ``fastpeft._C``, or None if it was not built or failed to load."""
    return _EXTENSION


def extension_error() -> str:
    return _EXTENSION_ERROR


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9B14"), from /proc/cpuinfo where there is one; every CPU
    figure the project reports names it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


# Read once, as Triton itself does: @triton.jit picks the interpreter when a kernel is defined, and
# fastpeft's kernels are defined when fastpeft is imported. Faces and registry read it from here.
_INTERPRET = _env_flag("TRITON_INTERPRET")


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

    The one rule: the registry and the kernels' launchers (tile sizes, the bf16 workaround) all
    read it here."""
    return _INTERPRET


def triton_missing() -> str:
    """Why triton cannot be imported ("triton is not installed (...)"), or "" when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return ""


def check_availability(name: str, device_type: str | None, *, interpreting: bool, gpu: bool) -> Availability:
    """Can backend `name` run on `device_type` (None: anywhere on this machine)? A pure function of its arguments
    and of what is installed; :func:`availability` caches it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return Availability(True, "pure-PyTorch reference")
    if name == "triton":
        if err := triton_missing():
            return Availability(False, f"triton: {err}")
        if device_type == "cpu" or (device_type is None and not gpu):
            if interpreting:
                return Availability(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)")
            if device_type == "cpu":
                return Availability(False, "triton: tensors are on the CPU and TRITON_INTERPRET is not set")
            return Availability(False, "triton: no GPU and TRITON_INTERPRET is not set")
        if device_type not in (None, "cuda"):
            return Availability(False, f"triton: tensors on {device_type} are not supported")
        if not gpu:
            return Availability(False, "triton: no GPU is visible to torch")
        if interpreting:
            return Availability(False, "triton: TRITON_INTERPRET=1 runs kernels on the CPU, but tensors are on the GPU")
        return Availability(True, "Triton kernels on the GPU")
    ext = extension()
    if ext is None:
        return Availability(False, f"{name}: {extension_error()}")
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return Availability(False, f"cpu: tensors are on {device_type}, not the CPU")
        return Availability(True, "C++ CPU kernels (fastpeft._C)")
    if not ext.built_with_cuda():
        return Availability(False, "cuda: fastpeft._C was built without CUDA (torch without CUDA, or nvcc not found); "
                            "rebuild with CUDA_HOME set")
    if not gpu:
        return Availability(False, "cuda: no GPU is visible to torch")
    if device_type not in (None, "cuda"):
        return Availability(False, f"cuda: tensors are on {device_type}, not a GPU")
    return Availability(True, "C++/CUDA kernels (fastpeft._C)")


# (backend, device type) -> Availability. A plain dict filled outside compiled regions, so that
# face selection inside torch.compile is a lookup Dynamo can trace without a graph break.
_AVAILABILITY: dict = {}


def availability(name: str, device: torch.device | str | None = None) -> Availability:
    """Can backend `name` run here (on `device`, if given)? Cached per (name, device type)."""
    device_type = None if device is None else torch.device(device).type if isinstance(device, str) else device.type
    key = (name, device_type)
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = check_availability(name, device_type, interpreting=_INTERPRET,
                                                gpu=torch.cuda.is_available())
    return _AVAILABILITY[key]


def warm_availability() -> None:
    """Fill the cache for every backend and device type (at import, before anything is compiled)."""
    for name in BACKENDS:
        for device_type in (None, "cpu", "cuda"):
            availability(name, device_type)


def _env_backend() -> str | None:
    name = os.environ.get("FASTPEFT_BACKEND", "").strip().lower() or None
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND={name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return None if name == "auto" else name


# A plain module global (not a ContextVar): torch.compile reads and guards on it without a graph break.
_forced: str | None = _env_backend()


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``FASTPEFT_BACKEND``; None means automatic."""
    return _forced


def forced_backend_slot() -> tuple[dict, str]:
    """Where the forced backend is held, as (a dict, its key): for a reader in C++ that checks it
    at every call without calling :func:`forced_backend` (fastpeft._C.HeldCall). So the forced
    backend stays a plain module global, set by :func:`use_backend` alone."""
    return globals(), "_forced"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force every fastpeft op inside the block to run on backend `name` (None or "auto": automatic).

    Raises BackendUnavailable at once if `name` cannot run on this machine at all.
    """
    global _forced
    if name == "auto":
        name = None
    if name is not None:
        avail = availability(name)
        if not avail.usable:
            raise BackendUnavailable(avail.reason)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
