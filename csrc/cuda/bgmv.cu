// CUDA face of fastpeft::bgmv_shrink / bgmv_expand, for decode: every token its own adapter.
// Shrink gives a block one (token, rank) pair: its kShrinkThreads threads stream the factor row
// A[slot, r, :] against x[t, :] with 16-byte loads, each a share of K, summed across the block (a
// warp per pair in 8-warp blocks made T·R/8 blocks: 16 at T = 8, rank 16, an eighth of an H200's
// 132 SMs; a block per pair makes 128). Expand gives a thread one (token, feature) pair and the
// whole rank (a warp per output element, as before, left T·N warps of a few loads each: 262k at
// T = 64, N = 4096), in blocks narrowed for a few tokens until the grid covers the SMs. The slot is
// read per token; a slot outside [0, S) (including -1) means "no adapter": s = 0, out = base,
// nothing of the factors is read.
#include "../lora_gather.h"
#include "common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastpeft {
namespace {

using cuda::kWarpSize;
// Threads of a shrink block: a (token, rank) pair's K shared by 4 warps, so a 4096-wide bf16 row is
// 4 trips of 16-byte loads per thread. Blocks: T·R (1024 at T = 64, rank 16; 128 at T = 8).
constexpr int kShrinkThreads = 128;
constexpr int kExpandThreads = 256;  // output features per expand block, one per thread, at most

// s[t, r] = sum_k A[slot, r, k]·x[t, k], slot = ids[t]; grid (T, R), a block per pair.
template <typename T, int kVec>
__global__ void __launch_bounds__(kShrinkThreads)
    bgmv_shrink_kernel(const T* __restrict__ x, const T* __restrict__ a, const int32_t* __restrict__ ids,
                       T* __restrict__ s, int K, int R, int S, int64_t ldx, int64_t a_slot, int64_t a_row,
                       int64_t lds) {
  __shared__ float warp_sums[kShrinkThreads / kWarpSize];
  const int t = blockIdx.x;
  const int r = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int slot = ids[t];
  float acc = 0.f;
  if (slot >= 0 && slot < S) {  // uniform across the block
    acc = cuda::warp_sum(cuda::lane_dot<T, kVec, kShrinkThreads>(a + slot * a_slot + r * a_row, x + t * ldx, K,
                                                                  threadIdx.x));
  }
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kShrinkThreads / kWarpSize; ++w) total += warp_sums[w];  // a fixed order
    s[t * lds + r] = static_cast<T>(total);
  }
}

// out[t, n] = base[t, n] + scalings[slot]·sum_r s[t, r]·B[slot, n, r], slot = ids[t].
// grid: (T, ceil(N / blockDim.x)), blockDim.x <= kExpandThreads (expand_threads); a thread per
// output feature (its B row is R contiguous values, read with 16-byte loads when kVec > 1: adjacent
// threads read adjacent rows, so a warp's loads are one contiguous stretch), s[t, :] read once per
// block into shared memory as fp32; no cross-lane reduction.
template <typename T, int kVec>
__global__ void __launch_bounds__(kExpandThreads)
    bgmv_expand_kernel(const T* __restrict__ base, const T* __restrict__ s, const T* __restrict__ b,
                       const float* __restrict__ scalings, const int32_t* __restrict__ ids, T* __restrict__ out,
                       int N, int R, int S, int64_t ldbase, int64_t lds, int64_t b_slot, int64_t b_row,
                       int64_t b_col, int64_t ldout) {
  extern __shared__ float s_row[];  // [R]
  const int t = blockIdx.x;
  const int n = blockIdx.y * blockDim.x + threadIdx.x;
  const int slot = ids[t];
  const bool adapted = slot >= 0 && slot < S;  // uniform across the block
  if (adapted)
    for (int r = threadIdx.x; r < R; r += blockDim.x) s_row[r] = cuda::to_float(s[static_cast<int64_t>(t) * lds + r]);
  __syncthreads();
  if (n >= N) return;
  float acc = 0.f;
  if (adapted) {
    const T* b_n = b + slot * b_slot + static_cast<int64_t>(n) * b_row;
    int r = 0;
    if constexpr (kVec > 1) {  // b_col == 1, R % kVec == 0, rows 16-byte aligned (checked by the launcher)
      for (; r < R; r += kVec) {
        alignas(16) T bv[kVec];
        *reinterpret_cast<uint4*>(bv) = __ldg(reinterpret_cast<const uint4*>(b_n + r));
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc = fmaf(cuda::to_float(bv[e]), s_row[r + e], acc);
      }
    }
    for (; r < R; ++r) acc = fmaf(cuda::to_float(b_n[r * b_col]), s_row[r], acc);
    acc *= scalings[slot];
  }
  out[static_cast<int64_t>(t) * ldout + n] =
      static_cast<T>(cuda::to_float(base[static_cast<int64_t>(t) * ldbase + n]) + acc);
}

