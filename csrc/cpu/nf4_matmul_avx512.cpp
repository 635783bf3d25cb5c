// nf4_matmul's AVX-512 paths (chosen at run time by nf4_matmul.cpp):
// - gemv_avx512 (AVX-512 F/BW/VL/DQ; fp32 and fp16 x, and bf16 x without AVX512_BF16): the exact
//   fp32 levels, 16 codes at a time widened to 32-bit lanes and looked up with one vpermps (it
//   reads an index's low 4 bits, so a byte's low nibble needs no mask), x staged as fp32 in decode
//   order, FMAs, one scale per step and row.
// - gemv_bf16_avx512 (AVX512_BF16; bf16 x, M <= 4): 32 codes widened to 16-bit lanes and looked up
//   with one vpermw in a table of dithered bf16 levels (nf4_matmul_cpu.h), vdpbf16ps with the staged
//   bf16 x, one scale per step and row: 8 instructions per 64 weights against the fp32 GEMV's 14.
// - tiles_bf16_avx512 (AVX512_BF16; bf16 x, more rows): a panel of weight rows decoded once into
//   bf16 (level times absmax in fp32, rounded to nearest even: the reference's bf16 weight, bit for
//   bit), then 4 x 6 tiles of dot products over K, 24 accumulators of 16 lanes kept in registers
//   (10 loads per 24 vdpbf16ps). Transposed (the backward): columns of bf16 weight decoded in natural
//   order and multiplied by torch's bf16 matmul.
//
// Measured on this project's AVX-512 machine (2 vCPUs of an AMD EPYC Zen 4 with AVX512_BF16; K = N =
// 4096, double quant, 8 distinct layers, 2 threads, standalone loops, best of 15-20):
// - M = 1 fp32 levels 0.44-0.61 ms per layer; bf16 levels 0.33-0.42 (bitsandbytes' eval path 0.49;
//   the weight alone streams from memory in about 0.28 at this machine's 30 GB/s).
// - bf16 GEMV M = 2: 0.45, M = 4: 0.93, M = 8: 1.48 ms; bf16 tiles M = 16: 1.73, M = 64: 5.7-6.2
//   (of which decoding the panels 0.5), against torch's bf16 matmul on the bf16 weight: 2.9 and 6.5.
// The vdpbf16ps throughput here is one 512-bit instruction (32 multiply-adds) per cycle.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "nf4_matmul_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12's _mm512_reduce_add_ps and extract intrinsics start from _mm256_undefined_*(), which
// -Wall reports as maybe-uninitialized at every use: a false positive of the headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastpeft::nf4_cpu {
namespace {

#define FASTPEFT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FASTPEFT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

using bf16_bits = uint16_t;  // a bf16 value as its 16 bits

// Decode order ("staged") of a step of 32 weights (16 bytes): the 16 high nibbles (even k) first,
// then the 16 low nibbles (odd k); x is copied into it once per call. The bf16 GEMV's steps of 64
// (32 bytes) take the 32 high nibbles, then the 32 low.
inline int64_t staged32(int64_t k) { return k - k % 32 + (k & 1) * 16 + ((k % 32) >> 1); }

// x's rows in decode order, converted to fp32 for the fp32 GEMV (staged32: each 32 columns as
// their 16 even columns, then their 16 odd ones). K % 32 == 0.
template <typename scalar_t>
FASTPEFT_AVX512 void stage_fp32(const scalar_t* x, int64_t M, int64_t K, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < M * K; i += 32) {
    __m512 a, b;  // columns i..i+15, i+16..i+31 as fp32
    if constexpr (std::is_same_v<scalar_t, float>) {
      a = _mm512_loadu_ps(x + i);
      b = _mm512_loadu_ps(x + i + 16);
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
      b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16)));
    } else {  // bf16: its 16 bits are the top half of the fp32
      static_assert(std::is_same_v<scalar_t, c10::BFloat16>);
      a = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
      b = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16))), 16));
    }
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(a, odd, b));
  }
}

