// nf4_matmul's AVX-512 paths (chosen at run time by nf4_matmul.cpp). Codes are widened to 16- or
// 32-bit lanes and looked up in a table of levels held in one register; a permute reads only an
// index's low bits, so a byte's low nibble needs no mask.
// - gemv_avx512 (AVX-512 F/BW/VL/DQ; fp32 and fp16 x, and bf16 x without AVX512_BF16): per absmax
//   block, the 16 levels times the block's absmax in fp32 (the reference's products), looked up with
//   vpermps, 16 codes at a time; x staged as fp32 in decode order; FMAs.
// - gemv_bf16_avx512 (AVX512_BF16; bf16 x, M <= 4): the dithered bf16 levels (nf4_matmul_cpu.h),
//   32 codes per vpermw, vdpbf16ps with bf16 x staged in decode order, the block's absmax applied to
//   each step's dot products by one FMA per row.
// - tiles_bf16_avx512 (AVX512_BF16; bf16 x, more rows): a panel of weight rows decoded once into
//   bf16, per block the levels times the absmax rounded to nearest even (the reference's bf16 weight,
//   bit for bit), then 4 x 6 tiles of dot products over K, 24 accumulators of 16 lanes kept in
//   registers (10 loads per 24 vdpbf16ps). Transposed (the backward): columns of bf16 weight decoded
//   the same way in natural order and multiplied by torch's bf16 matmul.
//
// On this project's AVX-512 machine (2 vCPUs of an AMD EPYC Zen 4 with AVX512_BF16) vdpbf16ps
// issues one 512-bit instruction (32 multiply-adds) per cycle, and so do most 512-bit permutes and
// conversions: the GEMV is bound by its instruction count. `fastpeft bench --op nf4_matmul` and the
// README give the figures beside bf16 nn.Linear and bitsandbytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <new>
#include <type_traits>

#include "nf4_matmul_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12's _mm512_reduce_add_ps and extract intrinsics start from _mm256_undefined_*(), which
// -Wall reports as (maybe-)uninitialized at every use: a false positive of the headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace fastpeft::nf4_cpu {
namespace {

#define FASTPEFT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FASTPEFT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

using bf16_bits = uint16_t;  // a bf16 value as its 16 bits

// Steps: the weights one table lookup round decodes, all in one absmax block. kStep = 64 (32 bytes)
// when K % 64 == 0 and blocksize >= 64, else 32 (16 bytes; K % 32 == 0, blocksize >= 32). Decode
// ("staged") order of a step: its high nibbles (even k) first, then its low nibbles (odd k); x is
// copied into that order once per call, so the weights are never reordered: column k of a step
// sits at (k & 1)·kStep/2 + k/2 of it.

// How far ahead the decodes ask for packed bytes: the rows stream from memory, and the hardware
// prefetcher alone left the panel decode waiting (M = 16, 4096 x 4096, 8 layers: 2.07 ms without,
// 1.77-1.95 with 1-4 KiB ahead, in a standalone loop).
constexpr int64_t kPrefetchBytes = 4096;

// 16 values of x as fp32.
template <typename scalar_t>
FASTPEFT_AVX512 inline __m512 load16_as_fp32(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bf16: its 16 bits are the top half of the fp32
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>);
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
}

