"""Build fastpeft and its C++/CUDA extension ``fastpeft._C``.

* ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` are always built (OpenMP).
* ``csrc/cuda/*.cu`` are built when torch has CUDA and nvcc is found (``CUDA_HOME``), for the
  architectures in ``FASTPEFT_CUDA_ARCH`` (default ``8.0;9.0``). ``FASTPEFT_NO_CUDA=1`` skips them.
* ``FASTPEFT_NO_EXTENSION=1`` installs the pure-Python package only (the reference faces serve).
* ``fastpeft/kernels/`` holds the Triton kernels, one file per op. They live inside the package
  (not in a top-level ``kernels/``) so that running Python from the repository root cannot shadow
  Hugging Face's ``kernels`` package, which bitsandbytes imports.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels torch's CUDA build depends on (cuSPARSE, cuBLAS...).

    ATen's CUDA headers include them, and a bare toolkit (nvcc only) may lack them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")))


def _extensions():
    if _flag("FASTPEFT_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs (C++20 from 2.10)
    nvcc = ["-O3", "-lineinfo"]
    macros = []
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("FASTPEFT_NO_CUDA"))
    if with_cuda:
        archs = os.environ.get("FASTPEFT_CUDA_ARCH", DEFAULT_CUDA_ARCHS)
        # torch reads TORCH_CUDA_ARCH_LIST to pick -gencode flags; without a GPU it cannot guess.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros += [("FASTPEFT_WITH_CUDA", None), ("FASTPEFT_CUDA_ARCHS", f'"{archs}"')]
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    ext = ext_cls(
        name="fastpeft._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")] + (_nvidia_wheel_includes() if with_cuda else []),
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=["fastpeft", "fastpeft.ops", "fastpeft.nn", "fastpeft.quant", "fastpeft.methods", "fastpeft.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
