// fastpeft._C.HeldCall: a layer's inference call on its op plan, guard and all, in one C++ call
// (see held_call.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fastpeft {

// A kernel with every argument after x bound, converted from Python once (fastpeft._C.cpu_kernels
// .bind_<op>): what a HeldCall runs in place of a Python call of the kernel, without converting
// its arguments again at every call.
class BoundKernel {
 public:
  virtual ~BoundKernel() = default;
  // The kernel's outputs for x: its tensor, or each of its tuple's.
  virtual std::vector<at::Tensor> run(const at::Tensor& x) = 0;
  // How many times run() was called (tests prove with it which face ran).
  int64_t runs = 0;
};

// Registers HeldCall and BoundKernel; before any function that returns a BoundKernel.
void def_held_call(pybind11::module_& m);

}  // namespace fastpeft
