// CUDA face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// One row (decode at batch 1, K % 32 == 0) is bound by reading the weight, which NF4 makes 4x
// smaller than bf16: a GEMV in which each warp owns kRowsPerWarp output rows and each lane streams
// 16-byte chunks of packed codes (32 weights), kUnroll chunks per row issued before any is used, so
// kRowsPerWarp·kUnroll loads (and their absmax reads, which depend only on the position) are in
// flight per lane; the weight is read with L1::no_allocate (used once), x through the read-only
// cache (every warp of the block reads the same x chunk, and the rows of a warp share each load).
// A byte is decoded with one shared-memory read of its two levels (a 256-entry pair table built
// per block), and the absmax of a 32-weight chunk (one block: blocksizes are >= 32) scales the
// chunk's partial sum. Measured on an H200 (bf16, K = 4096, N = 14336; benchmarks/results/
// 2026-12-04-h200-device-check-2): 37.8 us a layer at M = 1 against bitsandbytes' gemv_4bit 29.5
// and bf16 cuBLAS 30; its 16-row instantiation took 200-251 us at M = 2-8, so it is gone. Every
// other shape (two rows and more, the backward's dx, ragged K) dequantises the weight into a
// buffer of at most kTileElements weights and multiplies with cuBLAS, as bitsandbytes does above
// one row (its kernels: 45-67 us a layer at M = 2-8 on the same run): a 4096 x 14336 layer in one
// tile, its GEMM written straight into y. With 1024-row tiles (14 rounds of dequantise, GEMM and
// copy) M = 512 took 0.638 ms against bitsandbytes' 0.485 (benchmarks/results/
// 2026-12-04-h200-device-check-1); the one-tile path has not run on a GPU yet.
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
constexpr int kWarps = 8;         // warps per block
constexpr int kRowsPerWarp = 2;   // output features per warp: each x load serves both
constexpr int kUnroll = 4;        // 16-byte chunks per row per lane issued before the first is used
constexpr int kChunk = 32;        // weights per lane per chunk: one 16-byte load of packed codes
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
// Weights dequantised per round (whole rows, at least one): 128 MiB in bf16 (256 in fp32), the
// transient of one large layer's float weight per call, where 1024-row tiles took 8 MiB at K = 4096.
constexpr int64_t kTileElements = int64_t{1} << 26;

// 16 bytes of the weight, read once: not kept in L1 (x and the tables are).
__device__ __forceinline__ uint4 load_streaming(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// The 32 weights of a 16-byte chunk of codes: one shared-memory read of a level pair per byte.
__device__ __forceinline__ void decode_chunk(const float2* pairs, const uint4& raw, float (&w)[kChunk]) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
  for (int q = 0; q < kChunk / 2; ++q) {
    const float2 pair = pairs[__byte_perm(words[q / 4], 0u, 0x4440u | (q % 4))];
    w[2 * q] = pair.x;
    w[2 * q + 1] = pair.y;
  }
}

// The absmax of block b, single or double quantised: a template argument, so that the main loop
// has one path (Nf4Scales' run-time test put both variants of every load in it).
template <bool kNested>
__device__ __forceinline__ float block_scale(const Nf4Scales& s, int64_t b) {
  if constexpr (kNested) {
    return s.nested_map[s.codes[b]] * s.nested_absmax[b >> kNestedShift] + s.offset;
  } else {
    return s.absmax[b];
  }
}

// y[m, n] = sum_k x[m, k]·W[n, k] (+ bias[n]) for m < M <= kMaxRows; grid: ceil(N / kRowsPerBlock).
// Only kMaxRows = 1 is instantiated (launch_gemv); the rows of a warp are decoded first, then
// each x chunk is loaded and converted once for them.
template <typename T, int kMaxRows, bool kNested>
__global__ void __launch_bounds__(kWarps* kWarpSize)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const Nf4Scales absmax,
                    const float* __restrict__ quant_map, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                    int K, int shift) {
  __shared__ float2 pairs[256];  // byte -> (level of its high nibble: the even weight, level of its low nibble)
  for (int b = threadIdx.x; b < 256; b += blockDim.x) pairs[b] = make_float2(quant_map[b >> 4], quant_map[b & 15]);
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  if (n0 >= N) return;  // the whole warp leaves together (no barrier below)
  const int rows = min(kMaxRows, M);
  constexpr int kXVec = 16 / sizeof(T);  // x elements per 16-byte load

  float acc[kRowsPerWarp][kMaxRows];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) acc[j][i] = 0.f;
  int64_t row_start[kRowsPerWarp];  // element index of W[n, 0]; even as K % 32 == 0
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) row_start[j] = static_cast<int64_t>(min(n0 + j, N - 1)) * K;

  constexpr int kStep = kWarpSize * kChunk;  // weights of a row one chunk of every lane covers
