"""The op registry: every op is declared once here and dispatched from one point.

An op is declared with :func:`define` from its schema, a shape checker, and its pure-PyTorch
reference. That gives a real ``torch.ops.fastpeft.<name>`` operator with

* a fake (meta) implementation that runs the checker with ``torch._check`` and returns empty
  outputs, so ``torch.compile(fullgraph=True)`` traces through it;
* the reference registered as the default kernel (``CompositeExplicitAutograd``), which serves
  every device the C++ extension has no kernel for;
* per-device C++ kernels, registered by ``fastpeft._C`` with ``TORCH_LIBRARY_IMPL(fastpeft, CPU/CUDA)``
  when it is built (see ``csrc/``);
* a Triton face, registered from ``kernels/<op>.py`` with :meth:`Op.register_triton`.

Calling the :class:`Op` object is the single dispatch point: it validates the inputs, picks a face
(forced by :func:`fastpeft.use_backend` / ``FASTPEFT_BACKEND``, else the op's ``choose`` rule) and
runs it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import backends

NAMESPACE = "fastpeft"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

# device type -> faces to try when no backend is forced, best first (an op may override per shape).
DEFAULT_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


class Op:
    """One op: its schema, checker, reference and faces. Call it to run the best usable face."""

    def __init__(self, name: str, schema: str, check: Callable, fake: Callable, reference: Callable,
                 choose: Callable | None = None):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.check = check
        self.reference = reference
        self._choose = choose
        self._triton: Callable | None = None
        self._triton_eager: Callable | None = None
        self._cpp_faces: set[str] = set()

        _LIB.define(f"{name}{schema}")

        def _reference_kernel(*args):
            check(*args)
            return reference(*args)

        def _fake_kernel(*args):
            check(*args)
            return fake(*args)

        _LIB.impl(name, _reference_kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(self.qualname, _fake_kernel, lib=_LIB)
        self._overload = getattr(torch.ops.fastpeft, name).default

    @property
    def dispatcher_op(self):
        """``torch.ops.fastpeft.<name>.default``: C++ kernel for its device if built, else the reference."""
        return self._overload

    def register_triton(self, launcher: Callable) -> None:
        """Add the Triton face: `launcher` (from ``kernels/<op>.py``) launches its kernels through
        ``torch.library.wrap_triton`` and is registered as the op ``fastpeft::<name>_triton`` with
        ``torch.library.triton_op``, so torch.compile sees the kernels inside. Under the Triton
        interpreter the launcher is called directly: the interpreter cannot run on the fake tensors
        that dispatching through the op would hand it."""
        self._triton_eager = launcher
        self._triton = torch.library.triton_op(f"{self.qualname}_triton", mutates_args=())(launcher)

    def register_cpu_kernel(self, kernel: Callable) -> None:
        """A CPU face written with torch ops (an order of them that beats the reference, where C++
        would only call the same ATen kernels): registered on the dispatcher's CPU key like the
        extension's kernels, checks first, and counted as the ``cpu`` face when ``fastpeft._C`` is
        loaded (the ``cpu`` backend's availability rule)."""
        check = self.check

        def checked(*args):
            check(*args)
            return kernel(*args)
        _LIB.impl(self.name, checked, "CPU")

    def refresh_cpp_faces(self) -> None:
        """Record which devices ``fastpeft._C`` registered a kernel of this op for."""
        loaded = backends.extension() is not None
        self._cpp_faces = {backend for backend, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                           if loaded and torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, key)}

    def has_face(self, backend: str, device_type: str) -> bool:
        if backend == "torch":
            return True
        if backend == "triton":
            return self._triton is not None
        return backend == device_type and backend in self._cpp_faces

    def faces(self, device_type: str) -> list[str]:
        """The faces this op has for a device type (built or not), for ``fastpeft info``."""
        return [b for b in backends.BACKENDS if b == "torch" or b == "triton" and self._triton is not None
                or b == device_type and b in ("cpu", "cuda")]

    def select(self, device: torch.device, *args) -> str:
        """Which face runs these arguments."""
        forced = backends.forced_backend()
        if forced is not None:
            avail = backends.availability(forced, device)
            if not avail.usable:
                raise backends.BackendUnavailable(f"{self.name}: {avail.reason}")
            if not self.has_face(forced, device.type):
                why = (f"fastpeft._C has no {forced} kernel for it" if forced in ("cpu", "cuda")
                       else "it has no Triton kernel")
                raise backends.BackendUnavailable(f"{self.name}: backend {forced!r} was forced, but {why}")
            return forced
        order = self._choose(device, *args) if self._choose else DEFAULT_PREFERENCE.get(device.type, ("torch",))
        for name in order:
            if self.has_face(name, device.type) and backends.availability(name, device).usable:
                return name
        return "torch"

    def run(self, backend: str, *args):
        """Run one named face (no selection); inputs must already be checked."""
        if backend == "torch":
            return self.reference(*args)
        if backend == "triton":
            launch = self._triton_eager if backends.triton_interpreting() else self._triton
            device = args[0].device
            # Triton launches on the current device and its stream: guard with the inputs' own (cuda:1
            # tensors with cuda:0 current, as device_map="auto" makes them, read illegal addresses).
            # The C++ faces guard themselves (c10::cuda::CUDAGuard).
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return launch(*args)
            return launch(*args)
        return self.dispatcher_op(*args)

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        """Arguments given by name placed by the schema, defaults filling the gaps between."""
        params = self._overload._schema.arguments
        bound = list(args)
        for param in params[len(args):]:
            if not kwargs:
                break
            if param.name in kwargs:
                bound.append(kwargs.pop(param.name))
            elif param.has_default_value():
                bound.append(param.default_value)
            else:
                raise TypeError(f"{self.name}: missing argument {param.name!r}")
        if kwargs:
            raise TypeError(f"{self.name}: unexpected or repeated arguments {sorted(kwargs)}")
        return tuple(bound)

    def __call__(self, *args, **kwargs):
        if kwargs:
            args = self._bind(args, dict(kwargs))
        # Under torch.compile the registered fake kernel runs the same checks on fake tensors.
        if not torch.compiler.is_compiling():
            self.check(*args)
        device = args[0].device  # every op's first argument is a tensor
        return self.run(self.select(device, *args), *args)


_OPS: dict[str, Op] = {}


def unit_stride_rows(t: torch.Tensor) -> bool:
    """Whether the kernels can read `t`'s rows as they lie: its last dimension is unit-stride, or has
    one element, or `t` has none (an empty gradient that autograd expanded has stride 0 everywhere)."""
    return t.stride(-1) == 1 or t.shape[-1] == 1 or t.numel() == 0


def define(name: str, schema: str, *, check: Callable, fake: Callable, reference: Callable,
           choose: Callable[..., Sequence[str]] | None = None) -> Op:
    """Declare op ``fastpeft::<name>``; see the module docstring."""
    if name in _OPS:
        raise RuntimeError(f"op {name} is already defined")
    op = _OPS[name] = Op(name, schema, check, fake, reference, choose)
    return op


def load_cpp_faces() -> None:
    """Load ``fastpeft._C`` (its kernels register themselves) and note each op's C++ faces.

    Run by ``import fastpeft`` once every op is declared, so that face selection later is plain
    Python over precomputed tables, which torch.compile traces without a graph break."""
    backends.load_extension()
    for op in _OPS.values():
        op.refresh_cpp_faces()
    backends.warm_availability()


def get(name: str) -> Op:
    return _OPS[name]


def all_ops() -> dict[str, Op]:
    return dict(_OPS)
