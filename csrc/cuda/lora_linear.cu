// CUDA face of fastpeft::lora_linear_fwd / lora_linear_bwd.
//
// Decode (M <= kMaxGemvRows tokens) is memory-bound: the time is reading W once. PEFT launches five
// kernels there (base GEMV, A GEMV, B GEMV, scale, add) and cuBLAS-plus-addmm still makes two passes
// over y. Here: s = x·Aᵀ (one small cuBLAS call), then one fused GEMV that streams each row of W
// with 16-byte loads, adds bias and scaling·s·B[n, :] to the fp32 sums, and writes y once.
// Larger M, non-contiguous W and the backward use the device-generic ATen composition
// (csrc/cpu/lora_linear.cpp), i.e. cuBLAS with the delta accumulated in place.
#include "../lora_linear.h"
#include "common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace fastpeft {
namespace {

using cuda::kWarpSize;
using cuda::to_float;
constexpr int kMaxGemvRows = 16;     // largest M the fused GEMV is used for
constexpr int kRowsPerPass = 8;      // x rows one block accumulates at a time (fp32 registers per lane)
constexpr int kWarps = 8;            // warps per block, one output feature n per warp

// y[m, n] = sum_k x[m, k]·W[n, k] + bias[n] + scaling·sum_r s[m, r]·B[n, r]
// grid: (ceil(N / kWarps), ceil(M / kRowsPerPass)); block: kWarps warps. W rows are contiguous.
// kVec: elements per 16-byte load when rows of x and W are 16-byte aligned, else 1.
template <typename T, int kVec>
__global__ void lora_gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                 const T* __restrict__ s, const T* __restrict__ b, T* __restrict__ y, int M, int N,
                                 int K, int R, float scaling, int64_t ldx, int64_t ldw, int64_t lds, int64_t ldb_n,
                                 int64_t ldb_r, int64_t ldy) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n = blockIdx.x * kWarps + warp;
  if (n >= N) return;  // whole warp leaves together: no shuffle below misses a lane
  const int m0 = blockIdx.y * kRowsPerPass;
  const int rows = min(kRowsPerPass, M - m0);

  float acc[kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) acc[i] = 0.f;

  const T* w_row = w + static_cast<int64_t>(n) * ldw;
  const int k_vec_end = (K / kVec) * kVec;
  for (int k = lane * kVec; k < k_vec_end; k += kWarpSize * kVec) {
    alignas(16) T wv[kVec];
    if constexpr (kVec > 1) {
      *reinterpret_cast<uint4*>(wv) = __ldg(reinterpret_cast<const uint4*>(w_row + k));
    } else {
      wv[0] = w_row[k];
    }
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i < rows) {
        const T* x_row = x + static_cast<int64_t>(m0 + i) * ldx + k;
        alignas(16) T xv[kVec];
        if constexpr (kVec > 1) {
          *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x_row));
        } else {
          xv[0] = x_row[0];
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[i] += to_float(wv[j]) * to_float(xv[j]);
      }
    }
  }
  // Tail of K that is not a multiple of kVec (only when kVec > 1).
  for (int k = k_vec_end + lane; k < K; k += kWarpSize) {
    const float wk = to_float(w_row[k]);
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i)
      if (i < rows) acc[i] += wk * to_float(x[static_cast<int64_t>(m0 + i) * ldx + k]);
  }
  // LoRA delta: lanes split the rank; the warp reduction below sums their parts with the GEMV's.
  for (int r = lane; r < R; r += kWarpSize) {
    const float br = scaling * to_float(b[static_cast<int64_t>(n) * ldb_n + static_cast<int64_t>(r) * ldb_r]);
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i)
      if (i < rows) acc[i] += br * to_float(s[static_cast<int64_t>(m0 + i) * lds + r]);
  }
  const float bias_n = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    const float total = cuda::warp_sum(acc[i]);
    if (lane == 0 && i < rows) y[static_cast<int64_t>(m0 + i) * ldy + n] = static_cast<T>(total + bias_n);
  }
}

template <typename T>
void launch_lora_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      const at::Tensor& s, const at::Tensor& b, at::Tensor& y, double scaling) {
  const int M = x.size(0), K = x.size(1), N = w.size(0), R = s.size(1);
  const dim3 grid((N + kWarps - 1) / kWarps, (M + kRowsPerPass - 1) / kRowsPerPass);
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
    run(lora_gemv_kernel<T, kVec>);
  } else {
    run(lora_gemv_kernel<T, 1>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (!gemv) return lora_linear_fwd_aten(x, weight, bias, lora_a, lora_b, scaling, x_lora);

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
