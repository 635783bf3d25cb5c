// nf4_matmul's AVX2+FMA paths (chosen at run time by nf4_matmul.cpp): a GEMV for few rows that
// decodes the packed weight in registers with byte shuffles, and fp32 tiles for the rest.
//
// The GEMV reads the packed weight in steps (Step32, Step64: where a step's codes come from) and
// decodes each register of 32 4-bit codes (one code per byte) into four 8-float vectors, a
// 16-entry byte table per byte of the level looked up with one shuffle each (Levels: how wide the
// levels are, chosen by x's dtype):
// - Fp32Levels: the exact float levels (fp32 and fp16 x, and every tile), four shuffles and eight
//   unpacks.
// - Bf16Levels: levels in bf16 (the GEMV of bf16 x: the reference's bf16 weight carries 8
//   significant bits too), two shuffles and two unpacks, then each float is the top or the bottom
//   half of a 32-bit lane moved into place by a mask or a shift. Dithered (nf4_matmul_cpu.h).
//   Now only for bf16 x that is not finite or a quant map beyond [-1, 1].
// - Int16Levels (the GEMV of bf16 x): levels as 16-bit integers, x as 16-bit integers per step
//   (a power-of-two unit each), two shuffles and two unpacks per 32 codes, then vpmaddwd: 16
//   products per instruction summed exactly in 32-bit lanes, one conversion and one FMA per step.
//   More exact than Bf16Levels (levels within 3.1e-5, x within 2^-14 of its step's largest value)
//   and 1.5x faster: on the README's AMD EPYC Zen 4 capped at AVX2 (FASTPEFT_CPU_ISA=avx2; one
//   thread, double quant, M = 1, best of 7 interleaved rounds in one process, Bf16Levels forced
//   by a map the int16 path refuses), 4096 x 4096 0.62-0.65 ms against 0.96-0.99; SmolLM2's 210
//   layer shapes in order 7.8 against 10.1 ms (each call through torch.ops, about 2 ms of those).
//   Rejected: four weight rows per pass sharing each step's x (SmolLM2's shapes 10.2-10.9 ms, the
//   four streams slower from memory; 1-2 KiB prefetches did not recover it).
// x is stored once in the order that decode produces, so nothing is re-shuffled per weight row.
// Zen 3 runs shuffles and shifts on two of its four vector pipes, and the decode is bound by them.
// Measured on an AMD EPYC Zen 3 (AVX2; 4096 x 4096, double quant, M = 1, one thread, best of 30
// in a standalone loop): Fp32Levels with Step32 1.51-1.56 ms, with Step64 1.45-1.47; Bf16Levels
// with Step32 1.07-1.12, with Step64 1.02 (0.98 with a constant scale); the dithered tables' two
// extra loads per 64 weights cost 3-6 %.
// Rejected: two 8-entry float permutes and a blend per 8 codes (2.8 ms); 16-bit blends and shifts
// in place of Fp32Levels' last four unpacks (1.63 ms); the row's scales decoded into a buffer
// first (1.12 ms against Step64's 1.02).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "nf4_matmul_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace fastpeft::nf4_cpu {
namespace {

#define FASTPEFT_AVX2 __attribute__((target("avx2,fma")))

struct Step32 {  // 16 bytes: K % 32 == 0 and blocksize >= 32 keep a step in one block and row
  static constexpr int64_t kWeights = 32;
  static constexpr int kRegisters = 1;
  // lane 0: the high nibbles of the 16 bytes, lane 1: their low nibbles (a broadcast load, then a
  // 32-bit shift by 4 in lane 0 only)
  FASTPEFT_AVX2 static inline void codes(const uint8_t* bytes, __m256i out[1]) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    out[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                              _mm256_set1_epi8(0x0F));
  }
  // element k of the step (byte k / 2, high nibble when k is even) sits in register `reg`, byte slot
  // 16·lane + byte
  static int64_t slot_of(int64_t k, int& reg) {
    reg = 0;
    return ((k & 1) << 4) | (k >> 1);
  }
};

