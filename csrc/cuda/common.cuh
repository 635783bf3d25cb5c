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

// Dot product of two rows of length K, split over kLanes threads (one warp by default; lane in
// [0, kLanes)), fp32 partial sums (not yet reduced across lanes). kVec elements per 16-byte load
// when both rows are 16-byte aligned.
template <typename T, int kVec, int kLanes = kWarpSize>
__device__ __forceinline__ float lane_dot(const T* __restrict__ a, const T* __restrict__ b, int K, int lane) {
  float acc = 0.f;
  const int k_vec_end = (K / kVec) * kVec;
  for (int k = lane * kVec; k < k_vec_end; k += kLanes * kVec) {
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
  for (int k = k_vec_end + lane; k < K; k += kLanes) acc += to_float(a[k]) * to_float(b[k]);
  return acc;
}

// The decode GEMVs' epilogue: a warp holds lane-partial sums acc[j][i] of output feature n0 + j for
// row i of x; lane 0 stores y[i, n0 + j] = (sum over lanes) + bias[n0 + j] for rows i < rows and
// features below N (ldy: y's row stride).
template <int kRowsPerWarp, int kMaxRows, typename T>
__device__ __forceinline__ void store_warp_sums(const float (&acc)[kRowsPerWarp][kMaxRows], T* __restrict__ y,
                                                int64_t ldy, const T* __restrict__ bias, int n0, int N, int rows,
                                                int lane) {
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int n = n0 + j;
    const float bias_n = bias && n < N ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) {
      const float total = warp_sum(acc[j][i]);
      if (lane == 0 && i < rows && n < N) y[static_cast<int64_t>(i) * ldy + n] = static_cast<T>(total + bias_n);
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace cuda
}  // namespace fastpeft
