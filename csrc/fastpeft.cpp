// The Python module fastpeft._C. Its ops are not pybind functions: each op's schema is declared
// once in fastpeft/ops/ (torch.library), and csrc/{cpu,cuda}/<op>.* register their kernels for it
// with TORCH_LIBRARY_IMPL, so they run as torch.ops.fastpeft.<op>. This file reports how the
// extension was built, for `fastpeft info`, and gives the CPU kernels of the ops that layers run
// on op plans as plain functions (fastpeft._C.cpu_kernels), for the plans alone.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cpu_features.h"
#include "dense_linear.h"
#include "held_call.h"
#include "lora_linear.h"
#include "nf4_matmul.h"

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

// The outputs of a kernel as a list: its tensor, or each of its tuple's.
std::vector<at::Tensor> outputs(at::Tensor y) { return {std::move(y)}; }
template <typename... T>
std::vector<at::Tensor> outputs(std::tuple<T...> ys) {
  return std::apply([](auto&... y) { return std::vector<at::Tensor>{std::move(y)...}; }, ys);
}

// How a BoundCpuKernel holds one argument after x: a number converted once...
template <typename T>
struct BoundArg {
  using Value = std::decay_t<T>;
  static_assert(std::is_arithmetic_v<Value>, "a bound kernel takes tensors, optional tensors and numbers");
  using Stored = Value;
  static Stored bind(pybind11::handle object) { return object.cast<Value>(); }
  static const Value& at_run(const Stored& stored, PyObject*) { return stored; }
};

// ...a tensor read from its Python object at each run (no C++ reference kept between runs)...
template <>
struct BoundArg<const at::Tensor&> {
  struct Stored {};
  static Stored bind(pybind11::handle object) {
    if (!THPVariable_Check(object.ptr()))
      throw pybind11::type_error("a bound kernel's tensor argument is not a tensor");
    return {};
  }
  static const at::Tensor& at_run(const Stored&, PyObject* object) { return THPVariable_Unpack(object); }
};

// ...and an optional tensor likewise.
template <>
struct BoundArg<const std::optional<at::Tensor>&> {
  struct Stored {};
  static Stored bind(pybind11::handle object) {
    if (!object.is_none()) BoundArg<const at::Tensor&>::bind(object);
    return {};
  }
  static std::optional<at::Tensor> at_run(const Stored&, PyObject* object) {
    if (object == Py_None) return std::nullopt;
    return THPVariable_Unpack(object);
  }
};

// The bytes of a kernel's tensor arguments (0 for its numbers).
template <typename T>
int64_t tensor_bytes(const T&) {
  return 0;
}
int64_t tensor_bytes(const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }
int64_t tensor_bytes(const std::optional<at::Tensor>& t) { return t ? tensor_bytes(*t) : 0; }

// A kernel's work, about: the bytes of its other tensors (the weights) read once per row of x, and x.
// Of a GEMV, what it streams; of a GEMM over many rows, its multiply-adds up to a constant.
template <typename... Rest>
int64_t kernel_work(const at::Tensor& x, const Rest&... rest) {
  const int64_t rows = x.dim() >= 1 ? std::max<int64_t>(x.size(0), 1) : 1;
  return rows * (tensor_bytes(rest) + ... + 0) + tensor_bytes(x);
}

// The GIL released while a kernel runs where its work (kernel_work) is 4 MiB or more (a GEMV that
// streams 4 MiB takes about 0.2 ms here, 4 % of the interpreter's 5 ms switch interval), held
// through shorter ones: releasing and taking it back costs more than such a kernel gives another
// Python thread. SmolLM2-135M's NF4 greedy generation (210 kernels a token, each under 0.5 MB at one
// row) with the GIL held and released in alternating rounds in one process, AMD EPYC Zen 4 capped
// at AVX2, one thread, 32 tokens: medians 19.98 against 20.25 and 20.15 against 20.30 ms a token
// (14 and 16 rounds).
class GilReleasedForLongKernels {
 public:
  explicit GilReleasedForLongKernels(int64_t work) {
    if (work >= kWork) released_.emplace();
  }

 private:
  static constexpr int64_t kWork = int64_t{4} << 20;
  std::optional<pybind11::gil_scoped_release> released_;
};