struct Step64 {  // 32 bytes: K % 64 == 0 and blocksize >= 64; one shift for 64 weights, one scale
  static constexpr int64_t kWeights = 64;
  static constexpr int kRegisters = 2;
  // register 0: the high nibbles of the 32 bytes, register 1: their low nibbles
  FASTPEFT_AVX2 static inline void codes(const uint8_t* bytes, __m256i out[2]) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    out[0] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    out[1] = _mm256_and_si256(v, low4);
  }
  static int64_t slot_of(int64_t k, int& reg) {
    reg = static_cast<int>(k & 1);
    return k >> 1;
  }
};

// Each code's 16-bit level from two byte tables (planes[0] its low bytes, planes[1] its high
// bytes): byte slots 0-7 and 16-23 in out[0], 8-15 and 24-31 in out[1].
FASTPEFT_AVX2 inline void lookup_16bit_levels(__m256i codes, const __m256i* planes, __m256i out[2]) {
  const __m256i b0 = _mm256_shuffle_epi8(planes[0], codes);
  const __m256i b1 = _mm256_shuffle_epi8(planes[1], codes);
  out[0] = _mm256_unpacklo_epi8(b0, b1);
  out[1] = _mm256_unpackhi_epi8(b0, b1);
}

struct Fp32Levels {
  static constexpr int kPlanes = 4;  // bytes per level
  static constexpr int kTables = 1;  // level tables, taken in turn by 64-column groups of k
  static void level_bits(const float* qmap, uint32_t bits[kTables][16]) { std::memcpy(bits[0], qmap, 64); }
  // where the code in byte slot j (lane j / 16, byte q = j % 16) lands among the 32 decoded floats
  static int64_t position_of(int64_t j) {
    const int64_t q = j & 15;
    return 8 * (q >> 2) + 4 * (j >> 4) + (q & 3);
  }
  FASTPEFT_AVX2 static inline void decode(__m256i codes, const __m256i* planes, __m256 out[4]) {
    const __m256i b0 = _mm256_shuffle_epi8(planes[0], codes);
    const __m256i b1 = _mm256_shuffle_epi8(planes[1], codes);
    const __m256i b2 = _mm256_shuffle_epi8(planes[2], codes);
    const __m256i b3 = _mm256_shuffle_epi8(planes[3], codes);
    const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  }
};

struct Bf16Levels {
  static constexpr int kPlanes = 2;
  static constexpr int kTables = kDitherTables;
  static void level_bits(const float* qmap, uint32_t bits[kTables][16]) {
    uint16_t levels[kTables][16];
    dithered_bf16_levels(qmap, levels);
    for (int t = 0; t < kTables; ++t)
      for (int c = 0; c < 16; ++c) bits[t][c] = levels[t][c];
  }
  static int64_t position_of(int64_t j) {
    const int64_t q = j & 15;
    return 8 * (2 * (q >> 3) + (q & 1)) + 4 * (j >> 4) + ((q & 7) >> 1);
  }
  FASTPEFT_AVX2 static inline void decode(__m256i codes, const __m256i* planes, __m256 out[4]) {
    __m256i bf16[2];  // 16 bf16 each
    lookup_16bit_levels(codes, planes, bf16);
    const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(bf16[0], 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(bf16[0], top));
    out[2] = _mm256_castsi256_ps(_mm256_slli_epi32(bf16[1], 16));
    out[3] = _mm256_castsi256_ps(_mm256_and_si256(bf16[1], top));
  }
};