// x's rows in staged order, as fp32 (fp32 GEMV). K % kStep == 0.
template <int kStep, typename scalar_t>
FASTPEFT_AVX512 void stage_fp32(const scalar_t* x, int64_t M, int64_t K, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < M * K; i += kStep) {
    for (int h = 0; h < kStep / 32; ++h) {  // 32 columns: 16 even, 16 odd
      const __m512 a = load16_as_fp32(x + i + 32 * h), b = load16_as_fp32(x + i + 32 * h + 16);
      _mm512_storeu_ps(out + i + 16 * h, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(out + i + kStep / 2 + 16 * h, _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

// bf16 x's rows in staged order. K % kStep == 0.
template <int kStep>
FASTPEFT_AVX512 void stage_bf16(const c10::BFloat16* x, int64_t M, int64_t K, bf16_bits* out) {
  alignas(64) uint16_t evens[32], odds[32];
  for (int j = 0; j < 32; ++j) {  // kStep 64: from two registers; 32: both halves from one
    evens[j] = static_cast<uint16_t>(kStep == 64 || j < 16 ? 2 * j : 2 * (j - 16) + 1);
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

// Room for x staged: n values of T (float or bf16 bits), freed when the call returns.
template <typename T>
struct Staged {
  at::Tensor storage;
  T* data;
  explicit Staged(int64_t n)
      : storage(at::empty({n}, at::TensorOptions().dtype(std::is_same_v<T, float> ? at::kFloat : at::kBFloat16))),
        data(reinterpret_cast<T*>(storage.data_ptr())) {}
};

// A thread's panel buffer, kept for the thread's life and grown to the largest panel asked for (at
// most 48 rows, and under 256 KiB for K <= 21845): the tiles run hundreds of times a second, and a
// fresh buffer of this size is a fresh mmap, page faults and all. Cache-line aligned, as every
// panel row then is (K % 32 == 0): a 64-byte load that straddles two lines costs two.
bf16_bits* panel_buffer(int64_t n) {
  struct Free {
    void operator()(bf16_bits* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  thread_local std::unique_ptr<bf16_bits[], Free> buffer;
  thread_local int64_t size = 0;
  if (size < n) {
    buffer.reset(new (std::align_val_t(64)) bf16_bits[n]);
    size = n;
  }
  return buffer.get();
}

// ---------------------------------------------------------------- decoding a step

// fp32: the 16 scaled levels in one register; a step's codes as 32-bit lane indices.
FASTPEFT_AVX512 inline __m512 fp32_table(__m512 levels, float absmax) {
  return _mm512_mul_ps(levels, _mm512_set1_ps(absmax));
}

// kStep weights from kStep / 2 bytes: w[0 .. kStep/32) the even columns, then the odd ones.
template <int kStep>
FASTPEFT_AVX512 inline void decode_fp32(const uint8_t* bytes, __m512 table, __m512 w[kStep / 16]) {
  for (int h = 0; h < kStep / 32; ++h) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * h)));
    w[h] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    w[kStep / 32 + h] = _mm512_permutexvar_ps(v, table);  // vpermps reads the low 4 bits: the low nibble
  }
}

// bf16: the 16 scaled levels rounded to nearest even, twice in 32 words (vpermw reads an index's
// low 5 bits: bit 4, the high nibble's lowest bit in a whole byte, picks the copy; the GEMV's
// dithered tables are laid out the same way).
FASTPEFT_AVX512_BF16 inline __m512i bf16_table(__m512 levels, float absmax) {
  const __m512 scaled = _mm512_mul_ps(levels, _mm512_set1_ps(absmax));
  return (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);  // one rounding instruction fills both halves
}

// kStep weights from kStep / 2 bytes, staged: w[0] the even columns (then, for 64, w[1] the odd).
template <int kStep>
FASTPEFT_AVX512_BF16 inline void decode_bf16(const uint8_t* bytes, __m512i table, __m512i w[kStep / 32]) {
  if constexpr (kStep == 64) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    w[0] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
    w[1] = _mm512_permutexvar_epi16(v, table);
  } else {  // 16 high nibbles, then 16 low, in one register
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    w[0] = _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(v, 4)), v, 1), table);
  }
}

// ---------------------------------------------------------------- GEMV, fp32

// y[m0:m0+MT, n0:n1] = x·Wᵀ with xs: x as fp32 in staged order. Two chains per row (even and odd
// columns) hide the FMA latency.
template <int MT, int kStep, typename scalar_t>
FASTPEFT_AVX512 void gemv_fp32_rows(const float* xs, const uint8_t* raw, const Nf4Scales& absmax_in,
                                    const float* qmap, const scalar_t* bias, scalar_t* y, int64_t m0, int64_t N,
                                    int64_t K, int shift, int64_t n0, int64_t n1) {
  const Nf4Scales absmax = absmax_in;  // its pointers in registers, not reloaded per step
  const __m512 levels = _mm512_loadu_ps(qmap);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const int64_t e0 = n * K;
    for (int64_t k = 0; k < K; k += kStep) {
      __m512 w[kStep / 16];
      decode_fp32<kStep>(raw + ((e0 + k) >> 1), fp32_table(levels, absmax((e0 + k) >> shift)), w);
      for (int m = 0; m < MT; ++m) {
        const float* xk = xs + (m0 + m) * K + k;
        for (int i = 0; i < kStep / 16; ++i) acc[m][i & 1] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(xk + 16 * i), acc[m][i & 1]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
      if (bias) v += static_cast<float>(bias[n]);
      y[(m0 + m) * N + n] = static_cast<scalar_t>(v);
    }
  }
}

