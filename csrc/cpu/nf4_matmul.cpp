// CPU face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// One of several paths runs each call, picked by choose_path from the shape, x's dtype and the
// CPU's instruction-set level (cpu_features.h; FASTPEFT_CPU_ISA caps it, so every lower path can
// be forced and tested on a higher machine; `fastpeft info` lists the path per shape):
// - Few rows (M <= 16, decode), not transposed: a GEMV that streams the packed weight once; no
//   full-precision weight exists. AVX-512 (nf4_matmul_avx512.cpp) or AVX2 (nf4_matmul_avx2.cpp)
//   decode in registers; the portable loop here decodes one weight row into an fp32 buffer
//   (rounded to x's dtype, as the reference rounds W). bf16 x on an AVX512_BF16 CPU takes bf16
//   dot products for M <= kBf16GemvRows and the bf16 tiles above.
// - More rows, and the backward (transposed): tiles of dequantised weight rows multiplied as
//   matrices, so the float weight never exceeds one tile: bf16 tiles into AVX512_BF16 dot
//   products for bf16 x where the CPU has them, fp32 tiles into fp32 BLAS with AVX2, tiles in x's
//   dtype into torch's matmul otherwise.
// The SIMD paths need K % 32 == 0 and blocks of >= 32 (whole 16-byte steps per row, each in one
// block) and a float32, float16 or bfloat16 x; the portable ones take any shape and float64.
// Schema, checks and the reference: fastpeft/ops/nf4_matmul.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu_features.h"
#include "nf4_matmul.h"
#include "nf4_matmul_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FASTPEFT_X86 1
#endif

namespace fastpeft::nf4_cpu {

namespace {

constexpr int64_t kGemvRows = 16;
// bf16 x on an AVX512_BF16 CPU: the GEMV decodes each step once per 4 rows (bf16 levels, a scale
// per step and row); the bf16 tiles decode once and run 24 dot products per 10 loads. On this
// project's AVX-512 CPU (AMD EPYC Zen 4, 2 threads, 4096 x 4096, 8 distinct layers): see
// nf4_matmul_avx512.cpp for the figures that put the crossover here.
constexpr int64_t kBf16GemvRows = 4;
constexpr int64_t kTileRows = 256;

// Weight rows [n0, n1) of the [N, K] NF4 weight, dequantised into `out` ([n1 - n0, K], scalar_t).
// One weight row decoded into w[0..K) as fp32 values rounded to scalar_t (the reference's rounding).
// blocksize is a power of two (the format allows 32..4096), so the block of element e is e >> shift.
template <typename scalar_t>
inline void decode_row(const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift, int64_t n,
                       int64_t K, float* w) {
  int64_t e = n * K;
  int64_t k = 0;
  if (e & 1) {  // the row starts in a low nibble
    w[k++] = static_cast<float>(static_cast<scalar_t>(qmap[raw[e >> 1] & 0xF] * absmax(e >> shift)));
    ++e;
  }
  for (; k + 1 < K; k += 2, e += 2) {  // whole bytes: two codes, one block (blocks are even-sized)
    const uint8_t byte = raw[e >> 1];
    const float scale = absmax(e >> shift);
    w[k] = static_cast<float>(static_cast<scalar_t>(qmap[byte >> 4] * scale));
    w[k + 1] = static_cast<float>(static_cast<scalar_t>(qmap[byte & 0xF] * scale));
  }
  if (k < K) w[k] = static_cast<float>(static_cast<scalar_t>(qmap[raw[e >> 1] >> 4] * absmax(e >> shift)));
}

template <typename scalar_t>
void dequantize_rows(const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift, int64_t K, int64_t n0,
                     int64_t n1, scalar_t* out) {
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    std::vector<float> w(K);
    for (int64_t n = a; n < b; ++n) {
      decode_row<scalar_t>(raw, absmax, qmap, shift, n, K, w.data());
      scalar_t* row = out + (n - n0) * K;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<scalar_t>(w[k]);
    }
  });
}

template <typename scalar_t>
void gemv_portable(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                   const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(K);
    for (int64_t n = n0; n < n1; ++n) {
      decode_row<scalar_t>(raw, absmax, qmap, shift, n, K, w.data());
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t* xm = x + m * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += w[k] * static_cast<float>(xm[k]);
        if (bias) acc += static_cast<float>(bias[n]);
        y[m * N + n] = static_cast<scalar_t>(acc);
      }
    }
  });
}

// Tiles of kTileRows weight rows in x's dtype, multiplied by torch's matmul.
void tiles_portable(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                    int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_tiles_portable", [&] {
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(N, n0 + kTileRows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      dequantize_rows<scalar_t>(raw, absmax, qmap, shift, K, n0, n1, w.data_ptr<scalar_t>());
      if (transposed) {
        y.addmm_(x.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else {
        y.narrow(1, n0, n1 - n0).copy_(at::mm(x, w.t()));
      }
    }
    if (bias.defined() && !transposed) y.add_(bias);
  });
}

thread_local Path last_path = Path::kGemvPortable;
thread_local bool any_path = false;
thread_local const char* last_levels = "";  // what gemv_avx2 decoded into; "" after other paths

constexpr const char* kPathNames[] = {"gemv-portable", "gemv-avx2",      "gemv-avx512",     "gemv-bf16-avx512",
                                      "tiles-portable", "tiles-fp32-avx2", "tiles-bf16-avx512"};

}  // namespace