// 16-bit integer levels (the GEMV of bf16 x with finite values and levels within [-1, 1]): level c
// as round(16383·qmap[c]) (3.1e-5 of the absmax off at most, against bf16's 2^-9 of the weight),
// x staged as 16-bit integers in steps scaled by a power of two, and 16 products per vpmaddwd
// summed exactly in 32-bit lanes; each step's sum then converted and scaled once. Two shuffles and
// two unpacks per 32 codes, as Bf16Levels, without its four masks and shifts and with half the
// multiplies.
struct Int16Levels {
  static constexpr int kPlanes = 2;
  static constexpr int kTables = 1;
  static constexpr float kOne = 16383.f;  // the integer of level 1.0: 8 products of |x| <= 2^14 stay below 2^31
  static void level_bits(const float* qmap, uint32_t bits[kTables][16]) {
    for (int c = 0; c < 16; ++c) bits[0][c] = static_cast<uint16_t>(static_cast<int16_t>(std::lrint(qmap[c] * kOne)));
  }
  static bool takes(const float* qmap) {
    for (int c = 0; c < 16; ++c)
      if (!(std::fabs(qmap[c]) <= 1.f)) return false;
    return true;
  }
  // slot j's level lands in register q / 8 (q = j % 16), 16-bit lane 8·(j / 16) + q % 8
  static int64_t position_of(int64_t j) {
    const int64_t q = j & 15;
    return 16 * (q >> 3) + 8 * (j >> 4) + (q & 7);
  }
  FASTPEFT_AVX2 static inline void decode(__m256i codes, const __m256i* planes, __m256i out[2]) {
    lookup_16bit_levels(codes, planes, out);
  }
};

// The shuffle tables: planes[t·kPlanes + j] holds byte j of each of level table t's 16 levels,
// twice (once per 128-bit lane).
template <typename Levels>
FASTPEFT_AVX2 void load_planes(const float* qmap, __m256i planes[Levels::kTables * Levels::kPlanes]) {
  uint32_t bits[Levels::kTables][16];
  Levels::level_bits(qmap, bits);
  alignas(32) uint8_t table[32];
  for (int t = 0; t < Levels::kTables; ++t)
    for (int j = 0; j < Levels::kPlanes; ++j) {
      for (int c = 0; c < 16; ++c) table[c] = table[c + 16] = static_cast<uint8_t>(bits[t][c] >> (8 * j));
      planes[t * Levels::kPlanes + j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(table));
    }
}

// The tables for columns [k, k + 64): taken in turn by 64-column groups.
template <typename Levels>
inline const __m256i* planes_at(const __m256i* planes, int64_t k) {
  return planes + ((k >> 6) & (Levels::kTables - 1)) * Levels::kPlanes;
}

// Where element k of x goes in the staged copy: the decoded order of its step.
template <typename Step, typename Levels>
int64_t staged_position(int64_t k) {
  int reg;
  const int64_t slot = Step::slot_of(k % Step::kWeights, reg);
  return k - k % Step::kWeights + 32 * reg + Levels::position_of(slot);
}

FASTPEFT_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ. xs: x as fp32 in staged order, [M, K]. MT rows share each decoded
// step; MT is a template argument so their accumulators stay in registers (a runtime-indexed
// accumulator array lives on the stack, and the store-to-load round trip per step made the loop 2x
// slower). Each step's partial sum is one chain of FMAs; steps are independent, so out-of-order
// execution overlaps them and only the scaled accumulate is carried from step to step.
template <int MT, typename Step, typename Levels, typename Scales, typename scalar_t>
FASTPEFT_AVX2 void gemv_rows(const float* xs, const uint8_t* raw, const Scales& absmax, const __m256i* planes,
                             const scalar_t* bias, scalar_t* y, int64_t m0, int64_t N, int64_t K, int shift,
                             int64_t n0, int64_t n1) {
  // one row alone gets a chain per code register (two FMA chains in flight within a step)
  constexpr int kChains = MT == 1 ? Step::kRegisters : 1;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    const int64_t e0 = n * K;
    for (int64_t k = 0; k < K; k += Step::kWeights) {
      __m256i codes[Step::kRegisters];
      Step::codes(raw + ((e0 + k) >> 1), codes);
      __m256 part[kChains][MT];
      for (int r = 0; r < Step::kRegisters; ++r) {
        __m256 w[4];
        Levels::decode(codes[r], planes_at<Levels>(planes, k), w);
        for (int m = 0; m < MT; ++m) {
          const float* xk = xs + (m0 + m) * K + k + 32 * r;
          __m256& p = part[r % kChains][m];
          p = r < kChains ? _mm256_mul_ps(w[0], _mm256_loadu_ps(xk)) : _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk), p);
          for (int i = 1; i < 4; ++i) p = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xk + 8 * i), p);
        }
      }
      const __m256 scale = _mm256_set1_ps(absmax((e0 + k) >> shift));
      for (int m = 0; m < MT; ++m) {
        if constexpr (kChains == 2)
          acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[0][m], part[1][m]), scale, acc[m]);
        else
          acc[m] = _mm256_fmadd_ps(part[0][m], scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      float v = horizontal_sum(acc[m]);
      if (bias) v += static_cast<float>(bias[n]);
      y[(m0 + m) * N + n] = static_cast<scalar_t>(v);
    }
  }
}

