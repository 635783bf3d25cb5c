// Device helpers shared by the CUDA kernels of fastpeft.
#pragma once

#include <cstdint>

namespace fastpeft {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Dot product of two rows of length K, split over the lanes of one warp, fp32 partial sums (not
// yet reduced across lanes). kVec elements per 16-byte load when both rows are 16-byte aligned.
template <typename T, int kVec>
__device__ __forceinline__ float lane_dot(const T* __restrict__ a, const T* __restrict__ b, int K, int lane) {
  float acc = 0.f;
  const int k_vec_end = (K / kVec) * kVec;
  for (int k = lane * kVec; k < k_vec_end; k += kWarpSize * kVec) {
    alignas(16) T av[kVec];
    alignas(16) T bv[kVec];
    if constexpr (kVec > 1) {
      *reinterpret_cast<uint4*>(av) = __ldg(reinterpret_cast<const uint4*>(a + k));
      *reinterpret_cast<uint4*>(bv) = __ldg(reinterpret_cast<const uint4*>(b + k));
    } else {
      av[0] = a[k];
      bv[0] = b[k];
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += to_float(av[j]) * to_float(bv[j]);
  }
  for (int k = k_vec_end + lane; k < K; k += kWarpSize) acc += to_float(a[k]) * to_float(b[k]);
  return acc;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace cuda
}  // namespace fastpeft