template <int kStep, typename scalar_t>
void gemv_fp32(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
               const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  Staged<float> staged(M * K);
  float* xs = staged.data;
  stage_fp32<kStep>(x, M, K, xs);
  for_each_row_block(N, [&](int64_t n0, int64_t n1) {
    for_each_row_group(M, [&](auto rows, int64_t m0) {
      gemv_fp32_rows<rows.value, kStep>(xs, raw, absmax, qmap, bias, y, m0, N, K, shift, n0, n1);
    });
  });
}

// ---------------------------------------------------------------- GEMV, bf16 dot products

// The dithered bf16 levels (nf4_matmul_cpu.h) as vpermw tables: table t holds its 16 levels twice,
// so a whole byte's low 5 bits index it (bit 4 picks the copy) and its low nibble needs no mask.
FASTPEFT_AVX512 void load_dithered_tables(const float* qmap, __m512i tables[kDitherTables]) {
  uint16_t levels[kDitherTables][16];
  dithered_bf16_levels(qmap, levels);
  alignas(64) uint16_t words[32];
  for (int t = 0; t < kDitherTables; ++t) {
    for (int c = 0; c < 16; ++c) words[c] = words[c + 16] = levels[t][c];
    tables[t] = _mm512_load_si512(words);
  }
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ with xs: bf16 x in staged order. The levels are looked up unscaled and
// each step's dot products take the block's absmax in one FMA per row: 7 vector instructions per 64
// weights for one row, where looking up scaled tables (a multiply and a rounding per step, the
// tiles' way) took 9. On Zen 4 most 512-bit instructions issue one per cycle, and the GEMV is bound
// by them: 0.75-0.97 ms per layer on one thread with scaled tables.
template <int MT, int kStep>
FASTPEFT_AVX512_BF16 void gemv_bf16_rows(const bf16_bits* xs, const uint8_t* raw, const Nf4Scales& absmax_in,
                                         const __m512i* tables, const c10::BFloat16* bias, c10::BFloat16* y,
                                         int64_t m0, int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  const Nf4Scales absmax = absmax_in;  // its pointers in registers, not reloaded per step
  const bf16_bits* xm = xs + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t e0 = n * K;
    const uint8_t* row = raw + (e0 >> 1);
    for (int64_t k = 0; k < K; k += kStep) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1)) + kPrefetchBytes, _MM_HINT_T0);
      __m512i w[kStep / 32];
      decode_bf16<kStep>(row + (k >> 1), tables[(k >> 6) & (kDitherTables - 1)], w);
      const __m512 scale = _mm512_set1_ps(absmax((e0 + k) >> shift));
      for (int m = 0; m < MT; ++m) {
        const bf16_bits* xk = xm + m * K + k;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(xk));
        if constexpr (kStep == 64) p = _mm512_dpbf16_ps(p, (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(xk + 32));
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
void gemv_bf16_row_range(const bf16_bits* xs, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                         const c10::BFloat16* bias, c10::BFloat16* y, int64_t M, int64_t N, int64_t K, int shift,
                         int64_t n0, int64_t n1) {
  __m512i tables[kDitherTables];
  load_dithered_tables(qmap, tables);
  for_each_row_group(M, [&](auto rows, int64_t m0) {
    gemv_bf16_rows<rows.value, kStep>(xs, raw, absmax, tables, bias, y, m0, N, K, shift, n0, n1);
  });
}

template <int kStep>
void gemv_bf16(const c10::BFloat16* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
               const c10::BFloat16* bias, c10::BFloat16* y, int64_t M, int64_t N, int64_t K, int shift) {
  Staged<bf16_bits> staged(M * K);
  bf16_bits* xs = staged.data;
  stage_bf16<kStep>(x, M, K, xs);
  for_each_row_block(N, [&](int64_t n0, int64_t n1) {
    gemv_bf16_row_range<kStep>(xs, raw, absmax, qmap, bias, y, M, N, K, shift, n0, n1);
  });
}

// ---------------------------------------------------------------- bf16 tiles

// Weight rows [n0, n1) decoded into a bf16 panel (row n at panel + (n - n0)·K, staged order).
template <int kStep>
FASTPEFT_AVX512_BF16 void decode_panel(const uint8_t* raw, const Nf4Scales& absmax_in, const float* qmap, int shift,
                                       int64_t K, int64_t n0, int64_t n1, bf16_bits* panel) {
  const Nf4Scales absmax = absmax_in;
  const __m512 levels = _mm512_loadu_ps(qmap);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t e0 = n * K;
    const uint8_t* row = raw + (e0 >> 1);
    bf16_bits* out = panel + (n - n0) * K;
    for (int64_t k = 0; k < K; k += kStep) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k >> 1)) + kPrefetchBytes, _MM_HINT_T0);
      __m512i w[kStep / 32];
      decode_bf16<kStep>(row + (k >> 1), bf16_table(levels, absmax((e0 + k) >> shift)), w);
      for (int i = 0; i < kStep / 32; ++i) _mm512_storeu_si512(out + k + 32 * i, w[i]);
    }
  }
}