// All M rows, 4 at a time (the rest 1..3): the packed weight is read ceil(M / 4) times, from cache
// after the first when the row range is small.
template <typename Step, typename Levels, typename Scales, typename scalar_t>
void gemv_row_range(const float* xs, const uint8_t* raw, const Scales& absmax, const __m256i* planes,
                    const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift, int64_t n0,
                    int64_t n1) {
  for_each_row_group(M, [&](auto rows, int64_t m0) {
    gemv_rows<rows.value, Step, Levels>(xs, raw, absmax, planes, bias, y, m0, N, K, shift, n0, n1);
  });
}

// x rows converted to fp32 once, in staged order ([M, K]: M·K·4 bytes, at most 256 KiB for
// M = 16, K = 4096), then the weight streamed once. The level tables are built once per call and
// read by every row block's thread.
template <typename Step, typename Levels, typename scalar_t>
void gemv_staged(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                 const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  std::vector<float> xs(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * K + staged_position<Step, Levels>(k)] = static_cast<float>(x[m * K + k]);
  __m256i planes[Levels::kTables * Levels::kPlanes];
  load_planes<Levels>(qmap, planes);
  with_fixed_scales(absmax, [&](const auto& scales) {
    for_each_row_block(N, [&](int64_t n0, int64_t n1) {
      gemv_row_range<Step, Levels>(xs.data(), raw, scales, planes, bias, y, M, N, K, shift, n0, n1);
    });
  });
}

template <typename Levels, typename scalar_t>
void gemv_steps(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  if (steps_of_64_fit(K, int64_t{1} << shift))
    gemv_staged<Step64, Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
  else
    gemv_staged<Step32, Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
}