#pragma unroll 1  // a trip is one group of loads; unrolling it would only grow the code
  for (int k_base = lane * kChunk; k_base < K; k_base += kStep * kUnroll) {
    uint4 raw[kRowsPerWarp][kUnroll];
    float scale[kRowsPerWarp][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the group first: none waits on another
      const int k = k_base + u * kStep;
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        if (k < K) {
          raw[j][u] = load_streaming(packed + ((row_start[j] + k) >> 1));
          scale[j][u] = block_scale<kNested>(absmax, (row_start[j] + k) >> shift);
        } else {
          raw[j][u] = make_uint4(0, 0, 0, 0);
          scale[j][u] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k_base + u * kStep;
      if (k >= K) break;  // uniform per lane; the chunks after it are out of range too
      // every row of the warp decoded first, then each x chunk loaded and converted once for them
      float w[kRowsPerWarp][kChunk];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) decode_chunk(pairs, raw[j][u], w[j]);
#pragma unroll
      for (int i = 0; i < kMaxRows; ++i) {
        if (i < rows) {
          const T* x_row = x + static_cast<int64_t>(i) * K + k;
          float part[kRowsPerWarp] = {};
#pragma unroll
          for (int v = 0; v < kChunk / kXVec; ++v) {
            alignas(16) T xv[kXVec];
            *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x_row + v * kXVec));
#pragma unroll
            for (int e = 0; e < kXVec; ++e) {
              const float xe = to_float(xv[e]);
#pragma unroll
              for (int j = 0; j < kRowsPerWarp; ++j) part[j] = fmaf(w[j][v * kXVec + e], xe, part[j]);
            }
          }
#pragma unroll
          for (int j = 0; j < kRowsPerWarp; ++j) acc[j][i] = fmaf(part[j], scale[j][u], acc[j][i]);
        }
      }
    }
  }
  cuda::store_warp_sums(acc, y, N, bias, n0, N, rows, lane);
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
  const dim3 grid((a.N + kRowsPerBlock - 1) / kRowsPerBlock);
  auto run = [&](auto kernel) {
    kernel<<<grid, kWarps * kWarpSize, 0, stream>>>(
        a.x.data_ptr<T>(), a.raw.data_ptr<uint8_t>(), a.scales(), a.qmap.data_ptr<float>(),
        bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), static_cast<int>(a.M), static_cast<int>(a.N),
        static_cast<int>(a.K), a.shift);
  };
  a.nested_absmax.defined() ? run(nf4_gemv_kernel<T, 1, true>) : run(nf4_gemv_kernel<T, 1, false>);
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
  const bool gemv = !transposed && a.M == 1 && a.K % kChunk == 0 && blocksize >= kChunk &&
                    a.N * a.K < (int64_t{1} << 31) && cuda::aligned16(a.x.data_ptr()) &&
                    cuda::aligned16(a.raw.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "nf4_matmul_cuda", [&] {
    if (gemv) {
      launch_gemv<scalar_t>(a, bias_c, y, stream);
      return;
    }
    const int64_t tile_rows = std::min(a.N, std::max<int64_t>(1, kTileElements / std::max<int64_t>(a.K, 1)));
    at::Tensor tile = at::empty({tile_rows, a.K}, a.x.options());
    for (int64_t n0 = 0; n0 < a.N; n0 += tile_rows) {
      const int64_t n1 = std::min(a.N, n0 + tile_rows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      dequantize_tile<scalar_t>(a, n0, n1, w, stream);
      if (transposed) {
        y.addmm_(a.x.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else if (n1 - n0 == a.N) {
        at::mm_out(y, a.x, w.t());  // the whole weight in one tile: cuBLAS writes y itself
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
