"""Compile, without a GPU, what the JIT compiles at run time.

Triton specialises every launch on its arguments (triton 3.8, ``runtime/jit.py`` and
``native_specialize_impl``): an integer equal to 1 becomes the constant 1 (a unit stride, M = 1),
an integer divisible by 16 and a pointer aligned to 16 bytes carry ``tt.divisibility = 16`` (the
``"D"`` of the specialisation, ``attrs`` of ``ASTSource``); integers ≥ 2³¹ are ``i64``. Those facts
decide vectorised loads and how much shared memory the pipeliner takes, so a signature of plain
``i32`` compiles a variant that never runs.

:func:`record_launches` runs the launchers themselves on CPU tensors, with ``wrap_triton``
replaced by a recorder: every launch is kept with its real arguments (shapes, strides, pointers)
and nothing runs. :func:`jit_spec` turns a launch into what Triton's own binder makes of it, and
:func:`compile_spec` compiles that for an architecture, exactly as the JIT would.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Iterator

from ._common import (SM_COUNT, SMEM_PER_BLOCK_OPTIN, set_arch_override, set_sm_count_override,
                      set_smem_limit_override, take_short_grid_note)



@dataclass
class Launch:
    """One kernel launch as the launcher made it: the JITFunction, its grid, arguments and options."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)
    short_grid_reason: str | None = None   # why the grid is below one wave, as the launcher noted it
    variant: str = ""   # the static model's label of a launch from a plan the launcher did not choose

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass(frozen=True)
class Spec:
    """A launch as Triton's binder specialises it: picklable, hashable (the JIT's cache key)."""

    module: str        # fastpeft.kernels.<op>
    kernel: str        # the @triton.jit function's name in it
    signature: tuple   # ((param, type), ...), type "constexpr" for constants
    constexprs: tuple  # ((param, value), ...): the constexpr parameters and the integers equal to 1
    attrs: tuple       # ((param, "D"), ...): divisible by 16 / aligned to 16 bytes
    options: tuple     # ((name, value), ...): num_warps, num_stages

    def constant(self, name: str):
        return dict(self.constexprs).get(name)


def _kernel_modules():
    from . import __path__ as kernels_path
    for info in pkgutil.iter_modules(kernels_path):
        if info.name != "aot":
            yield importlib.import_module(f"{__package__}.{info.name}")


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside, every fastpeft Triton launcher records its launches instead of running them.

    Only the launch is replaced: the launcher's own code (tile choice, output allocation, strides,
    views) runs as on a GPU, on whatever tensors it is given (CPU tensors here; outputs stay
    uninitialised). The module-level ``wrap_triton`` of each kernel module is swapped for the
    duration and put back after."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(Launch(self.kernel, tuple(grid) if not callable(grid) else grid, args, kwargs,
                                       take_short_grid_note()))
            return launch

    take_short_grid_note()  # a note left by a launch made outside the recording is not this one's
    patched = [(m, m.wrap_triton) for m in _kernel_modules() if hasattr(m, "wrap_triton")]
    for module, _ in patched:
        module.wrap_triton = Recorder
    try:
        yield launches
    finally:
        for module, original in patched:
            module.wrap_triton = original


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Launchers inside choose their tiles for sm_`arch`'s shared memory per block, their grids
    for its SM count and their cost rules for its roofline, whatever device their tensors are on."""
    set_smem_limit_override(SMEM_PER_BLOCK_OPTIN[arch])
    set_sm_count_override(SM_COUNT.get(arch))
    set_arch_override(arch)
    try:
        yield
    finally:
        set_smem_limit_override(None)
        set_sm_count_override(None)
        set_arch_override(None)


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, 32))


def jit_spec(launch: Launch, arch: int = 90) -> Spec:
    """What the JIT compiles for this launch: Triton's binder (``create_function_from_signature``)
    and argument packing (``JITFunction._pack_args``), the code ``JITFunction.run`` runs."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = _backend(arch)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound_args,
                                                              specialization, options)
    names = kernel.arg_names
    flat_constexprs = tuple((names[path[0]], value) for path, value in constexprs.items() if len(path) == 1)
    flat_attrs = tuple((names[path[0]], "D") for path, value in attrs.items()
                       if len(path) == 1 and ["tt.divisibility", 16] in value)
    opts = tuple((k, launch.kwargs[k]) for k in ("num_warps", "num_stages", "num_ctas") if k in launch.kwargs)
    return Spec(kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()), flat_constexprs, flat_attrs,
                opts)


def spec_from_signature(kernel, signature: dict, constexprs: dict, options: dict) -> Spec:
    """A Spec from an old-style ``aot_configs()`` entry (every integer a plain ``i32``, no alignment):
    compiled as given, which is not what the JIT compiles."""
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    ordered = tuple((name, full[name]) for name in kernel.arg_names if name in full)
    return Spec(kernel.fn.__module__, kernel.fn.__name__, ordered, tuple(constexprs.items()), (),
                tuple(options.items()))


def compile_spec(spec: Spec, arch: int):
    """Compile a Spec for sm_`arch` (no GPU needed); returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.module), spec.kernel)
    names = kernel.arg_names
    constexprs = {(names.index(k),): v for k, v in spec.constexprs}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, _ in spec.attrs}
    src = ASTSource(fn=kernel, signature=dict(spec.signature), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def describe(spec: Spec) -> str:
    """One line: the kernel, its block constants and options, and which integers are specialised."""
    blocks = {k: v for k, v in spec.constexprs if k.isupper()}
    ones = [k for k, v in spec.constexprs if not k.isupper() and v == 1]
    opts = ",".join(f"{k}={v}" for k, v in spec.options)
    return (f"{spec.kernel} {blocks} {opts}" + (f" =1: {','.join(ones)}" if ones else ""))