// The sums of eight vectors, lane j the sum of v[j]'s lanes.
FASTPEFT_AVX2 inline __m256 horizontal_sums8(const __m256 v[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ with Int16Levels. xq, xscale, row_unit: x as stage_int16 stages it.
// Weight rows are reduced eight at a time: one by one, the horizontal sum and the scalar tail took
// about a sixth of the time of K = 576 rows (9 steps each; perf, SmolLM2's generation).
template <int MT, typename Step, typename Scales, typename scalar_t>
FASTPEFT_AVX2 void gemv_rows_int16(const int16_t* xq, const float* xscale, const double* row_unit, const uint8_t* raw,
                                   const Scales& absmax_in, const __m256i* planes, const scalar_t* bias, scalar_t* y,
                                   int64_t m0, int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  const Scales absmax = absmax_in;  // its pointers in registers, not reloaded per step
  const int64_t steps = K / Step::kWeights;
  for (int64_t nb = n0; nb < n1; nb += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, n1 - nb));
    __m256 acc[MT][8];  // row j's sums, stored after its last step (its own stay in registers)
    for (int j = rows; j < 8; ++j)
      for (int m = 0; m < MT; ++m) acc[m][j] = _mm256_setzero_ps();
    for (int j = 0; j < rows; ++j) {
      const int64_t e0 = (nb + j) * K;
      __m256 a[MT];
      for (int m = 0; m < MT; ++m) a[m] = _mm256_setzero_ps();
      for (int64_t k = 0, s = 0; k < K; k += Step::kWeights, ++s) {
        __m256i codes[Step::kRegisters];
        Step::codes(raw + ((e0 + k) >> 1), codes);
        __m256i sum[MT];
        for (int r = 0; r < Step::kRegisters; ++r) {
          __m256i w[2];
          Int16Levels::decode(codes[r], planes, w);
          for (int m = 0; m < MT; ++m) {
            const __m256i* xk = reinterpret_cast<const __m256i*>(xq + (m0 + m) * K + k + 32 * r);
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(xk)),
                                               _mm256_madd_epi16(w[1], _mm256_loadu_si256(xk + 1)));
            sum[m] = r == 0 ? p : _mm256_add_epi32(sum[m], p);
          }
        }
        const float scale = absmax((e0 + k) >> shift);
        for (int m = 0; m < MT; ++m)
          a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_set1_ps(scale * xscale[(m0 + m) * steps + s]),
                                 a[m]);
      }
      for (int m = 0; m < MT; ++m) acc[m][j] = a[m];
    }
    for (int m = 0; m < MT; ++m) {
      alignas(32) float sums[8];
      _mm256_store_ps(sums, horizontal_sums8(acc[m]));
      for (int j = 0; j < rows; ++j) {
        float out = static_cast<float>(sums[j] * row_unit[m0 + m]);
        if (bias) out += static_cast<float>(bias[nb + j]);
        y[(m0 + m) * N + nb + j] = static_cast<scalar_t>(out);
      }
    }
  }
}

// Where each element of a step sits in its staged order (Int16Levels' decode order).
template <typename Step>
struct Int16StagedOrder {
  int64_t at[Step::kWeights];
  Int16StagedOrder() {
    for (int64_t i = 0; i < Step::kWeights; ++i) at[i] = staged_position<Step, Int16Levels>(i);
  }
};

// x as 16-bit integers in staged order, a power-of-two unit per row and step (the largest |x| of
// the step below 2^14 units: x is off by at most 2^-14 of that largest value, where bf16 x itself
// carries 8 significant bits); false (nothing staged) when some x is not finite. Row m's step s
// unit is xscale[m · steps + s] · row_unit[m]: xscale relative to the row's largest step (<= 1, a
// power of two; 0 for a step of zeros), so the GEMV's sums stay near |w|·2^28 whatever x's
// magnitude, and row_unit (a double, with the levels' 1 / 16383) scales each result once.
// 8 bf16 as fp32, exactly (a bf16 is a float's top half).
FASTPEFT_AVX2 inline __m256 load8_bf16_as_fp32(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// 2^e as a float, for e in float's normal range [-126, 127] (no libm call: a decode step stages
// x in every layer call).
inline float exp2_normal(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// [a0 a2 b0 b2 | a4 a6 b4 b6] (the evens of two 8-float vectors, per 128-bit lane; the odds alike)
// as a0 a2 a4 a6 b0 b2 b4 b6, rounded to int32
FASTPEFT_AVX2 inline __m256i in_order_epi32(__m256 pairs) {
  return _mm256_cvtps_epi32(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8)));
}

// 16 int32 (each within int16) as int16: lo's eight, then hi's
FASTPEFT_AVX2 inline __m256i packed_epi16(__m256i lo, __m256i hi) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
}

