// Internals of nf4_matmul's CPU face shared by its files: the paths and the rule that picks one,
// the staged column order, the dithered bf16 levels, the row-block scheduler, and each
// instruction set's entry points (nf4_matmul_avx2.cpp, nf4_matmul_avx512.cpp). The op's entry,
// its portable loops and the rule live in nf4_matmul.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cpu_features.h"
#include "nf4_matmul.h"

namespace fastpeft::nf4_cpu {

enum class Path {
  kGemvPortable,      // few rows, one weight row decoded at a time into fp32 (any K, any CPU)
  kGemvAvx2,          // few rows, decoded in registers with byte shuffles (K % 32 == 0)
  kGemvAvx512,        // few rows, exact fp32 levels decoded in registers with permutes (K % 32 == 0)
  kGemvBf16Avx512,    // bf16 x, fewer rows: bf16 levels and AVX512_BF16 dot products (K % 32 == 0)
  kTilesPortable,     // more rows or transposed: tiles in x's dtype, then torch's matmul
  kTilesFp32Avx2,     // more rows or transposed: SIMD-decoded fp32 tiles, then fp32 BLAS
  kTilesBf16Avx512,   // bf16 x, more rows or transposed: bf16 tiles into AVX512_BF16 dot products
};

const char* path_name(Path path);

// The path of an [M, K] x of `dtype` at instruction-set level `isa` (see nf4_matmul.cpp).
Path choose_path(CpuIsa isa, int64_t M, int64_t K, int64_t blocksize, at::ScalarType dtype, bool transposed);

// Whether 32-weight steps tile every row: K % 32 == 0 and blocks of >= 32 (blocks are powers of
// two, so aligned steps never straddle them, even in rows that start inside a block).
inline bool steps_of_32_fit(int64_t K, int64_t blocksize) { return K % 32 == 0 && blocksize >= 32; }
inline bool steps_of_64_fit(int64_t K, int64_t blocksize) { return K % 64 == 0 && blocksize >= 64; }

// fn(std::integral_constant<int, kStep>{}) with the widest step of weights that tiles every row:
// 64 when K % 64 == 0 and blocksize >= 64, else 32.
template <typename F>
void with_widest_step(int64_t K, int shift, const F& fn) {
  if (steps_of_64_fit(K, int64_t{1} << shift))
    fn(std::integral_constant<int, 64>{});
  else
    fn(std::integral_constant<int, 32>{});
}

// One thread's share of a call's row blocks, [first, end) in one atomic word: the owner takes
// blocks from the front, a thread done with its own share takes them from the back. Each share
// has a cache line of its own, so an owner's takes do not evict the word another thread is taking
// from (with adjacent words, SmolLM2's generation on two threads ran 0.45 ms a token behind a
// fixed split of the rows; with a line each, level with it).
class alignas(64) RowBlockShare {
 public:
  void assign(int64_t first, int64_t end) { word_.store(pack(first, end), std::memory_order_relaxed); }

  // The share's first block (or with from_back its last), taken; -1 when none is left.
  int64_t take(bool from_back) {
    uint64_t word = word_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t first = static_cast<int64_t>(word & 0xFFFFFFFFu), end = static_cast<int64_t>(word >> 32);
      if (first >= end) return -1;
      const uint64_t rest = from_back ? pack(first, end - 1) : pack(first + 1, end);
      if (word_.compare_exchange_weak(word, rest, std::memory_order_relaxed)) return from_back ? end - 1 : first;
    }
  }

 private:
  static uint64_t pack(int64_t first, int64_t end) {
    return static_cast<uint64_t>(first) | static_cast<uint64_t>(end) << 32;
  }
  std::atomic<uint64_t> word_;
};

