"""The op registry: every op is declared once here and dispatched from one point.

An op is declared with :func:`define` from its schema, a shape checker, its pure-PyTorch reference
and the faces it has, named where the op is declared:

* ``triton="<stem>"``: the launcher named like the op in ``fastpeft/kernels/<stem>.py``;
* ``cpp=("cpu", "cuda")``: the devices ``fastpeft._C`` has a kernel of the op for
  (``csrc/cpu/<stem>.cpp``, ``csrc/cuda/<stem>.cu``; they register themselves with
  ``TORCH_LIBRARY_IMPL(fastpeft, CPU/CUDA)``);
* ``cpu_kernel=fn``: a CPU face written with torch ops, for ops where C++ would only call the
  same ATen kernels.

That gives a real ``torch.ops.fastpeft.<name>`` operator with

* a fake (meta) implementation that runs the checker and returns empty outputs, so
  ``torch.compile(fullgraph=True)`` traces through it;
* the reference registered as the default kernel (``CompositeExplicitAutograd``), which serves
  every device no other kernel is registered for;
* where the op declares its derivative (``setup_context=`` and ``backward=``, torch.library's
  form), that derivative registered with ``torch.library.register_autograd`` (for the op and its
  Triton op alike), so ``torch.ops.fastpeft.<name>`` called directly trains, and opcheck and
  AOTAutograd see it. Calling the :class:`Op` object with inputs that require grad runs the same
  derivative through :attr:`Op.function`, an autograd.Function whose forward takes the chosen face:
  one backward per op, whichever way it is called. Derivatives are once differentiable.

:func:`load_faces` (run by ``import fastpeft`` once every op is declared) imports the faces. A
missing optional dependency (triton not installed, the extension not built) is a refusal the
backend policy explains (:mod:`fastpeft.backends`); an error inside one of fastpeft's own kernel
modules is raised, so that a broken face can never quietly drop out of automatic selection.

Calling the :class:`Op` object is the single dispatch point: it validates the inputs, picks a face
(forced by :func:`fastpeft.use_backend` / ``FASTPEFT_BACKEND``, else the op's preference for the
device and shape) and runs it. :func:`record_faces` tells which face each call took.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
from typing import Callable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.function import once_differentiable

from .. import backends

NAMESPACE = "fastpeft"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

# The floating dtypes every op computes in.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# device type -> faces to try when no backend is forced, best first. An op overrides a device's
# order with `prefer`, or per shape with its `choose` rule for that device type; a face the op does
# not have is passed over.
DEFAULT_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}

# C++ faces and the dispatcher keys their kernels are registered under.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Dispatcher calls of a chosen face skip the autograd keys: the Op has already decided whether
# autograd is involved (see Op.__call__); passing through the registered autograd kernel, a
# Python function, would cost about 5 us a call. Excluding the key in thread-local state costs
# 0.2 us (torch._C._AutoDispatchBelowAutograd, a guard object, 0.4 us): excluding one backend's
# Autograd key excludes the Autograd functionality for every backend (dispatcher key sets subtract
# functionality bits), as the guard does.
_AUTOGRAD_KEY = torch._C.DispatchKey.AutogradCPU
_autograd_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
_exclude_autograd = torch._C._dispatch_tls_set_dispatch_key_excluded

# While record_faces() is active: the (op name, face) of every call, in order. A plain module
# global read once per call: free when nobody records, and torch.compile guards on it.
_taken: list[tuple[str, str]] | None = None


class Compare(enum.IntEnum):
    """How a held call (fastpeft._C.HeldCall, fastpeft.nn.op_plans) compares a value it reads at
    a call with the one it was made with; the numbers are the C++ side's (``HeldCall.COMPARES``)."""
    IDENTITY = 0  # the same object
    VERSION = 1  # the same tensor at the same version counter
    EQUAL = 2  # the same object or an equal value
    MISSING = 3  # (conditions only) no such key in the dict