// One 64-weight step of x staged as Step64 decodes it (Int16StagedOrder<Step64>): the even k (high
// nibbles) first, then the odd, each half in the order of k / 2 = 0-7, 16-23, 8-15, 24-31
// (Int16Levels::position_of swaps bits 3 and 4 of the slot). Rounded as the scalar staging rounds.
FASTPEFT_AVX2 inline void stage_step64_int16(const c10::BFloat16* in, __m256 to_units, int16_t* out) {
  __m256i even[4], odd[4];  // even[i]: units of x[16i + 2t], t = 0..7; odd[i]: of x[16i + 2t + 1]
  for (int i = 0; i < 4; ++i) {
    const __m256 a = _mm256_mul_ps(load8_bf16_as_fp32(in + 16 * i), to_units);
    const __m256 b = _mm256_mul_ps(load8_bf16_as_fp32(in + 16 * i + 8), to_units);
    even[i] = in_order_epi32(_mm256_shuffle_ps(a, b, 0x88));
    odd[i] = in_order_epi32(_mm256_shuffle_ps(a, b, 0xDD));
  }
  __m256i* o = reinterpret_cast<__m256i*>(out);  // |units| <= 2^14
  _mm256_storeu_si256(o, packed_epi16(even[0], even[2]));
  _mm256_storeu_si256(o + 1, packed_epi16(even[1], even[3]));
  _mm256_storeu_si256(o + 2, packed_epi16(odd[0], odd[2]));
  _mm256_storeu_si256(o + 3, packed_epi16(odd[1], odd[3]));
}

