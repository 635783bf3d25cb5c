// The Python module fastpeft._C. Its ops are not pybind functions: each op's schema is declared
// once in fastpeft/ops/ (torch.library), and csrc/{cpu,cuda}/<op>.* register their kernels for it
// with TORCH_LIBRARY_IMPL, so they run as torch.ops.fastpeft.<op>. This file only reports how the
// extension was built, for `fastpeft info`.
#include <torch/extension.h>

#include <string>

#include "cpu_features.h"

namespace {

bool built_with_cuda() {
#ifdef FASTPEFT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#ifdef FASTPEFT_CUDA_ARCHS
  return FASTPEFT_CUDA_ARCHS;
#else
  return "";
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft C++/CUDA kernels (registered as torch.ops.fastpeft.*)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "The CUDA architectures compiled for, e.g. '8.0;9.0'");
  m.def("nf4_gemv_isa", &fastpeft::nf4_gemv_isa, "The instruction set nf4_matmul's CPU GEMV uses here");
  m.def("built_with_openmp", &built_with_openmp, "True if the CPU kernels use OpenMP");
}
