"""Backend selection: automatic choice, forcing, and clear errors when a face cannot run."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastpeft
from fastpeft import backends
from fastpeft.ops import all_ops, record_faces
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


# ---------------------------------------------------------------- the registry's faces

def _stem(op):
    """The file stem an op is declared in (fastpeft/ops/<stem>.py), which names its faces' files too."""
    return op.reference.__module__.rpartition(".")[2]


def _registered_in(folder, suffix):
    """Op name -> file, for every ``m.impl("<op>", ...)`` in the C++ sources of csrc/<folder>/."""
    found = {}
    for path in (REPO / "csrc" / folder).glob(f"*{suffix}"):
        for name in re.findall(r'm\.impl\("(\w+)"', path.read_text()):
            found[name] = path.name
    return found


def test_faces_are_declared_as_the_sources_have_them():
    """What an op declares (fastpeft/ops/<stem>.py) is what the tree holds: a Triton launcher named
    like the op in fastpeft/kernels/<stem>.py, a C++ kernel in csrc/cpu or csrc/cuda per device."""
    cpu_kernels, cuda_kernels = _registered_in("cpu", ".cpp"), _registered_in("cuda", ".cu")
    for name, op in all_ops().items():
        stem = _stem(op)
        assert op.triton_module == stem
        assert re.search(rf"^def {name}\(", (REPO / "fastpeft" / "kernels" / f"{stem}.py").read_text(), re.M), name
        assert ("cpu" in op.cpp_faces) == (name in cpu_kernels), name
        assert ("cuda" in op.cpp_faces) == (name in cuda_kernels), name
        for kernels in (cpu_kernels, cuda_kernels):
            assert kernels.get(name, stem).startswith(stem), f"{name}'s kernel is in {kernels[name]}, not {stem}.*"
        assert ("cuda" in op.faces("cuda")) == (name in cuda_kernels), f"{name}: faces() lists a CUDA face it lacks"


def test_without_a_cuda_source_no_cuda_face_is_listed_or_forced():
    for name in ("sgmv_shrink", "sgmv_expand", "adapter_block_fwd", "adapter_block_bwd", "phm_linear_fwd",
                 "phm_linear_bwd"):
        op = all_ops()[name]
        assert op.faces("cuda") == ["torch", "triton"], name
        assert op.missing_face("cuda", "cuda") == "it has no cuda kernel"


def test_the_extension_registers_every_declared_cpu_kernel():
    """A built extension that lacks a kernel its op declares (stale, or a source left out of the
    build) is a missing piece: automatic selection would quietly pass over it."""
    if backends.extension() is None:
        pytest.skip(f"not built here: {backends.extension_error()}")
    for name, op in all_ops().items():
        if "cpu" in op.device_faces:
            assert op.has_face("cpu", "cpu"), f"{name}: {op.missing_face('cpu', 'cpu')}"
    if backends.extension().built_with_cuda():
        for name, op in all_ops().items():
            if "cuda" in op.cpp_faces:
                assert op.has_face("cuda", "cuda"), f"{name}: {op.missing_face('cuda', 'cuda')}"


def test_every_triton_face_is_loaded_when_triton_is_installed():
    if backends.triton_missing():
        pytest.skip(backends.triton_missing())
    assert [name for name, op in all_ops().items() if not op.has_face("triton", "cpu")] == []


@pytest.mark.parametrize("source,error", [("def sgmv_shrink(:\n", "SyntaxError"),
                                          ("from ._common import no_such_helper\n", "ImportError")])
def test_a_broken_kernel_module_fails_loudly(tmp_path, source, error):
    """Triton installed, one of our kernel modules broken: `import fastpeft` (hence the tests and
    `fastpeft info`) fails naming it, instead of automatic selection quietly dropping the face."""
    broken = tmp_path / "sgmv.py"
    broken.write_text(source)
    out = run_python(f"""
        import importlib.util, sys

        class BrokenSgmv:  # serves fastpeft.kernels.sgmv from {str(broken)!r}
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "fastpeft.kernels.sgmv":
                    return importlib.util.spec_from_file_location(name, {str(broken)!r})

        sys.meta_path.insert(0, BrokenSgmv)
        import fastpeft
    """, TRITON_INTERPRET="1")
    assert out.returncode != 0
    assert error in out.stderr and str(broken) in out.stderr, out.stderr


def test_record_faces_tells_which_face_ran():
    x = inputs()
    with fastpeft.use_backend("torch"), record_faces() as taken:
        lora_linear_fwd(*x)
    assert taken == [("lora_linear_fwd", "torch")]
    with record_faces() as taken:
        lora_linear_fwd(*x)
    assert taken == [("lora_linear_fwd", lora_linear_fwd.select(torch.device("cpu"), *x))]
    lora_linear_fwd(*x)
    assert taken == [("lora_linear_fwd", lora_linear_fwd.select(torch.device("cpu"), *x))]  # outside: not recorded


def test_an_interpreted_triton_face_refuses_outputs_that_alias():
    """Under the interpreter a Triton launcher is called directly, not through its triton_op, whose
    check (no output aliasing an input or another output) refused phm_linear's backward on an H200:
    the registry runs the same check around the direct call, so the CPU suite fails first."""
    from fastpeft.ops._registry import refusing_aliases

    x = torch.randn(3, 4)
    empty = x.new_empty(0)
    for bad in (lambda x: (x * 2, empty, empty), lambda x: x, lambda x: (x.view(12), x * 2)):
        with pytest.raises(RuntimeError, match="fastpeft::demo_triton: an output aliases"):
            refusing_aliases("fastpeft::demo", bad)(x)
    y, a, b = refusing_aliases("fastpeft::demo", lambda x: (x * 2, x.new_empty(0), x.new_empty(0)))(x)
    assert torch.equal(y, x * 2)


def test_gpu_face_orders_follow_the_h200_measurements(monkeypatch):
    """On a GPU with every face usable (asked without one): NF4 takes its CUDA face at one row and
    at many, LoRA's backward its CUDA face, LoRA's forward its CUDA GEMV up to 16 rows (the H200's
    figures in fastpeft/ops/nf4_matmul.py and lora_linear.py)."""
    from types import SimpleNamespace

    from fastpeft.ops._registry import Op

    monkeypatch.setattr(backends, "availability", lambda name, device: SimpleNamespace(usable=True, reason=""))
    monkeypatch.setattr(Op, "has_face", lambda self, backend, device_type: True)
    monkeypatch.setattr(backends, "forced_backend", lambda: None)
    cuda, ops = torch.device("cuda"), all_ops()

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)
    packed = meta(4096 * 1024 // 2, 1, dtype=torch.uint8)
    for M in (1, 8, 512):
        args = (meta(M, 4096), packed, meta(4096 * 1024 // 64, dtype=torch.float32), meta(16, dtype=torch.float32),
                64, 1024)
        assert ops["nf4_matmul"].select(cuda, *args) == "cuda", M
    w, a, b = meta(1024, 4096), meta(16, 4096), meta(1024, 16)
    assert ops["lora_linear_bwd"].select(cuda, meta(64, 1024), meta(64, 4096), w, a, b, meta(64, 16), 2.0) == "cuda"
    for M in (1, 16):
        assert ops["lora_linear_fwd"].select(cuda, meta(M, 4096), w, None, a, b, 2.0, None) == "cuda", M