// sums[j] = the sum of v[j]'s 16 lanes, j < NR <= 8: halves added, then one transposing tree of
// horizontal adds for all of them (22 instructions for 6 sums, against 48 summing each alone).
template <int NR>
FASTPEFT_AVX512 inline void lane_sums(const __m512 (&v)[NR], float sums[8]) {
  static_assert(NR <= 8);
  __m256 h[8];
  for (int j = 0; j < 8; ++j)
    h[j] = j < NR ? _mm256_add_ps(_mm512_castps512_ps256(v[j]), _mm512_extractf32x8_ps(v[j], 1)) : _mm256_setzero_ps();
  const __m256 a0 = _mm256_hadd_ps(h[0], h[1]), a1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 a2 = _mm256_hadd_ps(h[4], h[5]), a3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);  // per 128-bit half: sums 0-3, 4-7
  _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31)));
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
  for (int m = 0; m < MR; ++m) {
    float sums[8];
    lane_sums<NR>(acc[m], sums);
    for (int j = 0; j < NR && n0 + j < n_end; ++j)
      y[m * ldy + n0 + j] = static_cast<c10::BFloat16>(sums[j] + (bias ? static_cast<float>(bias[n0 + j]) : 0.f));
  }
}

constexpr int kTileN = 6;  // tiles of 4 x rows (for_each_row_group) by 6 weight rows

// Every row of x against panel rows [n0, n1) (padded with zero rows to a multiple of kTileN).
void dot_panel(const bf16_bits* xs, const bf16_bits* panel, int64_t M, int64_t K, const c10::BFloat16* bias,
               c10::BFloat16* y, int64_t N, int64_t n0, int64_t n1) {
  for_each_row_group(M, [&](auto rows, int64_t m0) {
    for (int64_t n = n0; n < n1; n += kTileN)
      dot_tile<rows.value, kTileN>(xs + m0 * K, panel + (n - n0) * K, K, bias, y + m0 * N, N, n, n1);
  });
}

// Panels of up to 48 rows, fewer for long rows so a panel stays within 256 KiB of L2 beside x.
int64_t panel_rows(int64_t K) { return std::clamp<int64_t>((256 * 1024 / (2 * K)) / kTileN, 1, 8) * kTileN; }

template <int kStep>
void tiles_bf16_forward(const c10::BFloat16* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                        const c10::BFloat16* bias, c10::BFloat16* y, int64_t M, int64_t N, int64_t K, int shift) {
  Staged<bf16_bits> staged(M * K);
  bf16_bits* xs = staged.data;
  stage_bf16<kStep>(x, M, K, xs);
  const int64_t rows = panel_rows(K);
  for_each_row_block(N, rows, [&](int64_t n0, int64_t n1) {
    bf16_bits* panel = panel_buffer(rows * K);
    const int64_t padded = (n1 - n0 + kTileN - 1) / kTileN * kTileN;
    decode_panel<kStep>(raw, absmax, qmap, shift, K, n0, n1, panel);
    std::fill(panel + (n1 - n0) * K, panel + padded * K, bf16_bits{0});
    dot_panel(xs, panel, M, K, bias, y, N, n0, n1);
  });
}