// bf16 x's rows in decode order: staged32 (kStep 32) or staged64 (each 64 columns as their 32
// even columns, then their 32 odd ones). K % kStep == 0.
template <int kStep>
FASTPEFT_AVX512 void stage_bf16(const c10::BFloat16* x, int64_t M, int64_t K, bf16_bits* out) {
  alignas(64) uint16_t evens[32], odds[32];
  for (int j = 0; j < 32; ++j) {
    evens[j] = static_cast<uint16_t>(kStep == 64 ? 2 * j : (j < 16 ? 2 * j : 2 * (j - 16) + 1));
    odds[j] = static_cast<uint16_t>(2 * j + 1);
  }
  const __m512i even = _mm512_load_si512(evens), odd = _mm512_load_si512(odds);
  const auto* in = reinterpret_cast<const bf16_bits*>(x);
  for (int64_t i = 0; i < M * K; i += kStep) {
    const __m512i a = _mm512_loadu_si512(in + i);
    if constexpr (kStep == 64) {
      const __m512i b = _mm512_loadu_si512(in + i + 32);
      _mm512_storeu_si512(out + i, _mm512_permutex2var_epi16(a, even, b));
      _mm512_storeu_si512(out + i + 32, _mm512_permutex2var_epi16(a, odd, b));
    } else {
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(even, a));
    }
  }
}

// Scratch that lives as long as its thread, grown to the largest size asked for: the GEMMs run
// hundreds of times a second, and a fresh buffer of this size is a fresh mmap (page faults each call).
template <typename T>
T* scratch(int64_t n, int slot) {
  thread_local std::vector<T> buffers[2];
  std::vector<T>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// ---------------------------------------------------------------- GEMV, exact fp32 levels

// 16 codes (16 bytes) -> their levels: high nibbles (even k) and low nibbles (odd k).
FASTPEFT_AVX512 inline void decode16(const uint8_t* bytes, __m512 table, __m512& even, __m512& odd) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  odd = _mm512_permutexvar_ps(v, table);  // vpermps reads the index's low 4 bits: the low nibble
}

FASTPEFT_AVX512 inline float sum16(__m512 v) { return _mm512_reduce_add_ps(v); }

// y[m0:m0+MT, n0:n1] = x·Wᵀ with xs: x as fp32 in staged32 order. Steps of kStep weights (64 when
// K % 64 == 0 and blocksize >= 64: one scale per 64) share one scale per row.
template <int MT, int kStep, typename scalar_t>
FASTPEFT_AVX512 void gemv_fp32_rows(const float* xs, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                                    const scalar_t* bias, scalar_t* y, int64_t m0, int64_t N, int64_t K, int shift,
                                    int64_t n0, int64_t n1) {
  const __m512 table = _mm512_loadu_ps(qmap);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t e0 = n * K;
    for (int64_t k = 0; k < K; k += kStep) {
      __m512 w[kStep / 16];
      for (int h = 0; h < kStep / 32; ++h) decode16(raw + ((e0 + k) >> 1) + 16 * h, table, w[2 * h], w[2 * h + 1]);
      const __m512 scale = _mm512_set1_ps(absmax((e0 + k) >> shift));
      for (int m = 0; m < MT; ++m) {
        const float* xk = xs + (m0 + m) * K + k;
        // two chains per step (even and odd codes), joined before the scale
        __m512 p = _mm512_mul_ps(w[0], _mm512_loadu_ps(xk));
        __m512 q = _mm512_mul_ps(w[1], _mm512_loadu_ps(xk + 16));
        for (int i = 2; i < kStep / 16; i += 2) {
          p = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(xk + 16 * i), p);
          q = _mm512_fmadd_ps(w[i + 1], _mm512_loadu_ps(xk + 16 * i + 16), q);
        }
        acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p, q), scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      float v = sum16(acc[m]);
      if (bias) v += static_cast<float>(bias[n]);
      y[(m0 + m) * N + n] = static_cast<scalar_t>(v);
    }
  }
}

template <int kStep, typename scalar_t>
void gemv_fp32_row_range(const float* xs, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                         const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift, int64_t n0,
                         int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) gemv_fp32_rows<4, kStep>(xs, raw, absmax, qmap, bias, y, m0, N, K, shift, n0, n1);
  switch (M - m0) {
    case 3: gemv_fp32_rows<3, kStep>(xs, raw, absmax, qmap, bias, y, m0, N, K, shift, n0, n1); break;
    case 2: gemv_fp32_rows<2, kStep>(xs, raw, absmax, qmap, bias, y, m0, N, K, shift, n0, n1); break;
    case 1: gemv_fp32_rows<1, kStep>(xs, raw, absmax, qmap, bias, y, m0, N, K, shift, n0, n1); break;
    default: break;
  }
}

