// CPU face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// Few rows (M <= 16, decode): a GEMV that streams the packed weight once; no full-precision
// weight exists. With AVX2+FMA (checked at run time; FASTPEFT_CPU_ISA=portable forces the
// fallback) 16 bytes decode to 32 floats with four byte shuffles (one per byte of the float
// levels), and x is stored once in the order that decode produces, so nothing is re-shuffled per
// weight row. The portable fallback decodes one weight row into an fp32 buffer (rounded to x's
// dtype, as the reference rounds W). More rows: a blocked dequant-matmul, 256 weight rows
// dequantised into a tile and multiplied with BLAS, so the float weight never exceeds one tile.
// Schema, checks and the reference: fastpeft/ops/nf4_matmul.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTPEFT_X86 1
#endif

#include "cpu_features.h"
#include "nf4_matmul.h"

namespace fastpeft {
namespace {

constexpr int64_t kGemvRows = 16;
constexpr int64_t kTileRows = 256;
constexpr int64_t kChunkMinBlock = 32;  // the SIMD GEMV needs whole 32-weight chunks inside one block

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
void gemv(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, const scalar_t* bias,
          scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
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

#ifdef FASTPEFT_X86
// One AVX2 step decodes a chunk of 32 weights (16 bytes). Byte b of the chunk holds element 2b
// (high nibble) and 2b+1 (low nibble); the decode yields four 8-float vectors, vector i holding
// elements {8i, 8i+2, 8i+4, 8i+6, 8i+1, 8i+3, 8i+5, 8i+7} (lane 0: high nibbles, lane 1: low).
// Measured on this project's CPU (AMD EPYC, AVX2; 4096 x 4096, M = 1, one thread): this decode
// 1.46 ms; two 8-entry float permutes and a blend per 8 codes 2.8 ms; 16-bit blends and shifts in
// place of the last four unpacks 1.63 ms.
constexpr int64_t kChunk = 32;
inline int64_t chunk_position_of(int64_t k) {  // where element k of a chunk sits in the decoded order
  return (k & ~7) + ((k & 7) >> 1) + (k & 1) * 4;
}

__attribute__((target("avx2,fma"))) inline void decode_chunk_avx2(const uint8_t* bytes, const __m256i level_bytes[4],
                                                                   __m256 out[4]) {
  // the 16 bytes in both lanes (a broadcast load, not a shuffle), lane 0 shifted right by 4
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                         _mm256_set1_epi8(0x0F));
  // byte j of every code's float, looked up in a 16-entry table (one shuffle per byte position)
  const __m256i b0 = _mm256_shuffle_epi8(level_bytes[0], codes);
  const __m256i b1 = _mm256_shuffle_epi8(level_bytes[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(level_bytes[2], codes);
  const __m256i b3 = _mm256_shuffle_epi8(level_bytes[3], codes);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ for K % 32 == 0 (every chunk then lies in one absmax block and starts
// on a byte). xs: x as fp32 in decode order, [M, K]. MT rows share each decoded chunk; MT is a
// template argument so their accumulators stay in registers (a runtime-indexed accumulator array
// lives on the stack, and the store-to-load round trip per chunk made the loop 2x slower).
template <int MT, typename scalar_t>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* xs, const uint8_t* raw,
                                                        const Nf4Scales& absmax,
                                                        const __m256i* level_bytes, const scalar_t* bias, scalar_t* y,
                                                        int64_t m0, int64_t N, int64_t K, int shift, int64_t n0,
                                                        int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    const int64_t e0 = n * K;
    for (int64_t k = 0; k < K; k += kChunk) {
      __m256 w[4];
      decode_chunk_avx2(raw + ((e0 + k) >> 1), level_bytes, w);
      const __m256 scale = _mm256_set1_ps(absmax((e0 + k) >> shift));
      for (int m = 0; m < MT; ++m) {
        const float* xk = xs + (m0 + m) * K + k;
        __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xk));
        __m256 t = _mm256_mul_ps(w[1], _mm256_loadu_ps(xk + 8));
        s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), s);
        t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), t);
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(s, t), scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float v = _mm_cvtss_f32(h);
      if (bias) v += static_cast<float>(bias[n]);
      y[(m0 + m) * N + n] = static_cast<scalar_t>(v);
    }
  }
}

