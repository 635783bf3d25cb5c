// CUDA face of fastpeft::lora_linear_fwd / lora_linear_bwd.
//
// Decode (M <= kMaxGemvRows tokens) is memory-bound: the time is reading W once. PEFT launches five
// kernels there (base GEMV, A GEMV, B GEMV, scale, add) and cuBLAS-plus-addmm still makes two passes
// over y. Here: s = x·Aᵀ (one small cuBLAS call), then one fused GEMV that streams each row of W
// with 16-byte loads, adds bias and scaling·s·B[n, :] to the fp32 sums, and writes y once.
// Larger M and non-contiguous W: cuBLAS with the LoRA term as the GEMM's C operand
// (lora_linear_fwd_cublas below). The backward uses the device-generic ATen composition
// (csrc/cpu/lora_linear.cpp), i.e. cuBLAS with the delta accumulated in place.
#include "../lora_linear.h"
#include "common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace fastpeft {
namespace {

using cuda::kWarpSize;
using cuda::to_float;
constexpr int kMaxGemvRows = 16;     // largest M the fused GEMV is used for: every row in one pass over W
constexpr int kWarps = 8;            // warps per block
constexpr int kRowsPerWarp = 2;      // output features per warp: each x load serves both
constexpr int kUnroll = 4;           // 16-byte loads per row per lane issued before the first is used
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;

// kBytes of a W row, read once: not kept in L1 (x is).
template <int kBytes>
__device__ __forceinline__ void load_streaming(void* dst, const void* p) {
  if constexpr (kBytes == 16) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    *reinterpret_cast<uint4*>(dst) = v;
  } else {
    static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8, "one element per load without vectors");
    using Word = std::conditional_t<kBytes == 2, unsigned short, std::conditional_t<kBytes == 4, unsigned, unsigned long long>>;
    *reinterpret_cast<Word*>(dst) = __ldg(reinterpret_cast<const Word*>(p));
  }
}

// y[m, n] = sum_k x[m, k]·W[n, k] + bias[n] + scaling·sum_r s[m, r]·B[n, r], m < M <= kMaxRows.
// grid: ceil(N / kRowsPerBlock); block: kWarps warps, kRowsPerWarp features each. W rows are
// contiguous; kVec: elements per 16-byte load when rows of x and W are 16-byte aligned, else 1.
// Each lane issues kRowsPerWarp·kUnroll loads of W before using any (the loads in flight that
// keep HBM busy), and reads each x chunk once for the warp's rows.
template <typename T, int kVec, int kMaxRows>
__global__ void __launch_bounds__(kWarps* kWarpSize)
    lora_gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                     const T* __restrict__ s, const T* __restrict__ b, T* __restrict__ y, int M, int N, int K, int R,
                     float scaling, int64_t ldx, int64_t ldw, int64_t lds, int64_t ldb_n, int64_t ldb_r,
                     int64_t ldy) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  if (n0 >= N) return;  // whole warp leaves together: no shuffle below misses a lane
  const int rows = min(kMaxRows, M);

  float acc[kRowsPerWarp][kMaxRows];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) acc[j][i] = 0.f;
  const T* w_row[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) w_row[j] = w + static_cast<int64_t>(min(n0 + j, N - 1)) * ldw;

  constexpr int kStep = kWarpSize * kVec;
  const int k_vec_end = (K / kVec) * kVec;
#pragma unroll 1  // a trip is one group of loads; unrolling it would only grow the code
  for (int k_base = lane * kVec; k_base < k_vec_end; k_base += kStep * kUnroll) {
    alignas(16) T wv[kRowsPerWarp][kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the group first
      const int k = k_base + u * kStep;
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        if (k < k_vec_end) {
          load_streaming<kVec * sizeof(T)>(wv[j][u], w_row[j] + k);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) wv[j][u][e] = T(0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k_base + u * kStep;
      if (k >= k_vec_end) break;
      float wf[kRowsPerWarp][kVec];  // converted once for every row of x
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
        for (int e = 0; e < kVec; ++e) wf[j][e] = to_float(wv[j][u][e]);
#pragma unroll
      for (int i = 0; i < kMaxRows; ++i) {
        if (i < rows) {
          alignas(16) T xv[kVec];
          const T* x_row = x + static_cast<int64_t>(i) * ldx + k;
          if constexpr (kVec > 1) {
            *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x_row));
          } else {
            xv[0] = x_row[0];
          }
#pragma unroll
          for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[j][i] = fmaf(wf[j][e], to_float(xv[e]), acc[j][i]);
        }
      }
    }
  }
  // Tail of K that is not a multiple of kVec (only when kVec > 1).
  for (int k = k_vec_end + lane; k < K; k += kWarpSize) {
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const float wk = to_float(w_row[j][k]);
#pragma unroll
      for (int i = 0; i < kMaxRows; ++i)
        if (i < rows) acc[j][i] += wk * to_float(x[static_cast<int64_t>(i) * ldx + k]);
    }
  }
  // LoRA delta: lanes split the rank; the warp reduction below sums their parts with the GEMV's.
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int n = min(n0 + j, N - 1);
    for (int r = lane; r < R; r += kWarpSize) {
      const float br = scaling * to_float(b[static_cast<int64_t>(n) * ldb_n + static_cast<int64_t>(r) * ldb_r]);
#pragma unroll
      for (int i = 0; i < kMaxRows; ++i)
        if (i < rows) acc[j][i] += br * to_float(s[static_cast<int64_t>(i) * lds + r]);
    }
  }
  cuda::store_warp_sums(acc, y, ldy, bias, n0, N, rows, lane);
}