template <typename scalar_t>
void gemv_fp32(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
               const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  float* xs = scratch<float>(M * K, 0);
  stage_fp32(x, M, K, xs);
  const bool step64 = steps_of_64_fit(K, int64_t{1} << shift);
  for_each_row_block(N, [&](int64_t n0, int64_t n1) {
    if (step64)
      gemv_fp32_row_range<64>(xs, raw, absmax, qmap, bias, y, M, N, K, shift, n0, n1);
    else
      gemv_fp32_row_range<32>(xs, raw, absmax, qmap, bias, y, M, N, K, shift, n0, n1);
  });
}

// ---------------------------------------------------------------- GEMV, bf16 dot products

// The dithered bf16 levels as vpermw tables: table t holds its 16 levels twice (vpermw reads an
// index's low 5 bits, so a byte's low nibble needs no mask: bit 4 picks the copy).
FASTPEFT_AVX512 void load_level_tables(const float* qmap, __m512i tables[kDitherTables]) {
  uint16_t levels[kDitherTables][16];
  dithered_bf16_levels(qmap, levels);
  alignas(64) uint16_t words[32];
  for (int t = 0; t < kDitherTables; ++t) {
    for (int c = 0; c < 16; ++c) words[c] = words[c + 16] = levels[t][c];
    tables[t] = _mm512_load_si512(words);
  }
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ with xs: bf16 x in staged64 order (kStep = 64) or staged32 (32).
template <int MT, int kStep>
FASTPEFT_AVX512_BF16 void gemv_bf16_rows(const bf16_bits* xs, const uint8_t* raw, const Nf4Scales& absmax,
                                         const __m512i* tables, const c10::BFloat16* bias, c10::BFloat16* y,
                                         int64_t m0, int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t e0 = n * K;
    for (int64_t k = 0; k < K; k += kStep) {
      const uint8_t* bytes = raw + ((e0 + k) >> 1);
      const __m512i table = tables[(k >> 6) & (kDitherTables - 1)];
      __m512bh w[kStep / 32];
      if constexpr (kStep == 64) {  // 32 bytes -> 32 high nibbles, 32 low
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
        w[0] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        w[1] = (__m512bh)_mm512_permutexvar_epi16(v, table);
      } else {  // 16 bytes -> 16 high nibbles, then 16 low, in one register
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
        const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(v, 4)), v, 1);
        w[0] = (__m512bh)_mm512_permutexvar_epi16(codes, table);
      }
      const __m512 scale = _mm512_set1_ps(absmax((e0 + k) >> shift));
      for (int m = 0; m < MT; ++m) {
        const bf16_bits* xk = xs + (m0 + m) * K + k;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), w[0], (__m512bh)_mm512_loadu_si512(xk));
        if constexpr (kStep == 64) p = _mm512_dpbf16_ps(p, w[1], (__m512bh)_mm512_loadu_si512(xk + 32));
        acc[m] = _mm512_fmadd_ps(p, scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      float v = _mm512_reduce_add_ps(acc[m]);
      if (bias) v += static_cast<float>(bias[n]);
      y[(m0 + m) * N + n] = static_cast<c10::BFloat16>(v);
    }
  }
}

template <int kStep>
FASTPEFT_AVX512_BF16 void gemv_bf16_row_range(const bf16_bits* xs, const uint8_t* raw, const Nf4Scales& absmax,
                                              const float* qmap, const c10::BFloat16* bias, c10::BFloat16* y,
                                              int64_t M, int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  __m512i tables[kDitherTables];
  load_level_tables(qmap, tables);
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) gemv_bf16_rows<4, kStep>(xs, raw, absmax, tables, bias, y, m0, N, K, shift, n0, n1);
  switch (M - m0) {
    case 3: gemv_bf16_rows<3, kStep>(xs, raw, absmax, tables, bias, y, m0, N, K, shift, n0, n1); break;
    case 2: gemv_bf16_rows<2, kStep>(xs, raw, absmax, tables, bias, y, m0, N, K, shift, n0, n1); break;
    case 1: gemv_bf16_rows<1, kStep>(xs, raw, absmax, tables, bias, y, m0, N, K, shift, n0, n1); break;
    default: break;
  }
}