// All M rows, MT = 4 at a time (the rest 1..3): the packed weight is read ceil(M / 4) times, from
// cache after the first when the row range is small.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void gemv_avx2(const float* xs, const uint8_t* raw,
                                                   const Nf4Scales& absmax,
                                                   const float* qmap, const scalar_t* bias, scalar_t* y, int64_t M,
                                                   int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  alignas(32) uint8_t table[4][32];  // byte j of level c, twice (one copy per 128-bit lane)
  for (int c = 0; c < 16; ++c) {
    uint8_t b[4];
    std::memcpy(b, &qmap[c], 4);
    for (int j = 0; j < 4; ++j) table[j][c] = table[j][c + 16] = b[j];
  }
  __m256i level_bytes[4];
  for (int j = 0; j < 4; ++j) level_bytes[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(table[j]));
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) gemv_rows_avx2<4>(xs, raw, absmax, level_bytes, bias, y, m0, N, K, shift, n0, n1);
  switch (M - m0) {
    case 3: gemv_rows_avx2<3>(xs, raw, absmax, level_bytes, bias, y, m0, N, K, shift, n0, n1); break;
    case 2: gemv_rows_avx2<2>(xs, raw, absmax, level_bytes, bias, y, m0, N, K, shift, n0, n1); break;
    case 1: gemv_rows_avx2<1>(xs, raw, absmax, level_bytes, bias, y, m0, N, K, shift, n0, n1); break;
    default: break;
  }
}
#endif

bool use_avx2() {
#ifdef FASTPEFT_X86
  const char* isa = std::getenv("FASTPEFT_CPU_ISA");
  if (isa && std::strcmp(isa, "portable") == 0) return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// The SIMD GEMV: x rows converted to fp32 once, in decode order ([M, K]: M·K·4 bytes, at most
// 256 KiB for M = 16, K = 4096), then the weight streamed once.
template <typename scalar_t>
bool try_gemv_simd(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                   const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
#ifdef FASTPEFT_X86
  if (K % kChunk != 0 || !use_avx2()) return false;
  std::vector<float> xs(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xs[m * K + (k & ~(kChunk - 1)) + chunk_position_of(k & (kChunk - 1))] = static_cast<float>(x[m * K + k]);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    gemv_avx2<scalar_t>(xs.data(), raw, absmax, qmap, bias, y, M, N, K, shift, n0, n1);
  });
  return true;
#else
  return false;
#endif
}

at::Tensor nf4_matmul_cpu(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax_in,
                          const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias, bool transposed,
                          const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_l,
                          double lora_scaling, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_map, double absmax_offset) {
  const Nf4Args a = check_nf4_matmul_args(x_in, packed, absmax_in, quant_map, blocksize, out_features, bias,
                                          transposed, lora_s, lora_l, nested_absmax, nested_map, absmax_offset);
  const at::Tensor &x = a.x, &raw = a.raw, &qmap = a.qmap;
  const Nf4Scales scales = a.scales();
  const int64_t M = a.M, N = a.N, K = a.K;
  const int shift = a.shift;
  at::Tensor y = transposed ? at::zeros({M, K}, x.options()) : at::empty({M, N}, x.options());
  if (M == 0) return y;
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_matmul_cpu", [&] {
    const uint8_t* rp = raw.data_ptr<uint8_t>();
    const float* qp = qmap.data_ptr<float>();
    if (!transposed && M <= kGemvRows) {
      if (blocksize >= kChunkMinBlock &&
          try_gemv_simd<scalar_t>(x.data_ptr<scalar_t>(), rp, scales, qp, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                                  y.data_ptr<scalar_t>(), M, N, K, shift))
        return;
      gemv<scalar_t>(x.data_ptr<scalar_t>(), rp, scales, qp, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                     y.data_ptr<scalar_t>(), M, N, K, shift);
      return;
    }
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(N, n0 + kTileRows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      dequantize_rows<scalar_t>(rp, scales, qp, shift, K, n0, n1, w.data_ptr<scalar_t>());
      if (transposed) {
        y.addmm_(x.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else {
        y.narrow(1, n0, n1 - n0).copy_(at::mm(x, w.t()));
      }
    }
    if (bias && !transposed) y.add_(bias_c);
  });
  add_nf4_lora_term(y, lora_s, lora_l, lora_scaling);
  return y;
}

}  // namespace
}  // namespace fastpeft

std::string fastpeft::nf4_gemv_isa() { return use_avx2() ? "avx2" : "portable"; }

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("nf4_matmul", &fastpeft::nf4_matmul_cpu); }
