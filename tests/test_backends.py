"""Backend selection: automatic choice, forcing, and clear errors when a face cannot run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastpeft
from fastpeft import backends
from fastpeft.ops.lora_linear import lora_linear_fwd

from conftest import HAS_GPU


def inputs():
    return torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0, None


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with fastpeft.use_backend("cudnn"):
            pass


def test_triton_without_gpu_or_interpreter_says_why():
    avail = backends.check_availability("triton", None, interpreting=False, gpu=False)
    assert not avail.usable and avail.reason == "triton: no GPU and TRITON_INTERPRET is not set"
    on_cpu = backends.check_availability("triton", "cpu", interpreting=False, gpu=True)
    assert not on_cpu.usable and "tensors are on the CPU and TRITON_INTERPRET is not set" in on_cpu.reason
    assert backends.check_availability("triton", "cpu", interpreting=True, gpu=False).usable


def test_cuda_without_gpu_says_why():
    if HAS_GPU and backends.availability("cuda").usable:
        pytest.skip("cuda is usable here")
    with pytest.raises(fastpeft.BackendUnavailable, match="cuda: "):
        with fastpeft.use_backend("cuda"):
            pass


def test_forced_face_must_match_the_tensors_device():
    if not backends.availability("cuda").usable:
        pytest.skip("needs the CUDA face to be usable")
    with fastpeft.use_backend("cuda"), pytest.raises(fastpeft.BackendUnavailable, match="tensors are on cpu"):
        lora_linear_fwd(*inputs())


def test_automatic_choice_on_cpu():
    expected = "cpu" if backends.extension() is not None else "torch"
    assert lora_linear_fwd.select(torch.device("cpu"), *inputs()) == expected


def test_use_backend_restores_previous_choice():
    with fastpeft.use_backend("torch"):
        assert backends.forced_backend() == "torch"
        with fastpeft.use_backend(None):
            assert backends.forced_backend() is None
        assert backends.forced_backend() == "torch"
    assert backends.forced_backend() is None


def test_extension_is_built_when_required():
    """CI sets FASTPEFT_REQUIRE_EXTENSION=1 so a broken build cannot hide behind skipped C++ tests."""
    if os.environ.get("FASTPEFT_REQUIRE_EXTENSION") != "1":
        pytest.skip("FASTPEFT_REQUIRE_EXTENSION is not set")
    assert backends.extension() is not None, backends.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastpeft::lora_linear_fwd", "CPU")
    if os.environ.get("FASTPEFT_REQUIRE_CUDA_BUILD") == "1":
        assert backends.extension().built_with_cuda()


REPO = Path(__file__).resolve().parents[1]


def run_python(code, cwd=None, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=300, cwd=cwd)


def test_env_var_forces_backend():
    out = run_python("import fastpeft; print(fastpeft.backends.forced_backend())", FASTPEFT_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_env_var_with_bad_name_is_refused():
    out = run_python("import fastpeft", FASTPEFT_BACKEND="fastest")
    assert out.returncode != 0
    assert "FASTPEFT_BACKEND='fastest' is not a backend" in out.stderr


def test_package_works_without_extension_and_without_triton():
    """Block fastpeft._C and triton from importing: the reference serves, and info says what is missing."""
    out = run_python("""
        import sys
        sys.modules["fastpeft._C"] = None   # None in sys.modules: "import" raises ImportError,
        sys.modules["triton"] = None        # and find_spec answers "not installed"
        import torch, fastpeft
        from fastpeft.ops import lora_linear
        from fastpeft.ops.lora_linear import lora_linear_fwd_reference
        x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
        y = lora_linear(x, w, None, a, b, 0.5)
        torch.testing.assert_close(y, lora_linear_fwd_reference(x, w, None, a, b, 0.5)[0])
        print(fastpeft.backends.availability("cpu").reason)
        print(fastpeft.backends.availability("triton").reason)
        try:
            with fastpeft.use_backend("triton"):
                pass
        except fastpeft.BackendUnavailable as e:
            print("refused:", e)
        from fastpeft import cli
        cli.main(["info"])
    """, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert "fastpeft._C did not load" in out.stdout and "pip install --no-build-isolation -e ." in out.stdout
    assert "triton is not installed" in out.stdout
    assert "refused: triton: triton is not installed" in out.stdout


def test_the_repo_root_shadows_no_other_package():
    """From the repository root (on sys.path for `python -c` and `python -m`), nothing of ours may
    answer to a top-level name another package owns. bitsandbytes imports Hugging Face's `kernels`
    (`from kernels import get_kernel`); the Triton kernels' folder at the root, kernels/, answered
    it (any folder there is importable by its name, with or without an __init__.py)."""
    out = run_python("""
        import importlib.util
        spec = importlib.util.find_spec("kernels")
        if spec is not None:
            print("kernels ->", spec.origin, list(spec.submodule_search_locations or ()))
        import fastpeft.kernels
        print("fastpeft.kernels ->", fastpeft.kernels.__file__)
        try:
            import bitsandbytes  # noqa: F401  (warns through logging, to stderr, if `kernels` misleads it)
        except ImportError:
            pass
    """, cwd=REPO)
    assert out.returncode == 0, out.stderr
    shadowed = [line for line in out.stdout.splitlines() if line.startswith("kernels ->") and str(REPO) in line]
    assert not shadowed, f"run from {REPO}, `import kernels` finds our folder: {shadowed}"
    assert f"fastpeft.kernels -> {REPO / 'fastpeft' / 'kernels' / '__init__.py'}" in out.stdout
    assert "cannot import name 'get_kernel' from 'kernels'" not in out.stderr, out.stderr