constexpr int64_t kPrefetchRows = 8;

// Columns [k0, k0 + width) of weight rows [a, b) decoded in natural order into out (row n at
// out + n·ld). 16 bytes widened to 32-bit lanes, each lane's low word the high nibble (even k) and
// its high word the whole byte (the low nibble, for vpermw), give 32 codes in natural order.
FASTPEFT_AVX512_BF16 void decode_columns(const uint8_t* raw, const Nf4Scales& absmax_in, const float* qmap,
                                         int shift, int64_t K, int64_t k0, int64_t width, int64_t a, int64_t b,
                                         bf16_bits* out, int64_t ld) {
  const Nf4Scales absmax = absmax_in;
  const __m512 levels = _mm512_loadu_ps(qmap);
  for (int64_t n = a; n < b; ++n) {
    // rows are K / 2 bytes apart and only width / 2 of them are read: ask for the segment
    // kPrefetchRows ahead, which the hardware prefetcher does not foresee
    const char* ahead = reinterpret_cast<const char*>(raw + (((n + kPrefetchRows) * K + k0) >> 1));
    for (int64_t line = 0; line < width / 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    for (int64_t k = 0; k < width; k += 32) {
      const int64_t e = n * K + k0 + k;
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(raw + (e >> 1))));
      const __m512i codes = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(v, 16));
      _mm512_storeu_si512(out + n * ld + k, _mm512_permutexvar_epi16(codes, bf16_table(levels, absmax(e >> shift))));
    }
  }
}

// dx = dy·W, tiles of kColumns columns of W: all N rows decoded, then torch's bf16 matmul (its
// fp32 accumulation, one rounding of each result, as the reference). M = 64, K = N = 4096: 7.1 ms
// against 7.0 for dy·W in bf16 (decoding 1.0 of it; 4.5 before the segments were prefetched).
constexpr int64_t kColumns = 256;

void tiles_bf16_transposed(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                           int shift, int64_t N, int64_t K, at::Tensor& y) {
  at::Tensor tile = at::empty({N, std::min(kColumns, K)}, x.options());
  bf16_bits* tp = reinterpret_cast<bf16_bits*>(tile.data_ptr<c10::BFloat16>());
  for (int64_t k0 = 0; k0 < K; k0 += kColumns) {
    const int64_t width = std::min(kColumns, K - k0);
    for_each_row_block(N, [&](int64_t a, int64_t b) {
      decode_columns(raw, absmax, qmap, shift, K, k0, width, a, b, tp, tile.size(1));
    });
    y.narrow(1, k0, width).copy_(at::mm(x, tile.narrow(1, 0, width)));
  }
}

}  // namespace

void gemv_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                 int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  dispatch_simd_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    with_widest_step(K, shift, [&](auto step) {
      gemv_fp32<step.value>(x.data_ptr<scalar_t>(), raw, absmax, qmap, bp, y.data_ptr<scalar_t>(), x.size(0), N, K,
                            shift);
    });
  });
}

void gemv_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                      int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "nf4_matmul: the bf16 GEMV takes bf16 x");
  const c10::BFloat16* bp = bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr;
  with_widest_step(K, shift, [&](auto step) {
    gemv_bf16<step.value>(x.data_ptr<c10::BFloat16>(), raw, absmax, qmap, bp, y.data_ptr<c10::BFloat16>(), x.size(0),
                          N, K, shift);
  });
}

void tiles_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                       int shift, int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "nf4_matmul: the bf16 tiles take bf16 x");
  if (transposed) return tiles_bf16_transposed(x, raw, absmax, qmap, shift, N, K, y);
  const c10::BFloat16* bp = bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr;
  with_widest_step(K, shift, [&](auto step) {
    tiles_bf16_forward<step.value>(x.data_ptr<c10::BFloat16>(), raw, absmax, qmap, bp, y.data_ptr<c10::BFloat16>(),
                                   x.size(0), N, K, shift);
  });
}

}  // namespace fastpeft::nf4_cpu

#endif  // x86