template <typename T>
void launch_lora_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      const at::Tensor& s, const at::Tensor& b, at::Tensor& y, double scaling) {
  const int M = x.size(0), K = x.size(1), N = w.size(0), R = s.size(1);
  const dim3 grid((N + kRowsPerBlock - 1) / kRowsPerBlock);
  const dim3 block(kWarps * kWarpSize);
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(T);
  const T* bias_ptr = bias ? bias->data_ptr<T>() : nullptr;
  const bool vec_ok = cuda::aligned16(x.data_ptr()) && cuda::aligned16(w.data_ptr()) && x.stride(0) % kVec == 0 &&
                      w.stride(0) % kVec == 0;
  auto run = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(x.data_ptr<T>(), w.data_ptr<T>(), bias_ptr, s.data_ptr<T>(),
                                       b.data_ptr<T>(), y.data_ptr<T>(), M, N, K, R, static_cast<float>(scaling),
                                       x.stride(0), w.stride(0), s.stride(0), b.stride(0), b.stride(1), y.stride(0));
  };
  if (vec_ok) {
    if (M == 1) run(lora_gemv_kernel<T, kVec, 1>); else run(lora_gemv_kernel<T, kVec, kMaxGemvRows>);
  } else {
    if (M == 1) run(lora_gemv_kernel<T, 1, 1>); else run(lora_gemv_kernel<T, 1, kMaxGemvRows>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = x·Wᵀ + bias + scaling·s·Bᵀ as cuBLAS computes it best: s = x_lora·Aᵀ, then y = bias +
// scaling·s·Bᵀ (a GEMM of depth r that writes [M, N] once), then y += x·Wᵀ in place, y the GEMM's C
// operand (beta = 1) read in its epilogue, under the GEMM's compute. The CPU's order (y = x·Wᵀ,
// then y += scaling·s·Bᵀ) reads and writes y in a memory-bound pass of its own (2·M·N elements:
// 15.6 us at M = N = 4096, bf16, 4.3 TB/s, H200) where this one only writes the delta (7.8 us);
// estimates of the static cost rule, kernels/lora_linear.py fwd_estimates. Out of place, ATen's
// addmm would copy C into the result first.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cublas(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                          double scaling, const std::optional<at::Tensor>& x_lora) {
  at::Tensor s = at::mm(x_lora ? *x_lora : x, lora_a.t());  // [M, r]
  at::Tensor y;
  if (bias) {
    y = at::addmm(*bias, s, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  } else {
    y = at::empty({x.size(0), weight.size(0)}, x.options());
    y.addmm_(s, lora_b.t(), /*beta=*/0, /*alpha=*/scaling);  // beta = 0: y's contents are not read
  }
  y.addmm_(x, weight.t());
  return {y, s};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                        double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, bias, lora_a, lora_b, x_lora);
  const bool gemv = x.size(0) <= kMaxGemvRows && x.size(0) > 0 && weight.size(0) > 0 && x.stride(1) == 1 &&
                    weight.stride(1) == 1 &&
                    (!bias || bias->is_contiguous()) && x.size(1) < (int64_t{1} << 31) &&
                    weight.size(0) < (int64_t{1} << 31);
  if (!gemv) return lora_linear_fwd_cublas(x, weight, bias, lora_a, lora_b, scaling, x_lora);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor s = at::mm(x_lora ? *x_lora : x, lora_a.t()).contiguous();  // [M, r], tiny
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: launch_lora_gemv<float>(x, weight, bias, s, lora_b, y, scaling); break;
    case at::kHalf: launch_lora_gemv<at::Half>(x, weight, bias, s, lora_b, y, scaling); break;
    case at::kBFloat16: launch_lora_gemv<at::BFloat16>(x, weight, bias, s, lora_b, y, scaling); break;
    default: TORCH_CHECK(false, "lora_linear: dtype ", x.scalar_type(), " is not supported (float32, float16, bfloat16)");
  }
  return {y, s};
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_linear_fwd", &fastpeft::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &fastpeft::lora_linear_bwd_aten);
}
