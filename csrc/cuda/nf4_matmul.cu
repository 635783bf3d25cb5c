// CUDA face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// Decode (M <= 16, K % 32 == 0) is bound by reading the weight, which NF4 makes 4x smaller than
// bf16: a GEMV with one warp per output row streams the packed row with one 16-byte load per lane
// (32 weights), looks the 16 levels up in shared memory, scales once per 32 weights (a chunk lies
// in one absmax block since blocksizes are >= 32), and accumulates in fp32 for up to 8 x rows at a
// time. Everything else (prefill, the backward's dx, ragged K) dequantises 1024-row tiles into a
// buffer and multiplies with cuBLAS, so the float weight never exceeds a tile; the Triton face
// (kernels/nf4_matmul.py) is preferred for those shapes (see _choose in fastpeft/ops/nf4_matmul.py).
#include "../nf4_matmul.h"
#include "common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fastpeft {
namespace {

using cuda::kWarpSize;
using cuda::to_float;
constexpr int kMaxGemvRows = 16;
constexpr int kRowsPerPass = 8;   // x rows per block (fp32 accumulators per lane)
constexpr int kWarps = 8;         // warps per block, one output feature each
constexpr int kChunk = 32;        // weights per lane per step: one 16-byte load of packed codes
constexpr int64_t kTileRows = 1024;

template <typename T>
__global__ void nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const Nf4Scales absmax,
                                const float* __restrict__ quant_map,
                                const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K, int shift) {
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = quant_map[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n = blockIdx.x * kWarps + warp;
  if (n >= N) return;  // the whole warp leaves together
  const int m0 = blockIdx.y * kRowsPerPass;
  const int rows = min(kRowsPerPass, M - m0);
  constexpr int kXVec = 16 / sizeof(T);  // x elements per 16-byte load

  float acc[kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) acc[i] = 0.f;

  const int64_t row_start = static_cast<int64_t>(n) * K;  // element index of W[n, 0]; even as K % 32 == 0
  for (int k = lane * kChunk; k < K; k += kWarpSize * kChunk) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(packed + ((row_start + k) >> 1)));
    const float scale = absmax((row_start + k) >> shift);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    float w[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk / 2; ++j) {  // the first element of a byte is its high nibble
      w[2 * j] = levels[bytes[j] >> 4];
      w[2 * j + 1] = levels[bytes[j] & 0xF];
    }
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i < rows) {
        const T* x_row = x + static_cast<int64_t>(m0 + i) * K + k;
        float part = 0.f;
#pragma unroll
        for (int v = 0; v < kChunk / kXVec; ++v) {
          alignas(16) T xv[kXVec];
          *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x_row + v * kXVec));
#pragma unroll
          for (int j = 0; j < kXVec; ++j) part += w[v * kXVec + j] * to_float(xv[j]);
        }
        acc[i] += part * scale;
      }
    }
  }
  const float bias_n = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    const float total = cuda::warp_sum(acc[i]);
    if (lane == 0 && i < rows) y[static_cast<int64_t>(m0 + i) * N + n] = static_cast<T>(total + bias_n);
  }
}

// out[i] = dequant(W) element e0 + i, for i < count (a tile of whole weight rows), in T.
template <typename T>
__global__ void nf4_dequant_kernel(const uint8_t* __restrict__ packed, const Nf4Scales absmax,
                                   const float* __restrict__ quant_map, T* __restrict__ out, int64_t e0,
                                   int64_t count, int shift) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = e0 + i;
    const uint8_t byte = packed[e >> 1];
    const int code = (e & 1) ? (byte & 0xF) : (byte >> 4);
    out[i] = static_cast<T>(quant_map[code] * absmax(e >> shift));
  }
}

template <typename T>
void launch_gemv(const Nf4Args& a, const std::optional<at::Tensor>& bias, at::Tensor& y, cudaStream_t stream) {
  const dim3 grid((a.N + kWarps - 1) / kWarps, (a.M + kRowsPerPass - 1) / kRowsPerPass);
  nf4_gemv_kernel<T><<<grid, kWarps * kWarpSize, 0, stream>>>(
      a.x.data_ptr<T>(), a.raw.data_ptr<uint8_t>(), a.scales(), a.qmap.data_ptr<float>(),
      bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), static_cast<int>(a.M), static_cast<int>(a.N),
      static_cast<int>(a.K), a.shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dequantize_tile(const Nf4Args& a, int64_t n0, int64_t n1, at::Tensor& tile, cudaStream_t stream) {
  const int64_t count = (n1 - n0) * a.K;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((count + threads - 1) / threads, 65535));
  nf4_dequant_kernel<T><<<blocks, threads, 0, stream>>>(a.raw.data_ptr<uint8_t>(), a.scales(),
                                                        a.qmap.data_ptr<float>(), tile.data_ptr<T>(), n0 * a.K,
                                                        count, a.shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nf4_matmul_cuda(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax_in,
                           const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                           const std::optional<at::Tensor>& bias, bool transposed,
                           const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_l,
                           double lora_scaling, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_map, double absmax_offset) {
  const Nf4Args a = check_nf4_matmul_args(x_in, packed, absmax_in, quant_map, blocksize, out_features, bias,
                                          transposed, lora_s, lora_l, nested_absmax, nested_map, absmax_offset);
  const c10::cuda::CUDAGuard guard(a.x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor y = transposed ? at::zeros({a.M, a.K}, a.x.options()) : at::empty({a.M, a.N}, a.x.options());
  if (a.M == 0) return y;
  const std::optional<at::Tensor> bias_c = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const bool gemv = !transposed && a.M <= kMaxGemvRows && a.K % kChunk == 0 && blocksize >= kChunk &&
                    a.N * a.K < (int64_t{1} << 31) && cuda::aligned16(a.x.data_ptr()) &&
                    cuda::aligned16(a.raw.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "nf4_matmul_cuda", [&] {
    if (gemv) {
      launch_gemv<scalar_t>(a, bias_c, y, stream);
      return;
    }
    at::Tensor tile = at::empty({std::min(kTileRows, a.N), a.K}, a.x.options());
    for (int64_t n0 = 0; n0 < a.N; n0 += kTileRows) {
      const int64_t n1 = std::min(a.N, n0 + kTileRows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      dequantize_tile<scalar_t>(a, n0, n1, w, stream);
      if (transposed) {
        y.addmm_(a.x.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else {
        y.narrow(1, n0, n1 - n0).copy_(at::mm(a.x, w.t()));
      }
    }
    if (bias_c && !transposed) y.add_(*bias_c);
  });
  add_nf4_lora_term(y, lora_s, lora_l, lora_scaling);
  return y;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("nf4_matmul", &fastpeft::nf4_matmul_cuda); }