// Weight rows [0, N) in blocks of `rows`, each thread given a contiguous share of the blocks and
// taking them in order, so it reads its part of the weight as one stream; a thread done with its
// share takes blocks from the back of the others', so one slowed by a neighbour on its core does
// less. Measured on the README's AMD EPYC Zen 4 capped at AVX2, two threads, SmolLM2's 210 layer
// shapes x 30 layers (53 MB, from memory) through the kernel: 4.2 ms with blocks handed out one
// at a time from a single counter (each thread's stream broken every block), 3.3 ms with shares;
// the generation 17.6 -> 16.0 ms a token (in-process alternating rounds, medians of 8).
// fn(n0, n1) runs once per block, on the thread that took it.
template <typename F>
void for_each_row_block(int64_t N, int64_t rows, const F& fn) {
  constexpr int64_t kMaxShares = 64;
  const int64_t blocks = (N + rows - 1) / rows;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "nf4_matmul: ", N, " weight rows in blocks of ", rows, " are too many blocks");
  const int64_t shares = std::min<int64_t>({at::get_num_threads(), blocks, kMaxShares});
  auto run_block = [&](int64_t b) { fn(b * rows, std::min(N, (b + 1) * rows)); };
  if (shares <= 1) {
    for (int64_t b = 0; b < blocks; ++b) run_block(b);
    return;
  }
  RowBlockShare share[kMaxShares];
  for (int64_t t = 0; t < shares; ++t) share[t].assign(blocks * t / shares, blocks * (t + 1) / shares);
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t b = share[t].take(false); b >= 0; b = share[t].take(false)) run_block(b);
    for (int64_t i = 1; i < shares; ++i) {
      const int64_t t = (begin + i) % shares;
      for (int64_t b = share[t].take(true); b >= 0; b = share[t].take(true)) run_block(b);
    }
  });
}

// The GEMVs' blocks: 16 to 64 rows, at least 4 blocks per thread.
template <typename F>
void for_each_row_block(int64_t N, const F& fn) {
  for_each_row_block(N, std::clamp<int64_t>(N / (4 * at::get_num_threads()), 16, 64), fn);
}

// fn(std::integral_constant<int, MT>{}, m0) for x's rows in groups of MT = 4, then the 1 to 3 left:
// the kernels take MT as a template argument so their accumulators stay in registers.
template <typename F>
void for_each_row_group(int64_t M, const F& fn) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) fn(std::integral_constant<int, 4>{}, m0);
  switch (M - m0) {
    case 3: fn(std::integral_constant<int, 3>{}, m0); break;
    case 2: fn(std::integral_constant<int, 2>{}, m0); break;
    case 1: fn(std::integral_constant<int, 1>{}, m0); break;
    default: break;
  }
}

// fn(scalar_t{}) for x's dtype: the SIMD paths take float32, float16 and bfloat16 (choose_path
// sends float64 to the portable ones).
template <typename F>
void dispatch_simd_dtype(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "nf4_matmul: the SIMD paths take float32, float16 or bfloat16 x, not ", dtype);
  }
}

// bf16 levels for the bf16 GEMVs, whose products take a bf16 level and the fp32 absmax apart.
// Rounding every level to its nearest bf16 errs the same way for most codes: the mean error per
// weight is +1.9e-4·absmax, and with x of nonzero mean (SiLU outputs) it adds up K times (x =
// randn + 2, K = 14336: 1.5e-2 of max|y| off the exact product, against 2.9e-3 for the reference's
// bf16 weights). So each level rounds down in some of kDitherTables tables and up in the others,
// in the proportion that makes its mean over the tables its exact value (within 1/16 of a bf16
// step), and columns k take the tables in turn, 64 at a time (table (k / 64) % 8): 2.3e-3 and
// 3.3e-3 of max|y| at K = 4096 and 14336 for any code frequencies (simulated over NF4 codes of
// Gaussian weights; the reference 2.7e-3 and 2.9e-3).
constexpr int kDitherTables = 8;
void dithered_bf16_levels(const float* qmap, uint16_t levels[kDitherTables][16]);

// ---- entry points per instruction set; x, y contiguous [M, K] / [M, N] (transposed: [M, N] /
// [M, K]); bias undefined or [N] in x's dtype; y written whole (bias added, no LoRA term).

// gemv_avx2 returns the levels it decoded into: "int16", "bf16" (bf16 x it could not take as
// integers) or "fp32".
const char* gemv_avx2(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                      int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y);
void tiles_fp32_avx2(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                     int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y);
void gemv_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                 int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y);
void gemv_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap, int shift,
                      int64_t N, int64_t K, const at::Tensor& bias, at::Tensor& y);
void tiles_bf16_avx512(const at::Tensor& x, const uint8_t* raw, const Nf4Scales& absmax, const float* qmap,
                       int shift, int64_t N, int64_t K, bool transposed, const at::Tensor& bias, at::Tensor& y);

}  // namespace fastpeft::nf4_cpu