const char* path_name(Path path) { return kPathNames[static_cast<int>(path)]; }

Path choose_path(CpuIsa isa, int64_t M, int64_t K, int64_t blocksize, at::ScalarType dtype, bool transposed) {
  const bool simd = steps_of_32_fit(K, blocksize) && dtype != at::kDouble;
  const bool bf16_dots = simd && isa >= CpuIsa::kAvx512Bf16 && dtype == at::kBFloat16;
  if (!transposed && M <= (bf16_dots ? kBf16GemvRows : kGemvRows)) {
    if (bf16_dots) return Path::kGemvBf16Avx512;
    if (simd && isa >= CpuIsa::kAvx512) return Path::kGemvAvx512;
    if (simd && isa >= CpuIsa::kAvx2) return Path::kGemvAvx2;
    return Path::kGemvPortable;
  }
  if (bf16_dots) return Path::kTilesBf16Avx512;
  if (simd && isa >= CpuIsa::kAvx2) return Path::kTilesFp32Avx2;
  return Path::kTilesPortable;
}

void dithered_bf16_levels(const float* qmap, uint16_t levels[kDitherTables][16]) {
  auto bf16_value = [](uint32_t b) {
    const uint32_t u = b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  for (int c = 0; c < 16; ++c) {
    uint32_t u;
    std::memcpy(&u, &qmap[c], 4);
    const uint32_t toward_zero = u >> 16, away = toward_zero + ((u & 0xFFFF) != 0);  // same sign, larger magnitude
    const float lo = bf16_value(toward_zero), hi = bf16_value(away);
    // how many tables take the larger magnitude: the level's position between the two, in eighths
    const int n_away = hi == lo ? 0 : static_cast<int>(std::lround(kDitherTables * (qmap[c] - lo) / (hi - lo)));
    for (int t = 0; t < kDitherTables; ++t)  // spread evenly over the tables (Bresenham)
      levels[t][c] = static_cast<uint16_t>(
          ((t + 1) * n_away / kDitherTables > t * n_away / kDitherTables) ? away : toward_zero);
  }
}

}  // namespace fastpeft::nf4_cpu

namespace fastpeft {

at::Tensor nf4_matmul_cpu(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax_in,
                          const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias, bool transposed,
                          const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_l,
                          double lora_scaling, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_map, double absmax_offset) {
  using namespace nf4_cpu;  // the paths and the rule that picks one
  const Nf4Args a = check_nf4_matmul_args(x_in, packed, absmax_in, quant_map, blocksize, out_features, bias,
                                          transposed, lora_s, lora_l, nested_absmax, nested_map, absmax_offset);
  const at::Tensor& x = a.x;
  const Nf4Scales scales = a.scales();
  const int64_t M = a.M, N = a.N, K = a.K;
  at::Tensor y = transposed ? at::zeros({M, K}, x.options()) : at::empty({M, N}, x.options());
  const Path path = choose_path(cpu_isa(), M, K, blocksize, x.scalar_type(), transposed);
  last_path = path;
  any_path = true;
  last_levels = "";
  if (M == 0) return y;
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const uint8_t* raw = a.raw.data_ptr<uint8_t>();
  const float* qmap = a.qmap.data_ptr<float>();
  switch (path) {
#ifdef FASTPEFT_X86
    case Path::kGemvAvx2: last_levels = gemv_avx2(x, raw, scales, qmap, a.shift, N, K, bias_c, y); break;
    case Path::kGemvAvx512: gemv_avx512(x, raw, scales, qmap, a.shift, N, K, bias_c, y); break;
    case Path::kGemvBf16Avx512: gemv_bf16_avx512(x, raw, scales, qmap, a.shift, N, K, bias_c, y); break;
    case Path::kTilesFp32Avx2: tiles_fp32_avx2(x, raw, scales, qmap, a.shift, N, K, transposed, bias_c, y); break;
    case Path::kTilesBf16Avx512:
      tiles_bf16_avx512(x, raw, scales, qmap, a.shift, N, K, transposed, bias_c, y);
      break;
#endif
    case Path::kGemvPortable:
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_gemv_portable", [&] {
        gemv_portable<scalar_t>(x.data_ptr<scalar_t>(), raw, scales, qmap,
                                bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, N,
                                K, a.shift);
      });
      break;
    default: tiles_portable(x, raw, scales, qmap, a.shift, N, K, transposed, bias_c, y); break;
  }
  add_nf4_lora_term(y, lora_s, lora_l, lora_scaling);
  return y;
}

std::string nf4_cpu_path(int64_t M, int64_t K, int64_t blocksize, const std::string& dtype, bool transposed) {
  const std::pair<const char*, at::ScalarType> dtypes[] = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float64", at::kDouble}};
  for (const auto& [name, type] : dtypes)
    if (dtype == name) return nf4_cpu::path_name(nf4_cpu::choose_path(cpu_isa(), M, K, blocksize, type, transposed));
  TORCH_CHECK(false, "nf4_cpu_path: dtype '", dtype, "' is not one of float32, float16, bfloat16, float64");
}

std::string nf4_cpu_last_path() { return nf4_cpu::any_path ? nf4_cpu::path_name(nf4_cpu::last_path) : ""; }

std::string nf4_cpu_last_levels() { return nf4_cpu::last_levels; }

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("nf4_matmul", &fastpeft::nf4_matmul_cpu); }