// kernel(x, args...) recorded for torch.profiler under `name`, the op's (the inputs are built only
// while a profiler that records them is active), the GIL released if the kernel is long.
template <typename Kernel, typename... Args>
auto profiled_call(const std::string& name, Kernel kernel, const at::Tensor& x, const Args&... args) {
  const GilReleasedForLongKernels gil(kernel_work(x, args...));
  RECORD_FUNCTION(name, (std::vector<c10::IValue>{c10::IValue(x), c10::IValue(args)...}));
  return kernel(x, args...);
}

// kernel(x, *rest), rest as BoundArg holds it, as a profiled call.
template <typename Result, typename X, typename... Rest>
class BoundCpuKernel final : public fastpeft::BoundKernel {
 public:
  BoundCpuKernel(Result (*kernel)(X, Rest...), std::string name, const pybind11::tuple& rest)
      : BoundCpuKernel(kernel, std::move(name), rest, std::index_sequence_for<Rest...>{}) {}

  std::vector<at::Tensor> run(const at::Tensor& x, PyObject* rest) override {
    ++runs;
    return run(x, rest, std::index_sequence_for<Rest...>{});
  }

 private:
  template <size_t... I>
  BoundCpuKernel(Result (*kernel)(X, Rest...), std::string name, const pybind11::tuple& rest, std::index_sequence<I...>)
      : kernel_(kernel), name_(std::move(name)), stored_{BoundArg<Rest>::bind(rest[I])...} {
    if (rest.size() != sizeof...(Rest))
      throw pybind11::type_error(name_ + ": a bound kernel takes every argument after x");
  }

  template <size_t... I>
  std::vector<at::Tensor> run(const at::Tensor& x, PyObject* rest, std::index_sequence<I...>) {
    // every argument read while the GIL is held, then the kernel (without it, if long)
    const std::tuple<decltype(BoundArg<Rest>::at_run(std::get<I>(stored_), nullptr))...> args{
        BoundArg<Rest>::at_run(std::get<I>(stored_), PyTuple_GET_ITEM(rest, I))...};
    return outputs(profiled_call(name_, kernel_, x, std::get<I>(args)...));
  }

  Result (*kernel_)(X, Rest...);
  std::string name_;
  std::tuple<typename BoundArg<Rest>::Stored...> stored_;
};

// A CPU kernel as a Python function of the op's arguments, for an op plan's calls
// (fastpeft/ops/_registry.py, Plan), and bind_<op>(*rest), the same with every argument after x
// bound once, for a layer's held call (csrc/held_call.cpp). The plan has checked every argument
// and chosen this face, and nothing needs autograd, so the dispatcher's work is done: its boxed
// redispatch to the same kernel took 5.0 us a call on a 64x64 NF4 layer at M = 1, this call 3.7
// (AMD EPYC Zen 4, one thread). The call shows in torch.profiler under the op's name, as a
// dispatcher call does (a redispatch records nothing), and releases the GIL as the redispatch did
// where the kernel is long (GilReleasedForLongKernels).
template <typename Result, typename X, typename... Rest>
void def_cpu_kernel(pybind11::module_& m, const char* op, Result (*kernel)(X, Rest...)) {
  const std::string name = std::string("fastpeft::") + op;
  m.def(op, [kernel, name](X x, Rest... rest) { return profiled_call(name, kernel, x, rest...); });
  m.def((std::string("bind_") + op).c_str(), [kernel, name](const pybind11::args& rest) {
    return std::shared_ptr<fastpeft::BoundKernel>(new BoundCpuKernel<Result, X, Rest...>(kernel, name, rest));
  });
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
  m.def("nf4_cpu_last_levels", &fastpeft::nf4_cpu_last_levels,
        "The levels this thread's last nf4_matmul CPU call decoded into on gemv-avx2: int16, bf16 or fp32 "
        "('' after another path)");
  m.def("dense_cpu_path", &fastpeft::dense_cpu_path, "The dense_linear CPU path of an [M, K] x", pybind11::arg("M"),
        pybind11::arg("dtype"));
  m.def("dense_cpu_last_path", &fastpeft::dense_cpu_last_path,
        "The path this thread's last dense_linear CPU call took");
  m.def("built_with_openmp", &built_with_openmp, "True if the CPU kernels use OpenMP");
  fastpeft::def_held_call(m);
  auto cpu_kernels = m.def_submodule("cpu_kernels", "CPU kernels of ops run on op plans, by op name");
  def_cpu_kernel(cpu_kernels, "nf4_matmul", &fastpeft::nf4_matmul_cpu);
  def_cpu_kernel(cpu_kernels, "lora_linear_fwd", &fastpeft::lora_linear_fwd_cpu);
}
