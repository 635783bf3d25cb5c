// The Python module fastpeft._C. Its ops are not pybind functions: each op's schema is declared
// once in fastpeft/ops/ (torch.library), and csrc/{cpu,cuda}/<op>.* register their kernels for it
// with TORCH_LIBRARY_IMPL, so they run as torch.ops.fastpeft.<op>. This file only reports how the
// extension was built, for `fastpeft info`.
#include <torch/extension.h>

#include <pybind11/stl.h>

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
  m.def("cpu_features", &fastpeft::cpu_features, "CPU features the C++ kernels look for: name -> present");
  m.def("cpu_isa_supported", [] { return std::string(fastpeft::cpu_isa_name(fastpeft::cpu_isa_supported())); },
        "The highest instruction-set level of the CPU kernels this CPU supports");
  m.def("cpu_isa", [] { return std::string(fastpeft::cpu_isa_name(fastpeft::cpu_isa())); },
        "The level the CPU kernels use: the supported one, capped by FASTPEFT_CPU_ISA");
  m.def("nf4_cpu_path", &fastpeft::nf4_cpu_path, "The NF4 CPU path of a shape", pybind11::arg("M"), pybind11::arg("K"),
        pybind11::arg("blocksize"), pybind11::arg("dtype"), pybind11::arg("transposed") = false);
  m.def("nf4_cpu_last_path", &fastpeft::nf4_cpu_last_path, "The path this thread's last nf4_matmul CPU call took");
  m.def("built_with_openmp", &built_with_openmp, "True if the CPU kernels use OpenMP");
}