class Op:
    """One op: its schema, checker, reference and faces. Call it to run the best usable face."""

    def __init__(self, name: str, schema: str, check: Callable, fake: Callable, reference: Callable,
                 choose: dict[str, Callable], prefer: dict[str, tuple[str, ...]], triton: str | None,
                 cpp: tuple[str, ...], cpu_kernel: Callable | None, setup_context: Callable | None = None,
                 backward: Callable | None = None):
        unknown = set(cpp) - set(_DISPATCH_KEYS)
        if unknown:
            raise ValueError(f"op {name}: cpp faces are devices of fastpeft._C, one of {sorted(_DISPATCH_KEYS)}; "
                             f"got {sorted(unknown)}")
        if cpu_kernel is not None and "cpu" in cpp:
            raise ValueError(f"op {name}: a CPU kernel comes from C++ or from Python, not both")
        if (setup_context is None) != (backward is None):
            raise ValueError(f"op {name}: a derivative is declared with both setup_context and backward")
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.check = check
        self.reference = reference
        self.triton_module = triton
        self.cpp_faces = frozenset(cpp)
        # Devices with a kernel of this op on the dispatcher besides the reference: C++ or Python.
        self.device_faces = self.cpp_faces | ({"cpu"} if cpu_kernel is not None else set())
        self._choose = dict(choose)  # device type -> (device, *args) -> order or None
        self._preference = {**DEFAULT_PREFERENCE, **prefer}
        self._triton: Callable | None = None
        self._triton_eager: Callable | None = None
        self._loaded_device_faces: frozenset[str] = frozenset()
        self.direct_cpu_kernel: Callable | None = None
        self.bind_cpu_kernel: Callable | None = None

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
        if cpu_kernel is not None:
            self._register_cpu_kernel(cpu_kernel)
        self._derivative = None
        self.function: type[torch.autograd.Function] | None = None
        if backward is not None:
            self._derivative = _derivative(self._overload._schema, setup_context, backward)
            torch.library.register_autograd(self.qualname, self._derivative[1], setup_context=self._derivative[0],
                                            lib=_LIB)
            forward, setup = self._forward, self._derivative[0]

            def function_forward(ctx, *args):
                output = forward(*args)
                setup(ctx, args, output)
                return output
            # forward(ctx, ...) calls setup_context itself: a Function that declares setup_context
            # binds its arguments with inspect.signature on every apply (~40 us a call).
            self.function = type(f"{name}_function", (torch.autograd.Function,), {
                "__doc__": f"Autograd of fastpeft::{name}: forward on the chosen face, the op's declared backward.",
                "forward": staticmethod(function_forward),
                "backward": staticmethod(self._derivative[1]),
            })

    @property
    def dispatcher_op(self):
        """``torch.ops.fastpeft.<name>.default``: the kernel registered for its device, else the reference."""
        return self._overload

    def _register_cpu_kernel(self, kernel: Callable) -> None:
        """A CPU face written with torch ops (an order of them that beats the reference, where C++
        would only call the same ATen kernels): registered on the dispatcher's CPU key like the
        extension's kernels, checks first, and counted as the ``cpu`` face when ``fastpeft._C`` is
        loaded (the ``cpu`` backend's availability rule)."""
        check = self.check

        def checked(*args):
            check(*args)
            return kernel(*args)
        _LIB.impl(self.name, checked, "CPU")

    def _load_triton(self) -> None:
        """Import the Triton face, if the op has one. Only call with triton importable: then any
        error here is fastpeft's own and propagates."""
        if self.triton_module is None:
            return
        module = importlib.import_module(f"..kernels.{self.triton_module}", __package__)
        launcher = getattr(module, self.name, None)
        if launcher is None:
            raise ImportError(f"op {self.name}: fastpeft/kernels/{self.triton_module}.py defines no launcher "
                              f"{self.name}()")
        # Under the Triton interpreter the launcher is called directly: the interpreter cannot run
        # on the fake tensors that dispatching through a triton_op would hand it. Otherwise it runs
        # as the op ``fastpeft::<name>_triton`` (torch.library.triton_op), so torch.compile sees the
        # kernels inside.
        self._triton_eager = refusing_aliases(self.qualname, launcher)
        self._triton = torch.library.triton_op(f"{self.qualname}_triton", mutates_args=())(launcher)
        if self._derivative is not None:
            self._triton.register_autograd(self._derivative[1], setup_context=self._derivative[0])

    def _load_device_faces(self) -> None:
        """Note which of the declared device faces the dispatcher has a kernel for (none without
        ``fastpeft._C``: the ``cpu`` and ``cuda`` backends need it)."""
        extension = backends.extension()
        self._loaded_device_faces = frozenset(
            face for face in self.device_faces
            if extension is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, _DISPATCH_KEYS[face]))
        # The C++ CPU kernel as a plain function, where the extension gives one (for op plans)
        # and bound to its arguments after x (for a layer's held call: fastpeft._C.HeldCall)
        cpu_kernels = getattr(extension, "cpu_kernels", None)
        direct = "cpu" in self._loaded_device_faces and "cpu" in self.cpp_faces
        self.direct_cpu_kernel = getattr(cpu_kernels, self.name, None) if direct else None
        self.bind_cpu_kernel = getattr(cpu_kernels, f"bind_{self.name}", None) if direct else None

    def has_face(self, backend: str, device_type: str) -> bool:
        """Whether the face is loaded and serves `device_type` (its backend's availability aside)."""
        if backend == "torch":
            return True
        if backend == "triton":
            return self._triton is not None
        return backend == device_type and backend in self._loaded_device_faces

    def faces(self, device_type: str) -> list[str]:
        """The faces this op has for a device type, loaded or not, for ``fastpeft info``."""
        return [b for b in backends.BACKENDS if b == "torch" or b == "triton" and self.triton_module is not None
                or b == device_type and b in self.device_faces]

    def missing_face(self, backend: str, device_type: str) -> str:
        """Why the op has no `backend` face for `device_type`, once the backend itself can run there."""
        if backend == "triton":
            if self.triton_module is None:
                return "it has no Triton kernel"
            return f"fastpeft/kernels/{self.triton_module}.py was not loaded ({backends.triton_missing()})"
        if backend not in self.device_faces:
            return f"it has no {backend} kernel"
        return (f"fastpeft._C registered no {backend} kernel for it (built from older sources?); "
                f"{backends.BUILD_HINT}")

    def select(self, device: torch.device, *args) -> str:
        """Which face runs these arguments."""
        forced = backends.forced_backend()
        if forced is not None:
            avail = backends.availability(forced, device)
            if not avail.usable:
                raise backends.BackendUnavailable(f"{self.name}: {avail.reason}")
            if not self.has_face(forced, device.type):
                raise backends.BackendUnavailable(f"{self.name}: backend {forced!r} was forced, but "
                                                  f"{self.missing_face(forced, device.type)}")
            return forced
        choose = self._choose.get(device.type)
        order = choose(device, *args) if choose is not None else None
        if order is None:
            order = self._preference.get(device.type, ("torch",))
        for name in order:
            if self.has_face(name, device.type) and backends.availability(name, device).usable:
                return name
        return "torch"

    def run(self, backend: str, *args):
        """Run one named face (no selection); inputs must already be checked. No autograd: the
        caller is inside :attr:`function`'s forward, or nothing needs a gradient."""
        if _taken is not None:
            _taken.append((self.name, backend))
        if backend == "torch":
            return self.reference(*args)
        compiling = torch.compiler.is_compiling()
        if backend == "triton":
            launch = self._triton_eager if backends.triton_interpreting() else self._triton
            device = args[0].device
            # Triton launches on the current device and its stream: guard with the inputs' own (cuda:1
            # tensors with cuda:0 current, as device_map="auto" makes them, read illegal addresses).
            # The C++ faces guard themselves (c10::cuda::CUDAGuard).
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return launch(*args) if compiling else below_autograd(launch, args)
            return launch(*args) if compiling else below_autograd(launch, args)
        if self.function is None or compiling:  # no autograd kernel of ours to skip
            return self._overload(*args)
        return below_autograd(self._overload, args)

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
        if torch.compiler.is_compiling():
            if self.function is not None and torch.is_grad_enabled() and any(
                    isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                return self.function.apply(*args)
            return self._forward(*args)
        if torch._C._len_torch_dispatch_stack() or isinstance(args[0], FakeTensor):
            # Traced by make_fx/AOTAutograd (opcheck, a registered backward being traced), under a
            # dispatch mode, or called on fake tensors: the dispatcher's op, whose fake kernel checks
            # and whose registered autograd differentiates. No face is chosen.
            return self._overload(*args)
        if self.function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self.function.apply(*args)
        self.check(*args)
        return self.run(self.select(args[0].device, *args), *args)

    def plan(self, *args) -> "Plan":
        """A :class:`Plan` of this op over `args` (x first, then the arguments it holds), checked by
        the op's checker now: a bad argument raises here as the call would."""
        return Plan(self, args)

    def _forward(self, *args):
        """Check, choose a face, run it (no autograd: :attr:`function`'s forward)."""
        # Under torch.compile the registered fake kernel runs the same checks on fake tensors.
        if not torch.compiler.is_compiling():
            self.check(*args)
        device = args[0].device  # every op's first argument is a tensor
        return self.run(self.select(device, *args), *args)


def refusing_aliases(qualname: str, launcher: Callable) -> Callable:
    """The interpreted launcher, held to the rule its triton_op enforces on the GPU: no output may
    be an input, alias one, or alias another output (the phm_linear backward's one empty tensor
    returned twice passed the interpreted suite and failed every call on an H200)."""
    def launch(*args):
        out = launcher(*args)
        if torch._C._any_output_is_alias_to_input_or_output(args, {}, out if isinstance(out, tuple) else (out,)):
            raise RuntimeError(f"{qualname}_triton: an output aliases an input or another output; "
                               f"return fresh tensors (a clone) instead")
        return out
    launch.__wrapped__ = launcher
    return launch


class Plan:
    """One op's inference call prepared once: every argument after x held and checked, so that
    each call checks x alone.

    A module makes one over its own tensors (its weights, what :func:`Op.__call__` would check
    every call) and calls ``plan(x)`` in place of ``op(x, *rest)``. Made with the op's full
    checker (:meth:`Op.plan`); a call runs the face chosen for it directly when x is a plain
    tensor like the one checked: same dtype and device, 2-D and contiguous with the same number
    of features. Which rows x has does not matter: every op's checker relates x to the other
    arguments through those alone when no other argument has a row per token (x_lora, lora_s:
    a plan is made with those None). Anything else takes the op's full path, ``op(x, *rest)``,
    with its checker and its errors: another x, a tensor that needs a gradient under grad mode
    (the op's autograd), torch.compile (the fake kernel), a dispatch mode or fake tensors. The
    face is chosen once per forced backend (and per order the op's ``choose`` gives, for ops
    whose order depends on the shape), as :meth:`Op.select` chooses it, and recorded as every
    call's is (:func:`record_faces`).

    The plan holds the tensors it was made with, not copies: their values are read at every
    call (an optimiser step, ``copy_`` are seen). Its holder makes a new one when it would pass
    other tensors, or these changed dtype, device or shape (its key: the tensors' identities and
    version counters; ``resize_`` and ``set_`` bump the version, ``.to()`` is seen by the module).
    A 64x64 layer at M = 1 (AMD EPYC Zen 4, one thread): the op's checker and face choice cost
    about 8 us a call, a plan's checks of x 0.6 us, and its run 0.4 us above the kernel's own
    time; nn.Linear's whole call takes 6 us there.
    """

    __slots__ = ("op", "rest", "dtype", "device", "on_cpu", "features", "_faces", "_forced", "_face", "_kernel",
                 "_chooser", "_conditions")

    def __init__(self, op: Op, args: tuple):
        op.check(*args)
        # Every argument held, the schema's defaults filling those not given: a direct kernel
        # call (below) takes them all, where the dispatcher would fill them.
        args = tuple(args) + tuple(param.default_value for param in op._overload._schema.arguments[len(args):])
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{op.name}: a plan is made with a 2-D x [tokens, features]")
        self.op, self.rest = op, tuple(args[1:])
        self.dtype, self.device, self.features = x.dtype, x.device, x.shape[1]
        self.on_cpu = x.device.type == "cpu"
        self._chooser = op._choose.get(x.device.type)  # the op's per-shape rule on this device, if any
        self._faces: dict = {}
        self._forced, self._face = backends.forced_backend(), None
        # chosen now: a forced backend that cannot run here raises at once, as a call would
        self._face = self.face(x)
        # The chosen face when it is a dispatcher kernel (C++, or a Python CPU kernel), as run()
        # calls it, x and the rest its arguments: a C++ CPU kernel the extension gives as a plain
        # function (fastpeft._C.cpu_kernels: 3.7 us a call on a 64x64 NF4 layer at M = 1, against
        # 5.0 us for the redispatch; AMD EPYC Zen 4, one thread), else the kernel by its dispatch
        # key alone, below autograd and every other key (a redispatch with a key set of that key:
        # no thread-local state to set and restore, 0.5 us, nor OpOverload.__call__'s Python
        # frame). Other faces go through Op.run.
        self._kernel = None
        # When run() calls that kernel itself, as data (dict, key, value, Compare), each holding
        # while dict[key] compares so with value: nobody records faces (Op.run records: a call
        # under record_faces takes the dispatcher's kernel of the same face, so its profile is not
        # inference's), no wrapper of the op's run, the forced backend the plan was made under.
        # Read here by _conditions_hold and by fastpeft._C.HeldCall (direct_call), so the two
        # cannot drift apart; a condition compares by IDENTITY, EQUAL or MISSING only.
        forced_dict, forced_key = backends.forced_backend_slot()
        self._conditions = [(globals(), "_taken", None, Compare.IDENTITY), (op.__dict__, "run", None, Compare.MISSING),
                            (forced_dict, forced_key, self._forced, Compare.EQUAL)]
        if self._face == "cpu" and op.direct_cpu_kernel is not None:
            self._kernel = op.direct_cpu_kernel
        elif self._face in op._loaded_device_faces:
            self._kernel = functools.partial(
                op._overload._handle.redispatch_boxed,
                torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _DISPATCH_KEYS[self._face])))

    def face(self, x: torch.Tensor) -> str:
        """The face that runs x (an x that :meth:`fits`), as :meth:`Op.select` chooses it: once per
        forced backend and order of the op's ``choose``."""
        op, forced = self.op, backends.forced_backend()
        order = self._chooser(self.device, x, *self.rest) if self._chooser is not None else None
        if order is None and forced == self._forced and self._face is not None:
            return self._face
        key = (forced, None if order is None else tuple(order))
        face = self._faces.get(key)
        if face is None:
            face = self._faces[key] = op.select(self.device, x, *self.rest)
        return face

    def fits(self, x) -> bool:
        """Whether x can run on the plan's face as it is (see the class), outside torch.compile
        (which the caller rules out first: :meth:`__call__` does, a layer's forward does before it
        looks at its plan); else ``op(x, *rest)``, or whatever the holder does with such an x (a
        layer casts x, makes it contiguous...)."""
        # Cheapest first (x.shape costs 0.25 us, x.device 0.1 us, x.is_cpu 0.06): each term a
        # condition without which the checks made with the plan's x may not hold for this one, or
        # something other than a face must run.
        # A negated view (torch._neg_view) goes to the op: the dispatcher resolves it, a face would
        # read the stored values (the plan's real dtypes carry no conjugation).
        return (type(x) is torch.Tensor and x.dtype is self.dtype and x.dim() == 2 and x.is_contiguous()
                and (x.is_cpu if self.on_cpu else x.device == self.device) and x.shape[1] == self.features
                and not x.is_neg()
                and not (torch.is_grad_enabled() and torch._C._any_requires_grad(x, *self.rest))
                and not torch._C._len_torch_dispatch_stack())

    def run(self, x: torch.Tensor):
        """The op on x on the plan's face, x one that :meth:`fits` (recorded by :func:`record_faces`)."""
        op, rest = self.op, self.rest
        if (self._kernel is None or not _conditions_hold(self._conditions)
                or self._chooser is not None and self._chooser(self.device, x, *rest) is not None):
            # Op.run itself: another face than the plan's first (a forced one, one for the shape),
            # a Triton or reference face, faces recorded, or a run a caller wrapped to watch the
            # faces (fastpeft.bench notes the face each case ran).
            return op.run(self.face(x), x, *rest)
        return self._kernel(x, *rest)

    def __call__(self, x):
        """``op(x, *rest)``: the plan's face when x :meth:`fits`, else the op's full path."""
        return self.run(x) if not torch.compiler.is_compiling() and self.fits(x) else self.op(x, *self.rest)

    def direct_call(self) -> tuple[Callable, tuple, list[tuple]] | None:
        """What a caller outside Python (fastpeft._C.HeldCall) needs to call the plan's kernel as
        :meth:`runner` does, for an x that :meth:`fits`: ``(kernel, rest, conditions)``, the
        kernel called as ``kernel(x, *rest)`` while every condition ``(dict, key, value,
        Compare)`` holds (nobody records faces, no wrapper of the op's run, the forced backend the
        plan was made under); else ``runner()(x)``. The C++ CPU kernel comes bound to rest
        (``fastpeft._C.BoundKernel``: its numbers converted once, not at every call). None where
        every call takes ``runner()``: a Triton or reference face, an op with a per-shape rule on
        this device, or a list among the arguments (whose tensors the caller's gradient test
        would not see)."""
        if self._kernel is None or self._chooser is not None or any(isinstance(a, (list, tuple)) for a in self.rest):
            return None
        kernel, op = self._kernel, self.op
        if kernel is op.direct_cpu_kernel and op.bind_cpu_kernel is not None:
            kernel = op.bind_cpu_kernel(*self.rest)
        return kernel, self.rest, list(self._conditions)

    def runner(self) -> Callable[[torch.Tensor], object]:
        """``run_if_fits(x)``: ``run(x)`` when x :meth:`fits`, else None (the caller takes its own
        path), outside torch.compile (which the caller rules out first). One Python frame for both,
        with the plan's attributes bound once: a layer's held call runs it where it does not call
        the kernel itself (:meth:`direct_call`), and on every call without the extension (a 64x64
        layer at M = 1: fits() then run() took 5.1 us, this 4.3 with the CPU's choose rule gone;
        AMD EPYC Zen 4, one thread; reading the direct call's conditions as data, not as three
        inline tests, adds about 0.1 us)."""
        fits, run = self.fits, self.run
        kernel, rest, choose = self._kernel, self.rest, self._chooser
        if kernel is None:  # a Triton or reference face
            return lambda x: run(x) if fits(x) else None
        dtype, features, device, on_cpu = self.dtype, self.features, self.device, self.on_cpu
        conditions, grad_enabled = self._conditions, torch.is_grad_enabled
        any_requires_grad, dispatch_modes = torch._C._any_requires_grad, torch._C._len_torch_dispatch_stack

        def run_if_fits(x):
            # fits(x), term for term; then run(x)'s direct kernel call where run would take it
            if not (type(x) is torch.Tensor and x.dtype is dtype and x.dim() == 2 and x.is_contiguous()
                    and (x.is_cpu if on_cpu else x.device == device) and x.shape[1] == features and not x.is_neg()
                    and not (grad_enabled() and any_requires_grad(x, *rest)) and not dispatch_modes()):
                return None
            if _conditions_hold(conditions) and (choose is None or choose(device, x, *rest) is None):
                return kernel(x, *rest)
            return run(x)
        return run_if_fits


