// fastpeft._C.HeldCall: a layer's inference call on its op plan, guard and all, in one C++ call
// (see held_call.cpp).
#pragma once

#include <torch/extension.h>

namespace fastpeft {

void def_held_call(pybind11::module_& m);

}  // namespace fastpeft