// ---------------------------------------------------------------- bf16 tiles

// How far ahead the panel decode asks for packed bytes (one cache line per 128 weights): the rows
// stream from memory, and the hardware prefetcher alone left the decode waiting (M = 16, 4096 x
// 4096, 8 layers: 2.07 ms without, 1.77-1.95 with 1-4 KiB ahead, in the standalone loop).
constexpr int64_t kPrefetchBytes = 4096;

// Weight rows [n0, n1) decoded into a bf16 panel (row n at panel + (n - n0)·K, columns in staged32
// order), each weight the fp32 product level·absmax rounded to nearest even: the reference's bf16.
FASTPEFT_AVX512_BF16 void decode_panel(const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                                       int64_t K, int64_t n0, int64_t n1, bf16_bits* panel) {
  const __m512 table = _mm512_loadu_ps(qmap);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t e0 = n * K;
    bf16_bits* row = panel + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 32) {
      const uint8_t* bytes = raw + ((e0 + k) >> 1);
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchBytes, _MM_HINT_T0);
      __m512 even, odd;
      decode16(bytes, table, even, odd);
      const __m512 scale = _mm512_set1_ps(absmax((e0 + k) >> shift));
      // low 16 words from the second operand: the even columns first, as staged32 orders them
      _mm512_storeu_si512(row + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(odd, scale), _mm512_mul_ps(even, scale)));
    }
  }
}

// y[m0:m0+MR, n0:n0+NR] = xs[m0:m0+MR]·panel[0:NR]ᵀ (+ bias), columns [n0, n_end) of y written
// (panel rows past n_end are padding). MR·NR accumulators of 16 lanes over K; per 32 columns MR + NR
// loads and MR·NR vdpbf16ps. The 16 lanes of each are summed once, at the end.
template <int MR, int NR>
FASTPEFT_AVX512_BF16 void dot_tile(const bf16_bits* xs, const bf16_bits* panel, int64_t K,
                                   const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy, int64_t n0,
                                   int64_t n_end) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xs + m * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + j * K + k);
      for (int m = 0; m < MR; ++m) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], w, xv[m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR && n0 + j < n_end; ++j) {
      float v = _mm512_reduce_add_ps(acc[m][j]);
      if (bias) v += static_cast<float>(bias[n0 + j]);
      y[m * ldy + n0 + j] = static_cast<c10::BFloat16>(v);
    }
}

constexpr int kTileM = 4, kTileN = 6;

// Every row of x against panel rows [n0, n1) (padded with zero rows to a multiple of kTileN).
void dot_panel(const bf16_bits* xs, const bf16_bits* panel, int64_t M, int64_t K, const c10::BFloat16* bias,
               c10::BFloat16* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
    const bf16_bits* xm = xs + m0 * K;
    c10::BFloat16* ym = y + m0 * N;
    for (int64_t n = n0; n < n1; n += kTileN) {
      const bf16_bits* p = panel + (n - n0) * K;
      switch (std::min<int64_t>(kTileM, M - m0)) {
        case 4: dot_tile<4, kTileN>(xm, p, K, bias, ym, N, n, n1); break;
        case 3: dot_tile<3, kTileN>(xm, p, K, bias, ym, N, n, n1); break;
        case 2: dot_tile<2, kTileN>(xm, p, K, bias, ym, N, n, n1); break;
        default: dot_tile<1, kTileN>(xm, p, K, bias, ym, N, n, n1); break;
      }
    }
  }
}

// Panels of up to 48 rows, fewer for long rows so a panel stays within 256 KiB of L2 beside x.
int64_t panel_rows(int64_t K) { return std::clamp<int64_t>((256 * 1024 / (2 * K)) / kTileN, 1, 8) * kTileN; }

