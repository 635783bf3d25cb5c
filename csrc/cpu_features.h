// What the CPU kernels chose at run time, reported by `fastpeft info` through fastpeft._C.
#pragma once

#include <string>

namespace fastpeft {
// "avx2" when the CPU has AVX2 and FMA (and FASTPEFT_CPU_ISA is not "portable"), else "portable".
std::string nf4_gemv_isa();
}  // namespace fastpeft