// Threads of an expand block: the widest of 256, 128, 64, 32 whose grid T·ceil(N / threads) gives
// every SM a block; 32 when none does (one token of a 4096-wide layer: 128 blocks of a warp, short
// of an H200's 132 SMs by 4, each reading 32 rows of B). T = 8, N = 4096: 128 threads, 256 blocks.
int expand_threads(int T, int N, int sms) {
  int threads = kExpandThreads;
  while (threads > kWarpSize && static_cast<int64_t>(T) * ((N + threads - 1) / threads) < sms) threads /= 2;
  return threads;
}

void check_cuda_inputs(const char* op, const at::Tensor& first, std::initializer_list<const at::Tensor*> rest) {
  TORCH_CHECK(first.is_cuda(), op, ": tensors must be on a CUDA device");
  for (const auto* t : rest) TORCH_CHECK(t->device() == first.device(), op, ": all tensors must be on one device");
}

at::Tensor bgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& adapter_ids) {
  check_cuda_inputs("bgmv_shrink", x, {&lora_a, &adapter_ids});
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_a.size(2) == x.size(1), "bgmv_shrink: x [T, K], lora_a [S, R, K]");
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == x.size(0) && adapter_ids.scalar_type() == at::kInt,
              "bgmv_shrink: adapter_ids must be int32 [T]");
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type(), "bgmv_shrink: lora_a must have x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel walks rows with unit stride; other layouts (a transposed view) are made contiguous.
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor ac = lora_a.stride(2) == 1 ? lora_a : lora_a.contiguous();
  const at::Tensor ids = adapter_ids.contiguous();
  const int T = x.size(0), K = x.size(1), S = lora_a.size(0), R = lora_a.size(1);
  at::Tensor s = at::empty({T, R}, x.options());
  if (s.numel() == 0) return s;
  const dim3 grid(T, R), block(kShrinkThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bgmv_shrink", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec_ok = cuda::aligned16(xc.data_ptr()) && cuda::aligned16(ac.data_ptr()) && xc.stride(0) % kVec == 0 &&
                        ac.stride(0) % kVec == 0 && ac.stride(1) % kVec == 0;
    auto kernel = vec_ok ? bgmv_shrink_kernel<scalar_t, kVec> : bgmv_shrink_kernel<scalar_t, 1>;
    kernel<<<grid, block, 0, stream>>>(xc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(),
                                       s.data_ptr<scalar_t>(), K, R, S, xc.stride(0), ac.stride(0), ac.stride(1),
                                       s.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

at::Tensor bgmv_expand_cuda(const at::Tensor& base, const at::Tensor& s, const at::Tensor& lora_b,
                            const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  check_cuda_inputs("bgmv_expand", base, {&s, &lora_b, &scalings, &adapter_ids});
  TORCH_CHECK(base.dim() == 2 && s.dim() == 2 && lora_b.dim() == 3 && s.size(0) == base.size(0) &&
                  lora_b.size(1) == base.size(1) && lora_b.size(2) == s.size(1),
              "bgmv_expand: base [T, N], s [T, R], lora_b [S, N, R]");
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == base.size(0) && adapter_ids.scalar_type() == at::kInt,
              "bgmv_expand: adapter_ids must be int32 [T]");
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == lora_b.size(0) && scalings.scalar_type() == at::kFloat,
              "bgmv_expand: scalings must be float32 [S]");
  TORCH_CHECK(s.scalar_type() == base.scalar_type() && lora_b.scalar_type() == base.scalar_type(),
              "bgmv_expand: s and lora_b must have base's dtype");
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor ids = adapter_ids.contiguous(), sc = scalings.contiguous();
  const at::Tensor bc = base.stride(1) == 1 ? base : base.contiguous();  // rows read with unit stride
  const at::Tensor sc_rows = s.stride(1) == 1 ? s : s.contiguous();
  const int T = base.size(0), N = base.size(1), S = lora_b.size(0), R = lora_b.size(2);
  at::Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int threads = expand_threads(T, N, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const dim3 grid(T, (N + threads - 1) / threads), block(threads);
  const size_t smem = static_cast<size_t>(R) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "bgmv_expand: rank ", R, " is above ", 48 * 1024 / sizeof(float),
              ", the most the CUDA face keeps in shared memory");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "bgmv_expand", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec_ok = lora_b.stride(2) == 1 && R % kVec == 0 && cuda::aligned16(lora_b.data_ptr()) &&
                        lora_b.stride(0) % kVec == 0 && lora_b.stride(1) % kVec == 0;
    auto kernel = vec_ok ? bgmv_expand_kernel<scalar_t, kVec> : bgmv_expand_kernel<scalar_t, 1>;
    kernel<<<grid, block, smem, stream>>>(
        bc.data_ptr<scalar_t>(), sc_rows.data_ptr<scalar_t>(), lora_b.data_ptr<scalar_t>(), sc.data_ptr<float>(),
        ids.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), N, R, S, bc.stride(0), sc_rows.stride(0), lora_b.stride(0),
        lora_b.stride(1), lora_b.stride(2), out.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("bgmv_shrink", &fastpeft::bgmv_shrink_cuda);
  m.impl("bgmv_expand", &fastpeft::bgmv_expand_cuda);
}