// Vectorised: a 576 x 192 layer's call at M = 1 took 7.5 us with a scalar staging, 7.1 with this
// one. Step64's order made by shuffles (stage_step64_int16) rather than a scalar scatter: the same
// layer's kernel 6.0 -> 5.6 us (AMD EPYC Zen 4 capped at AVX2, one thread), SmolLM2's capped
// generation 19.46 -> 19.16 ms a token (medians of 14 alternating rounds in one process).
template <typename Step>
FASTPEFT_AVX2 bool stage_int16(const c10::BFloat16* x, int64_t M, int64_t K, int16_t* xq, float* xscale,
                               double* row_unit) {
  static const Int16StagedOrder<Step> order;
  constexpr int kVectors = Step::kWeights / 8;
  const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 float_max = _mm256_set1_ps(std::numeric_limits<float>::max());
  const int64_t steps = K / Step::kWeights;
  thread_local std::vector<int> exponents;
  exponents.resize(steps);
  for (int64_t m = 0; m < M; ++m) {
    const c10::BFloat16* row = x + m * K;
    int row_exponent = std::numeric_limits<int>::min();
    for (int64_t s = 0; s < steps; ++s) {
      __m256 largest8 = _mm256_setzero_ps(), finite8 = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      for (int v = 0; v < kVectors; ++v) {
        const __m256 magnitude = _mm256_and_ps(load8_bf16_as_fp32(row + s * Step::kWeights + 8 * v), magnitude_bits);
        largest8 = _mm256_max_ps(largest8, magnitude);
        finite8 = _mm256_and_ps(finite8, _mm256_cmp_ps(magnitude, float_max, _CMP_LE_OQ));  // false for inf, nan
      }
      if (_mm256_movemask_ps(finite8) != 0xFF) return false;
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(largest8), _mm256_extractf128_ps(largest8, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float largest = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      uint32_t largest_bits;
      std::memcpy(&largest_bits, &largest, 4);
      if (largest_bits >= 0x00800000u)  // normal: largest < 2^exponent, as frexp gives it
        exponents[s] = static_cast<int>(largest_bits >> 23) - 126;
      else
        std::frexp(largest, &exponents[s]);
      if (largest > 0.f)
        row_exponent = std::max(row_exponent, exponents[s]);
      else
        exponents[s] = std::numeric_limits<int>::min();  // a step of zeros: xscale 0
    }
    if (row_exponent == std::numeric_limits<int>::min()) row_exponent = 0;  // a row of zeros
    row_unit[m] = std::ldexp(1.0, row_exponent - 14) / Int16Levels::kOne;
    for (int64_t s = 0; s < steps; ++s) {
      int16_t* out = xq + m * K + s * Step::kWeights;
      if (exponents[s] == std::numeric_limits<int>::min()) {
        std::fill(out, out + Step::kWeights, int16_t{0});
        xscale[m * steps + s] = 0.f;
        continue;
      }
      const int exponent = exponents[s];
      const c10::BFloat16* in = row + s * Step::kWeights;
      if (exponent >= -100) {  // rounded to the nearest unit, ties to even (the default MXCSR)
        if constexpr (std::is_same_v<Step, Step64>) {
          stage_step64_int16(in, _mm256_set1_ps(exp2_normal(14 - exponent)), out);  // exponent <= 128
        } else {
          const __m256 to_units = _mm256_set1_ps(exp2_normal(14 - exponent));
          alignas(32) int32_t units[Step::kWeights];
          for (int v = 0; v < kVectors; ++v)
            _mm256_store_si256(reinterpret_cast<__m256i*>(units + 8 * v),
                               _mm256_cvtps_epi32(_mm256_mul_ps(load8_bf16_as_fp32(in + 8 * v), to_units)));
          for (int64_t i = 0; i < Step::kWeights; ++i) out[order.at[i]] = static_cast<int16_t>(units[i]);
        }
      } else {  // |x| below 2^-100: the reciprocal of its unit is beyond float's range
        const double to_units = std::ldexp(1.0, 14 - exponent);
        for (int64_t i = 0; i < Step::kWeights; ++i)
          out[order.at[i]] = static_cast<int16_t>(std::nearbyint(static_cast<float>(in[i]) * to_units));
      }
      // 2^(exponent - row_exponent) >= 2^-149 unless the step is negligible beside the row's largest
      xscale[m * steps + s] = exponent - row_exponent >= -126 ? exp2_normal(exponent - row_exponent)
                                                               : std::ldexp(1.f, exponent - row_exponent);
    }
  }
  return true;
}

// The Int16Levels GEMV of finite x with levels in [-1, 1]; false (nothing written) otherwise.
template <typename Step, typename scalar_t>
bool gemv_int16(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  if (!Int16Levels::takes(qmap)) return false;
  // the staged x in buffers kept by the calling thread (at most 16 rows of K): a decode step's
  // calls are many and small, and each allocation is a trip through a busy heap. The row blocks'
  // threads read them through these pointers (a thread_local named there is the thread's own).
  thread_local std::vector<int16_t> xq_buffer;
  thread_local std::vector<float> xscale_buffer;
  thread_local std::vector<double> row_unit_buffer;
  xq_buffer.resize(M * K);
  xscale_buffer.resize(M * (K / Step::kWeights));
  row_unit_buffer.resize(M);
  int16_t* xq = xq_buffer.data();
  float* xscale = xscale_buffer.data();
  double* row_unit = row_unit_buffer.data();
  if (!stage_int16<Step>(x, M, K, xq, xscale, row_unit)) return false;
  __m256i planes[Int16Levels::kPlanes];  // built once per call, read by every row block's thread
  load_planes<Int16Levels>(qmap, planes);
  with_fixed_scales(absmax, [&](const auto& scales) {
    for_each_row_block(N, [&](int64_t n0, int64_t n1) {
      for_each_row_group(M, [&](auto rows, int64_t m0) {
        gemv_rows_int16<rows.value, Step>(xq, xscale, row_unit, raw, scales, planes, bias, y, m0, N, K, shift, n0, n1);
      });
    });
  });
  return true;
}

template <typename scalar_t>
bool int16_gemv(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  if (steps_of_64_fit(K, int64_t{1} << shift)) return gemv_int16<Step64>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
  return gemv_int16<Step32>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
}

// Weight rows [a, b) dequantised with the exact levels into `out` (row n at out + (n - n0)·K,
// fp32), columns in staged order.
template <typename Step>
FASTPEFT_AVX2 void dequantize_rows(const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                                   int64_t K, int64_t n0, int64_t a, int64_t b, float* out) {
  __m256i planes[Fp32Levels::kPlanes];
  load_planes<Fp32Levels>(qmap, planes);
  for (int64_t n = a; n < b; ++n) {
    const int64_t e0 = n * K;
    float* row = out + (n - n0) * K;
    for (int64_t k = 0; k < K; k += Step::kWeights) {
      __m256i codes[Step::kRegisters];
      Step::codes(raw + ((e0 + k) >> 1), codes);
      const __m256 scale = _mm256_set1_ps(absmax((e0 + k) >> shift));
      for (int r = 0; r < Step::kRegisters; ++r) {
        __m256 w[4];
        Fp32Levels::decode(codes[r], planes, w);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(row + k + 32 * r + 8 * i, _mm256_mul_ps(w[i], scale));
      }
    }
  }
}

// fp32 tiles of kTileRows weight rows decoded with the exact levels, their columns in staged
// order, so x's columns (or, transposed, the result's) are permuted the same way. The GEMMs run in
// fp32 whatever x's dtype (an AVX2 CPU has no bf16 matmul units: a bf16 nn.Linear at M = 64,
// K = N = 4096 took 101 ms against 23 ms in fp32 on a Zen 3). x is taken kChunkRows rows at a time
// so the fp32 copies stay small (each chunk decodes the weight again: 16 M weights take about
// 1 ms, a 1024 x 4096 x 4096 GEMM about 1 s there). The bias is added in fp32, so the result is
// rounded to y's dtype once.
constexpr int64_t kTileRows = 256;
constexpr int64_t kChunkRows = 1024;

template <typename Step>
void tiles(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift, int64_t N,
           int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
  at::Tensor staged = at::empty({K}, x.options().dtype(at::kLong));  // staged[k]: where column k sits in a tile
  int64_t* sp = staged.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) sp[k] = staged_position<Step, Fp32Levels>(k);
  const at::Tensor bias_f = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
  at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x.options().dtype(at::kFloat));
  const int64_t M = x.size(0);
  for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, M - m0);
    const at::Tensor xf = x.narrow(0, m0, rows).to(at::kFloat);
    // forward: x's columns staged (xs[:, staged[k]] = x[:, k]); transposed: dx accumulated staged
    const at::Tensor xs = transposed ? xf : at::empty_like(xf).index_copy_(1, staged, xf);
    at::Tensor dx = transposed ? at::zeros({rows, K}, xf.options()) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(N, n0 + kTileRows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      float* wp = w.data_ptr<float>();
      at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) { dequantize_rows<Step>(raw, absmax, qmap, shift, K, n0, a, b, wp); });
      if (transposed) {
        dx.addmm_(xs.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else {
        at::Tensor part = at::mm(xs, w.t());
        if (bias_f.defined()) part.add_(bias_f.narrow(0, n0, n1 - n0));
        y.narrow(0, m0, rows).narrow(1, n0, n1 - n0).copy_(part);
      }
    }
    if (transposed) y.narrow(0, m0, rows).copy_(dx.index_select(1, staged));
  }
}

}  // namespace

const char* gemv_avx2(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                      int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y) {
  const char* levels = "fp32";
  dispatch_simd_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      levels = "int16";
      if (!int16_gemv(xp, raw, absmax, qmap, bp, yp, x.size(0), N, K, shift)) {
        levels = "bf16";
        gemv_steps<Bf16Levels>(xp, raw, absmax, qmap, bp, yp, x.size(0), N, K, shift);
      }
    } else {
      gemv_steps<Fp32Levels>(xp, raw, absmax, qmap, bp, yp, x.size(0), N, K, shift);
    }
  });
  return levels;
}

void tiles_fp32_avx2(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                     int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
  if (steps_of_64_fit(K, int64_t{1} << shift))
    tiles<Step64>(x, raw, absmax, qmap, shift, N, K, transposed, bias, y);
  else
    tiles<Step32>(x, raw, absmax, qmap, shift, N, K, transposed, bias, y);
}

}  // namespace fastpeft::nf4_cpu

#endif  // x86
