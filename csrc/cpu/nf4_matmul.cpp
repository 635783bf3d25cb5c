// CPU face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// Few rows (M <= 16, decode): a GEMV that streams the packed weight once; no full-precision
// weight exists. With AVX2+FMA (checked at run time; FASTPEFT_CPU_ISA=portable forces the
// fallback) 16 bytes decode to 32 floats with one byte shuffle per byte of the levels (four for
// exact fp32 levels, two for bf16 x's bf16 levels), and x is stored once in the order that decode
// produces, so nothing is re-shuffled per weight row. The portable fallback decodes one weight row into an fp32 buffer (rounded to x's
// dtype, as the reference rounds W). More rows: a blocked dequant-matmul, 256 weight rows
// dequantised into a tile and multiplied with BLAS, so the float weight never exceeds one tile.
// Schema, checks and the reference: fastpeft/ops/nf4_matmul.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
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
// The AVX2 GEMV reads the packed weight in steps (Step32, Step64: where a step's codes come from)
// and decodes each register of 32 4-bit codes (one code per byte) into four 8-float vectors, a
// 16-entry byte table per byte of the level looked up with one shuffle each (Levels: how wide the
// levels are, chosen by x's dtype):
// - Fp32Levels: the exact float levels (fp32 and fp16 x, and every tile), four shuffles and eight
//   unpacks.
// - Bf16Levels: levels in bf16 (the GEMV of bf16 x: the reference's bf16 weight carries 8
//   significant bits too), two shuffles and two unpacks, then each float is the top or the bottom
//   half of a 32-bit lane moved into place by a mask or a shift. Rounded dithered (see there).
// Zen 3 runs shuffles and shifts on two of its four vector pipes, and the decode is bound by them.
// Measured on this project's CPU (AMD EPYC Zen 3, AVX2; 4096 x 4096, double quant, M = 1, one
// thread, best of 30 in a standalone loop): Fp32Levels with Step32 1.51-1.56 ms, with Step64
// 1.45-1.47; Bf16Levels with Step32 1.07-1.12, with Step64 1.02 (0.98 with a constant scale).
// Through the op: fp32 1.71 -> 1.48 ms, bf16 1.70 -> 1.09-1.24 ms (it ran Fp32Levels before).
// Rejected: two 8-entry float permutes and a blend per 8 codes (2.8 ms); 16-bit blends and shifts
// in place of Fp32Levels' last four unpacks (1.63 ms); the row's scales decoded into a buffer
// first (1.12 ms against Step64's 1.02).
struct Step32 {  // 16 bytes: K % 32 == 0 and blocksize >= 32 keep a step in one block and row
  static constexpr int64_t kWeights = 32;
  static constexpr int kRegisters = 1;
  // lane 0: the high nibbles of the 16 bytes, lane 1: their low nibbles (a broadcast load, then a
  // 32-bit shift by 4 in lane 0 only)
  __attribute__((target("avx2,fma"))) static inline void codes(const uint8_t* bytes, __m256i out[1]) {
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
  __attribute__((target("avx2,fma"))) static inline void codes(const uint8_t* bytes, __m256i out[2]) {
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

struct Fp32Levels {
  static constexpr int kPlanes = 4;  // bytes per level
  static constexpr int kTables = 1;  // level tables, taken in turn by 64-column groups of k
  static void level_bits(const float* qmap, uint32_t bits[kTables][16]) { std::memcpy(bits[0], qmap, 64); }
  // where the code in byte slot j (lane j / 16, byte q = j % 16) lands among the 32 decoded floats
  static int64_t position_of(int64_t j) {
    const int64_t q = j & 15;
    return 8 * (q >> 2) + 4 * (j >> 4) + (q & 3);
  }
  __attribute__((target("avx2,fma"))) static inline void decode(__m256i codes, const __m256i* planes,
                                                                __m256 out[4]) {
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

// Rounding every level to its nearest bf16 errs the same way for most codes: the mean error per
// weight is +1.9e-4·absmax, and with x of nonzero mean (SiLU outputs) it adds up K times (x =
// randn + 2, K = 14336: 1.5e-2 of max|y| off the exact product, against 2.9e-3 for the reference's
// bf16 weights). So each level rounds down in some of kTables tables and up in the others, in the
// proportion that makes its mean over the tables its exact value (within 1/16 of a bf16 step), and
// columns k take the tables in turn, 64 at a time: 2.3e-3 and 3.3e-3 of max|y| at K = 4096 and
// 14336 for any code frequencies (simulated over NF4 codes of Gaussian weights; the reference
// 2.7e-3 and 2.9e-3). It costs two loads of the tables per 64 weights (3-6 % in the standalone loop).
struct Bf16Levels {
  static constexpr int kPlanes = 2;
  static constexpr int kTables = 8;
  static void level_bits(const float* qmap, uint32_t bits[kTables][16]) {
    for (int c = 0; c < 16; ++c) {
      uint32_t u;
      std::memcpy(&u, &qmap[c], 4);
      const uint32_t toward_zero = u >> 16, away = toward_zero + ((u & 0xFFFF) != 0);  // same sign, larger magnitude
      const float lo = bf16_value(toward_zero), hi = bf16_value(away);
      // how many tables take the larger magnitude: the level's position between the two, in eighths
      const int n_away = hi == lo ? 0 : static_cast<int>(std::lround(kTables * (qmap[c] - lo) / (hi - lo)));
      for (int t = 0; t < kTables; ++t)  // spread evenly over the tables (Bresenham)
        bits[t][c] = ((t + 1) * n_away / kTables > t * n_away / kTables) ? away : toward_zero;
    }
  }
  static float bf16_value(uint32_t b) {
    const uint32_t u = b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static int64_t position_of(int64_t j) {
    const int64_t q = j & 15;
    return 8 * (2 * (q >> 3) + (q & 1)) + 4 * (j >> 4) + ((q & 7) >> 1);
  }
  __attribute__((target("avx2,fma"))) static inline void decode(__m256i codes, const __m256i* planes,
                                                                __m256 out[4]) {
    const __m256i b0 = _mm256_shuffle_epi8(planes[0], codes);
    const __m256i b1 = _mm256_shuffle_epi8(planes[1], codes);
    const __m256i lo = _mm256_unpacklo_epi8(b0, b1), hi = _mm256_unpackhi_epi8(b0, b1);  // 16 bf16 each
    const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(lo, top));
    out[2] = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
    out[3] = _mm256_castsi256_ps(_mm256_and_si256(hi, top));
  }
};

// The shuffle tables: planes[t·kPlanes + j] holds byte j of each of level table t's 16 levels,
// twice (once per 128-bit lane).
template <typename Levels>
__attribute__((target("avx2,fma"))) void load_planes(const float* qmap,
                                                     __m256i planes[Levels::kTables * Levels::kPlanes]) {
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

// Whether every Step of a K-column row lies in one absmax block and starts on a byte (K % step == 0,
// blocksize >= step; blocks are powers of two, so aligned steps never straddle them).
template <typename Step>
bool step_fits(int64_t K, int shift) {
  return K % Step::kWeights == 0 && (int64_t{1} << shift) >= Step::kWeights;
}

// Where element k of x goes in the staged copy: the decoded order of its step.
template <typename Step, typename Levels>
int64_t staged_position(int64_t k) {
  int reg;
  const int64_t slot = Step::slot_of(k % Step::kWeights, reg);
  return k - k % Step::kWeights + 32 * reg + Levels::position_of(slot);
}

// y[m0:m0+MT, n0:n1] = x·Wᵀ. xs: x as fp32 in staged order, [M, K]. MT rows share each decoded
// step; MT is a template argument so their accumulators stay in registers (a runtime-indexed
// accumulator array lives on the stack, and the store-to-load round trip per step made the loop 2x
// slower). Each step's partial sum is one chain of FMAs; steps are independent, so out-of-order
// execution overlaps them and only the scaled accumulate is carried from step to step.
template <int MT, typename Step, typename Levels, typename scalar_t>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* xs, const uint8_t* raw,
                                                        const Nf4Scales& absmax, const __m256i* planes,
                                                        const scalar_t* bias, scalar_t* y, int64_t m0, int64_t N,
                                                        int64_t K, int shift, int64_t n0, int64_t n1) {
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
template <typename Step, typename Levels, typename scalar_t>
__attribute__((target("avx2,fma"))) void gemv_avx2(const float* xs, const uint8_t* raw, const Nf4Scales& absmax,
                                                   const float* qmap, const scalar_t* bias, scalar_t* y, int64_t M,
                                                   int64_t N, int64_t K, int shift, int64_t n0, int64_t n1) {
  __m256i planes[Levels::kTables * Levels::kPlanes];
  load_planes<Levels>(qmap, planes);
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4)
    gemv_rows_avx2<4, Step, Levels>(xs, raw, absmax, planes, bias, y, m0, N, K, shift, n0, n1);
  switch (M - m0) {
    case 3: gemv_rows_avx2<3, Step, Levels>(xs, raw, absmax, planes, bias, y, m0, N, K, shift, n0, n1); break;
    case 2: gemv_rows_avx2<2, Step, Levels>(xs, raw, absmax, planes, bias, y, m0, N, K, shift, n0, n1); break;
    case 1: gemv_rows_avx2<1, Step, Levels>(xs, raw, absmax, planes, bias, y, m0, N, K, shift, n0, n1); break;
    default: break;
  }
}

// x rows converted to fp32 once, in staged order ([M, K]: M·K·4 bytes, at most 256 KiB for
// M = 16, K = 4096), then the weight streamed once.
template <typename Step, typename Levels, typename scalar_t>
void gemv_simd(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
               const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  std::vector<float> xs(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * K + staged_position<Step, Levels>(k)] = static_cast<float>(x[m * K + k]);
  // Row blocks handed out one at a time: a thread slowed by a neighbour on its core does less
  // (at::parallel_for alone gives each thread a fixed share). At least 4 blocks per thread, of 16
  // to 64 rows.
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::clamp<int64_t>(N / (4 * threads), 16, 64);
  const int64_t blocks = (N + rows - 1) / rows;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b = next++; b < blocks; b = next++)
      gemv_avx2<Step, Levels, scalar_t>(xs.data(), raw, absmax, qmap, bias, y, M, N, K, shift, b * rows,
                                        std::min(N, (b + 1) * rows));
  });
}

// Weight rows [a, b) dequantised with the exact levels into `out` (row n at out + (n - n0)·K,
// fp32), columns in staged order.
template <typename Step>
__attribute__((target("avx2,fma"))) void dequantize_rows_avx2(const uint8_t* raw, const Nf4Scales& absmax,
                                                              const float* qmap, int shift, int64_t K, int64_t n0,
                                                              int64_t a, int64_t b, float* out) {
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

// More rows than the GEMV takes, and the backward: fp32 tiles of kTileRows weight rows decoded
// with the exact levels, their columns in staged order, so x's columns (or, transposed, the
// result's) are permuted the same way. The GEMMs run in fp32 whatever x's dtype: this CPU has no
// bf16 matmul units, and a bf16 nn.Linear at M = 64, K = N = 4096 took 101 ms against 23 ms in
// fp32. x is taken kChunkRows rows at a time so the fp32 copies stay small (each chunk decodes the
// weight again: 16 M weights take about 1 ms, a 1024 x 4096 x 4096 GEMM about 1 s here). The bias
// is added in fp32, so the result is rounded to y's dtype once.
constexpr int64_t kChunkRows = 1024;

template <typename Step>
void tiled_matmul_avx2(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                       int shift, int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
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
      at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
        dequantize_rows_avx2<Step>(raw, absmax, qmap, shift, K, n0, a, b, wp);
      });
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

template <typename Levels, typename scalar_t>
void gemv_simd_steps(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                     const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
  if (step_fits<Step64>(K, shift))
    gemv_simd<Step64, Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
  else
    gemv_simd<Step32, Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
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

// The SIMD GEMV where the CPU and the shape allow it; false otherwise.
template <typename scalar_t>
bool try_gemv_simd(const scalar_t* x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                   const scalar_t* bias, scalar_t* y, int64_t M, int64_t N, int64_t K, int shift) {
#ifdef FASTPEFT_X86
  if (!step_fits<Step32>(K, shift) || !use_avx2()) return false;
  if constexpr (std::is_same_v<scalar_t, double>)
    return false;  // the SIMD paths compute in fp32
  else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
    gemv_simd_steps<Bf16Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
  else
    gemv_simd_steps<Fp32Levels>(x, raw, absmax, qmap, bias, y, M, N, K, shift);
  return true;
#else
  return false;
#endif
}

// The SIMD tiles where the CPU and the shape allow it, written into y (bias added); false otherwise.
bool try_tiled_simd(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                    int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y) {
#ifdef FASTPEFT_X86
  if (!step_fits<Step32>(K, shift) || x.scalar_type() == at::kDouble || !use_avx2()) return false;
  if (step_fits<Step64>(K, shift))
    tiled_matmul_avx2<Step64>(x, raw, absmax, qmap, shift, N, K, transposed, bias, y);
  else
    tiled_matmul_avx2<Step32>(x, raw, absmax, qmap, shift, N, K, transposed, bias, y);
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
      if (try_gemv_simd<scalar_t>(x.data_ptr<scalar_t>(), rp, scales, qp, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                                  y.data_ptr<scalar_t>(), M, N, K, shift))
        return;
      gemv<scalar_t>(x.data_ptr<scalar_t>(), rp, scales, qp, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                     y.data_ptr<scalar_t>(), M, N, K, shift);
      return;
    }
    if (try_tiled_simd(x, rp, scales, qp, shift, N, K, transposed, bias ? bias_c : at::Tensor(), y)) return;
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
