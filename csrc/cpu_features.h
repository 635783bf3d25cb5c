// What the CPU offers the C++ CPU kernels, the instruction-set level they run at, and which NF4
// path a shape takes: chosen at run time, reported by `fastpeft info` through fastpeft._C.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace fastpeft {

// Levels of the CPU kernels, each a superset of the one below. kAvx2: AVX2, FMA and F16C (Haswell,
// Zen 1 and later). kAvx512: AVX-512 F, BW, VL and DQ
// (Skylake-SP and later, Zen 4). kAvx512Bf16: also AVX512_BF16 (bf16 dot products: Cooper Lake,
// Sapphire Rapids, Zen 4), where bf16 matmuls are 4-5x fp32 ones.
enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

const char* cpu_isa_name(CpuIsa isa);

// Every feature `fastpeft info` lists, from CPUID and what the OS enabled (XGETBV): name -> present.
std::map<std::string, bool> cpu_features();

// The highest level this CPU and OS support.
CpuIsa cpu_isa_supported();

// The level the kernels use: the supported one, capped by FASTPEFT_CPU_ISA (portable, avx2, avx512,
// avx512_bf16) when set, so a lower path can be forced and tested on a higher machine. An unknown
// value is an error naming the allowed ones.
CpuIsa cpu_isa();

// The NF4 CPU path nf4_matmul takes for an [M, K] x (dtype: "float32", "float16", "bfloat16" or
// "float64"), a power-of-two blocksize, forward or transposed, at the current cpu_isa().
std::string nf4_cpu_path(int64_t M, int64_t K, int64_t blocksize, const std::string& dtype, bool transposed);

// The path the last nf4_matmul CPU call of this thread took ("" before any).
std::string nf4_cpu_last_path();

// The levels the last nf4_matmul CPU call of this thread decoded into on gemv-avx2 ("int16", "bf16"
// or "fp32"; "" after another path).
std::string nf4_cpu_last_levels();

}  // namespace fastpeft
