// fastpeft._C.HeldCall: a layer's inference call on its op plan, guard and all, in one C++ call
// (see held_call.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fastpeft {

// A kernel with its arguments after x bound (fastpeft._C.cpu_kernels.bind_<op>(*rest)): what a
// HeldCall runs in place of a Python call of the kernel. Its numbers are converted once; its
// tensors are read from their Python objects in `rest` at every run, and no C++ reference to them
// is kept (torch.utils.swap_tensors, which module conversions use under
// torch.__future__.set_swap_module_params_on_conversion, refuses a tensor referenced from C++).
class BoundKernel {
 public:
  virtual ~BoundKernel() = default;
  // The kernel's outputs for x and `rest`, the tuple it was bound with: its tensor, or each of its
  // tuple's. Called with the GIL held; releases it around a long kernel.
  virtual std::vector<at::Tensor> run(const at::Tensor& x, PyObject* rest) = 0;
  // How many times run() was called: the tests' proof of which face ran, at the cost of an add.
  int64_t runs = 0;
};

// Registers HeldCall and BoundKernel; before any function that returns a BoundKernel.
void def_held_call(pybind11::module_& m);

}  // namespace fastpeft