_MISSING, _IDENTITY = Compare.MISSING, Compare.IDENTITY


def _conditions_hold(conditions: list[tuple]) -> bool:
    """Whether every ``(dict, key, value, Compare)`` of a plan's direct kernel call holds (see
    Plan.__init__), read as fastpeft._C.HeldCall reads them."""
    for entries, key, value, compare in conditions:
        if compare is _MISSING:
            if key in entries:
                return False
            continue
        current = entries.get(key)
        if current is not value and (compare is _IDENTITY or not current == value):
            return False
    return True


def below_autograd(fn, args):
    """``fn(*args)`` with the dispatcher's autograd keys excluded (as under
    ``torch._C._AutoDispatchBelowAutograd``), restored after, exception or not."""
    if _autograd_excluded(_AUTOGRAD_KEY):
        return fn(*args)
    _exclude_autograd(_AUTOGRAD_KEY, True)
    try:
        return fn(*args)
    finally:
        _exclude_autograd(_AUTOGRAD_KEY, False)


def _derivative(schema, setup_context: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """An op's declared derivative as both torch.library and autograd.Function take it.

    setup_context gets every argument of the schema (those a call left out as their defaults) and
    the backward a ``ctx.needs_input_grad`` entry for each. The backward is once differentiable
    (its ops run without building a graph: differentiating it again raises), and receives None
    for an output nothing used (a second output such as lora_linear_fwd's s usually is), never a
    tensor of zeros to multiply by; it is not called when no output got a gradient."""
    params = schema.arguments
    defaults = tuple(p.default_value if p.has_default_value() else None for p in params)
    n = len(params)

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        if len(inputs) < n:
            inputs = (*inputs, *defaults[len(inputs):])
        setup_context(ctx, inputs, output)

    def backward_grads(ctx, *grads):
        if grads[0] is None and all(g is None for g in grads):
            return (None,) * n
        if len(ctx.needs_input_grad) < n:
            ctx.needs_input_grad = (*ctx.needs_input_grad, *(False,) * (n - len(ctx.needs_input_grad)))
        return backward(ctx, *grads)

    once = once_differentiable(backward_grads)

    def backward_once(ctx, *grads):
        # Grad mode is on only for a backward that builds a graph (create_graph=True): then
        # once_differentiable's wrapper, whose results refuse a second backward.
        return once(ctx, *grads) if torch.is_grad_enabled() else backward_grads(ctx, *grads)

    return setup, backward_once


_OPS: dict[str, Op] = {}


def define(name: str, schema: str, *, check: Callable, fake: Callable, reference: Callable,
           choose: dict[str, Callable[..., Sequence[str] | None]] | None = None,
           prefer: dict[str, tuple[str, ...]] | None = None, triton: str | None = None,
           cpp: tuple[str, ...] = (), cpu_kernel: Callable | None = None, setup_context: Callable | None = None,
           backward: Callable | None = None) -> Op:
    """Declare op ``fastpeft::<name>``; see the module docstring.

    prefer: device type -> faces best first, where the op's order differs from
        :data:`DEFAULT_PREFERENCE`. choose: device type -> ``(device, *args) -> order or None``, for
        an order that depends on the shapes on that device; None falls back to the device's
        preference. Rules are per device type so that a device without one (LoRA on the CPU) pays
        nothing per call: a plan's call skips it (a rule's call costs about 0.5 us).
    setup_context, backward: the op's derivative, as ``torch.library.register_autograd`` takes it:
        ``setup_context(ctx, inputs, output)`` saves what the backward needs (inputs: every
        argument, defaults filled in), ``backward(ctx, *grads)`` returns one gradient (or None) per
        argument; a grad of an unused output arrives as None. Ops without one (the backward ops)
        are differentiated by the op that calls them.
    """
    if name in _OPS:
        raise RuntimeError(f"op {name} is already defined")
    op = _OPS[name] = Op(name, schema, check, fake, reference, choose or {}, prefer or {}, triton, cpp, cpu_kernel,
                         setup_context, backward)
    return op


def load_faces() -> None:
    """Load ``fastpeft._C`` (its kernels register themselves) and every op's Triton face.

    Run by ``import fastpeft`` once every op is declared, so that face selection later is plain
    Python over precomputed tables, which torch.compile traces without a graph break. Without
    triton the Triton faces stay unloaded (``backends.availability("triton")`` says why); with it,
    an error importing one of fastpeft's kernel modules is raised here."""
    backends.load_extension()
    with_triton = not backends.triton_missing()
    for op in _OPS.values():
        if with_triton:
            op._load_triton()
        op._load_device_faces()
    backends.warm_availability()


def get(name: str) -> Op:
    return _OPS[name]


def all_ops() -> dict[str, Op]:
    return dict(_OPS)


@contextlib.contextmanager
def record_faces() -> Iterator[list[tuple[str, str]]]:
    """Collect the ``(op name, face)`` of every op call made inside the block, in order: what
    ran, not what :meth:`Op.select` would pick (tests prove which face ran with it)."""
    global _taken
    previous, _taken = _taken, []
    try:
        yield _taken
    finally:
        _taken = previous


# ---------------------------------------------------------------- checks shared by the ops' checkers

def unit_stride_rows(t: torch.Tensor) -> bool:
    """Whether the kernels can read `t`'s rows as they lie: its last dimension is unit-stride, or has
    one element, or `t` has none (an empty gradient that autograd expanded has stride 0 everywhere)."""
    return t.stride(-1) == 1 or t.shape[-1] == 1 or t.numel() == 0


def check_tensors(op: str, named: Sequence[tuple[str, torch.Tensor | None]], optional: Sequence[str] = (),
                  hint: str = "") -> None:
    """The checks every op makes of its floating tensors, with messages naming the culprit.

    named: ``(name, value)`` pairs; the first is the lead, whose dtype (one of
    :data:`SUPPORTED_DTYPES`) and device every other tensor must share. Names in `optional` may be
    None. hint: appended to a dtype mismatch's message (how to fix it, where the op knows).

    Plain comparisons (about 3 µs) rather than ``torch._check`` with message closures (about 30 µs):
    this runs on every eager call, and the fake kernel runs it under torch.compile.
    """
    for name, t in named:
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    lead_name, lead = named[0]
    if lead.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {lead_name} has dtype {lead.dtype}; supported dtypes are float32, float16 and "
                        "bfloat16")
    for name, t in named[1:]:
        if t is None:
            continue
        if t.dtype != lead.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {lead_name} has {lead.dtype}; all tensors must "
                            f"share one dtype{hint}")
        if t.device != lead.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {lead_name} is on {lead.device}; all tensors must "
                             "be on one device")


def check_rows_contiguous(op: str, *named: tuple[str, torch.Tensor | None]) -> None:
    """Each given tensor (None skipped) must be readable row by row as it lies (:func:`unit_stride_rows`)."""
    for name, t in named:
        if t is not None and not unit_stride_rows(t):
            raise ValueError(f"{op}: {name} must be contiguous in its last dimension; got strides "
                             f"{list(t.stride())} (call .contiguous())")