void tiles_bf16_forward(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                        int shift, int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0);
  bf16_bits* xs = scratch<bf16_bits>(M * K, 0);
  stage_bf16<32>(x.data_ptr<c10::BFloat16>(), M, K, xs);
  const c10::BFloat16* bp = bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t rows = panel_rows(K);
  for_each_row_block(N, rows, [&](int64_t n0, int64_t n1) {
    bf16_bits* panel = scratch<bf16_bits>(rows * K, 1);
    const int64_t padded = (n1 - n0 + kTileN - 1) / kTileN * kTileN;
    decode_panel(raw, absmax, qmap, shift, K, n0, n1, panel);
    std::fill(panel + (n1 - n0) * K, panel + padded * K, bf16_bits{0});
    dot_panel(xs, panel, M, K, bp, yp, N, n0, n1);
  });
}

// Columns [k0, k0 + width) of weight rows [a, b) decoded in natural order into out (row n at
// out + (n - n0)·ld), bf16 rounded as the reference rounds.
FASTPEFT_AVX512_BF16 void decode_columns(const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                                         int64_t K, int64_t k0, int64_t width, int64_t n0, int64_t a, int64_t b,
                                         bf16_bits* out, int64_t ld) {
  const __m512 table = _mm512_loadu_ps(qmap);
  alignas(64) uint16_t natural[32];  // word k of the natural order sits at staged32(k)
  for (int k = 0; k < 32; ++k) natural[k] = static_cast<uint16_t>(staged32(k));
  const __m512i order = _mm512_load_si512(natural);
  for (int64_t n = a; n < b; ++n) {
    bf16_bits* row = out + (n - n0) * ld;
    for (int64_t k = 0; k < width; k += 32) {
      const int64_t e = n * K + k0 + k;
      __m512 even, odd;
      decode16(raw + (e >> 1), table, even, odd);
      const __m512 scale = _mm512_set1_ps(absmax(e >> shift));
      const __m512i staged = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(odd, scale), _mm512_mul_ps(even, scale));
      _mm512_storeu_si512(row + k, _mm512_permutexvar_epi16(order, staged));
    }
  }
}

// dx = dy·W, tiles of kColumns columns of W: all N rows decoded, then torch's bf16 matmul (its
// fp32 accumulation, one rounding of each result, as the reference).
constexpr int64_t kColumns = 256;

void tiles_bf16_transposed(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                           int shift, int64_t N, int64_t K, at::Tensor& y) {
  at::Tensor tile = at::empty({N, std::min(kColumns, K)}, x.options());
  bf16_bits* tp = reinterpret_cast<bf16_bits*>(tile.data_ptr<c10::BFloat16>());
  for (int64_t k0 = 0; k0 < K; k0 += kColumns) {
    const int64_t width = std::min(kColumns, K - k0);
    at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
      decode_columns(raw, absmax, qmap, shift, K, k0, width, 0, a, b, tp, tile.size(1));
    });
    y.narrow(1, k0, width).copy_(at::mm(x, tile.narrow(1, 0, width)));
  }
}

}  // namespace

void gemv_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                 int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  dispatch_simd_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    gemv_fp32<scalar_t>(x.data_ptr<scalar_t>(), raw, absmax, qmap, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                        y.data_ptr<scalar_t>(), x.size(0), N, K, shift);
  });
}

void gemv_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                      int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "nf4_matmul: the bf16 GEMV takes bf16 x");
  const int64_t M = x.size(0);
  const bool step64 = steps_of_64_fit(K, int64_t{1} << shift);
  bf16_bits* xs = scratch<bf16_bits>(M * K, 0);
  if (step64)
    stage_bf16<64>(x.data_ptr<c10::BFloat16>(), M, K, xs);
  else
    stage_bf16<32>(x.data_ptr<c10::BFloat16>(), M, K, xs);
  const c10::BFloat16* bp = bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  for_each_row_block(N, [&](int64_t n0, int64_t n1) {
    if (step64)
      gemv_bf16_row_range<64>(xs, raw, absmax, qmap, bp, yp, M, N, K, shift, n0, n1);
    else
      gemv_bf16_row_range<32>(xs, raw, absmax, qmap, bp, yp, M, N, K, shift, n0, n1);
  });
}

void tiles_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                       int shift, int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "nf4_matmul: the bf16 tiles take bf16 x");
  if (transposed)
    tiles_bf16_transposed(x, raw, absmax, qmap, shift, N, K, y);
  else
    tiles_bf16_forward(x, raw, absmax, qmap, shift, N, K, bias, y);
}

}  // namespace fastpeft::nf4_cpu

#endif  // x86
