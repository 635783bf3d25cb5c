// CPU face of fastpeft::dense_linear: y = x·Wᵀ + bias, x [M, K], W [N, K] and bias [N] in one float
// dtype. Schema, checks and the reference: fastpeft/ops/dense_linear.py.
//
// One of two paths runs each call (dense_cpu_path, reported by `fastpeft info`):
// - "gemv-avx2": few rows (M <= kGemvRows, or kBf16DotGemvRows) with AVX2 + FMA + F16C: each
//   weight row streamed once, converted to fp32 in registers and multiplied into every row of x
//   (staged as fp32 once), fp32 sums rounded once to x's dtype. A decode step's output layer is
//   this shape, and torch's own kernels are far from the memory's speed there: SmolLM2's bf16
//   output layer (49152 x 576, 56.6 MB) at M = 1 took 3.3-3.8 ms in torch capped at AVX2 and
//   6.2-6.9 ms uncapped (oneDNN), against 2.0-3.0 ms for this loop, on the README's AMD EPYC Zen 4
//   (one thread, several runs on a VM whose speed drifts; an fp32 sum streams 27-29 GB/s there);
//   two threads, capped, 1.0-1.2 against 1.6-2.1 ms.
// - "aten": everything else, torch's own matmul (more rows, where the GEMM's blocking wins, and
//   CPUs without AVX2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "dense_linear.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTPEFT_X86 1
#endif

namespace fastpeft {
namespace {

// x rows a GEMV call takes: each weight element is converted once and multiplied into M rows, so
// above a few rows the loop is bound by its multiply-adds, not by the weight's bytes. bf16 x on a
// CPU with AVX512_BF16 takes fewer: torch's bf16 dot products catch up at 4 rows. SmolLM2's output
// layer (49152 x 576), one thread, AMD EPYC Zen 4, medians of 30 alternating calls, two runs: bf16
// M = 2 2.8-3.7 ms against torch's 6.0-6.2, M = 3 4.5 against 6.4, M = 4 7.4 against 6.9-7.1;
// capped at AVX2, M = 4 6.2-6.9 against 11.6-14.5.
constexpr int64_t kGemvRows = 4;
constexpr int64_t kBf16DotGemvRows = 3;

enum class DensePath { kGemvAvx2, kAten };
constexpr const char* kDensePathNames[] = {"gemv-avx2", "aten"};

thread_local const char* last_path = "";

DensePath choose_dense_path([[maybe_unused]] CpuIsa isa, [[maybe_unused]] int64_t M, at::ScalarType dtype) {
  [[maybe_unused]] const bool float_dtype = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
#ifdef FASTPEFT_X86
  const int64_t rows = dtype == at::kBFloat16 && isa >= CpuIsa::kAvx512Bf16 ? kBf16DotGemvRows : kGemvRows;
  if (M <= rows && float_dtype && isa >= CpuIsa::kAvx2) return DensePath::kGemvAvx2;
#endif
  return DensePath::kAten;
}

#ifdef FASTPEFT_X86
#define FASTPEFT_DENSE_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 weights as fp32, exactly (bf16 is a float's top half; fp16 through F16C).
FASTPEFT_DENSE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTPEFT_DENSE_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
FASTPEFT_DENSE_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FASTPEFT_DENSE_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// y[:, n0:n1] = x·W[n0:n1]ᵀ (+ bias) for MT rows of x (fp32 xs, [MT, K]). Independent chains of
// FMAs, so that no sum waits on the one before it: four for one row, two per row for more (at most
// eight accumulators, which stay in registers).
template <int MT, typename scalar_t>
FASTPEFT_DENSE_AVX2 void gemv_rows(const float* xs, const scalar_t* w, int64_t w_row_stride, const scalar_t* bias,
                                   scalar_t* y, int64_t y_row_stride, int64_t K, int64_t n0, int64_t n1) {
  constexpr int kChains = MT == 1 ? 4 : 2;
  const int64_t k_vectors = K - K % (8 * kChains);
  const int64_t k_eights = K - K % 8;
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* wn = w + n * w_row_stride;
    __m256 acc[MT][kChains];
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < k_vectors; k += 8 * kChains)
      for (int c = 0; c < kChains; ++c) {
        const __m256 wv = load8(wn + k + 8 * c);
        for (int m = 0; m < MT; ++m)
          acc[m][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + m * K + k + 8 * c), acc[m][c]);
      }
    for (; k < k_eights; k += 8) {
      const __m256 wv = load8(wn + k);
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MT; ++m) {
      __m256 sum = acc[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[m][c]);
      float v = horizontal_sum(sum);
      for (int64_t t = k_eights; t < K; ++t) v += static_cast<float>(wn[t]) * xs[m * K + t];
      if (bias) v += static_cast<float>(bias[n]);
      y[m * y_row_stride + n] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
void gemv_avx2(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> xs(M * K);  // x as fp32, read by every weight row
  const scalar_t* xp = x.data_ptr<scalar_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * K + k] = static_cast<float>(xp[m * x.stride(0) + k]);
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t w_stride = weight.stride(0);
  // Blocks of at least 64 KiB of weight: a thread's share of a small layer is not worth waking it.
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(1, K * weight.element_size()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: gemv_rows<1>(xs.data(), w, w_stride, b, yp, N, K, n0, n1); break;
      case 2: gemv_rows<2>(xs.data(), w, w_stride, b, yp, N, K, n0, n1); break;
      case 3: gemv_rows<3>(xs.data(), w, w_stride, b, yp, N, K, n0, n1); break;
      default: gemv_rows<4>(xs.data(), w, w_stride, b, yp, N, K, n0, n1); break;
    }
  });
}
#endif

}  // namespace

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "dense_linear: x must be [M, K] and weight [N, K]; got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()),
              "dense_linear: x, weight and bias must share one dtype");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "dense_linear: bias must be [",
              weight.size(0), "]");
  DensePath path = choose_dense_path(cpu_isa(), x.size(0), x.scalar_type());
  if (weight.stride(1) != 1 || x.stride(1) != 1) path = DensePath::kAten;  // the GEMV reads rows as they lie
  last_path = kDensePathNames[static_cast<int>(path)];
#ifdef FASTPEFT_X86
  if (path == DensePath::kGemvAvx2) {
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    if (x.size(0) == 0) return y;
    switch (x.scalar_type()) {  // the dtypes choose_dense_path lets through
      case at::kFloat: gemv_avx2<float>(x, weight, b, y); break;
      case at::kHalf: gemv_avx2<c10::Half>(x, weight, b, y); break;
      default: gemv_avx2<c10::BFloat16>(x, weight, b, y); break;
    }
    return y;
  }
#endif
  return at::linear(x, weight, bias);
}

std::string dense_cpu_path(int64_t M, const std::string& dtype) {
  const std::pair<const char*, at::ScalarType> dtypes[] = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}};
  for (const auto& [name, type] : dtypes)
    if (dtype == name) return kDensePathNames[static_cast<int>(choose_dense_path(cpu_isa(), M, type))];
  TORCH_CHECK(false, "dense_cpu_path: dtype '", dtype, "' is not one of float32, float16, bfloat16");
}

std::string dense_cpu_last_path() { return last_path; }

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("dense_linear", &fastpeft::dense_linear_cpu); }
