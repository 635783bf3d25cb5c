// CPU face of fastpeft::nf4_matmul: y = x·dequant(W)ᵀ (+ bias), or x·dequant(W) when transposed.
//
// Few rows (M <= 16, decode): a GEMV that decodes one weight row at a time into a small fp32
// buffer (rounded to x's dtype, as the reference rounds W) and dots it with every x row: the
// packed weight is read once and no full-precision weight exists. More rows: a blocked
// dequant-matmul, 256 weight rows dequantised into a tile and multiplied with BLAS, so the float
// weight never exceeds one tile. Schema, checks and the reference: fastpeft/ops/nf4_matmul.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastpeft {
namespace {

constexpr int64_t kGemvRows = 16;
constexpr int64_t kTileRows = 256;

// Weight rows [n0, n1) of the [N, K] NF4 weight, dequantised into `out` ([n1 - n0, K], scalar_t).
// One weight row decoded into w[0..K) as fp32 values rounded to scalar_t (the reference's rounding).
// blocksize is a power of two (the format allows 32..4096), so the block of element e is e >> shift.
template <typename scalar_t>
inline void decode_row(const uint8_t* raw, const float* absmax, const float* qmap, int shift, int64_t n, int64_t K,
                       float* w) {
  int64_t e = n * K;
  int64_t k = 0;
  if (e & 1) {  // the row starts in a low nibble
    w[k++] = static_cast<float>(static_cast<scalar_t>(qmap[raw[e >> 1] & 0xF] * absmax[e >> shift]));
    ++e;
  }
  for (; k + 1 < K; k += 2, e += 2) {  // whole bytes: two codes, one block (blocks are even-sized)
    const uint8_t byte = raw[e >> 1];
    const float scale = absmax[e >> shift];
    w[k] = static_cast<float>(static_cast<scalar_t>(qmap[byte >> 4] * scale));
    w[k + 1] = static_cast<float>(static_cast<scalar_t>(qmap[byte & 0xF] * scale));
  }
  if (k < K) w[k] = static_cast<float>(static_cast<scalar_t>(qmap[raw[e >> 1] >> 4] * absmax[e >> shift]));
}

template <typename scalar_t>
void dequantize_rows(const uint8_t* raw, const float* absmax, const float* qmap, int shift, int64_t K, int64_t n0,
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
void gemv(const scalar_t* x, const uint8_t* raw, const float* absmax, const float* qmap, const scalar_t* bias,
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

at::Tensor nf4_matmul_cpu(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax_in,
                          const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias, bool transposed) {
  TORCH_CHECK(x_in.dim() == 2, "nf4_matmul: x must be 2-D");
  TORCH_CHECK(blocksize >= 2 && (blocksize & (blocksize - 1)) == 0 && out_features > 0,
              "nf4_matmul: blocksize must be a power of two >= 2 and out_features positive");
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor raw = packed.contiguous().view(at::kByte).reshape({-1});
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor qmap = quant_map.contiguous();
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && qmap.scalar_type() == at::kFloat && qmap.numel() == 16,
              "nf4_matmul: absmax and quant_map must be float32 (quant_map: 16 levels)");
  const int64_t M = x.size(0), N = out_features;
  const int64_t K = transposed ? (2 * raw.numel()) / N : x.size(1);
  TORCH_CHECK((N * K + 1) / 2 == raw.numel(), "nf4_matmul: ", raw.numel(), " packed bytes do not hold a [", N, ", ",
              K, "] weight");
  TORCH_CHECK(absmax.numel() == (N * K + blocksize - 1) / blocksize, "nf4_matmul: absmax has ", absmax.numel(),
              " entries; expected one per block of ", blocksize);
  TORCH_CHECK(x.size(1) == (transposed ? N : K), "nf4_matmul: x has ", x.size(1), " columns; expected ",
              transposed ? N : K);
  if (bias) TORCH_CHECK(!transposed && bias->numel() == N && bias->scalar_type() == x.scalar_type(),
                        "nf4_matmul: bias must be [out_features] in x's dtype (and only without transposed)");
  at::Tensor y = transposed ? at::zeros({M, K}, x.options()) : at::empty({M, N}, x.options());
  if (M == 0) return y;
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_matmul_cpu", [&] {
    const uint8_t* rp = raw.data_ptr<uint8_t>();
    const float* ap = absmax.data_ptr<float>();
    const float* qp = qmap.data_ptr<float>();
    if (!transposed && M <= kGemvRows) {
      gemv<scalar_t>(x.data_ptr<scalar_t>(), rp, ap, qp, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
                     y.data_ptr<scalar_t>(), M, N, K, shift);
      return;
    }
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(N, n0 + kTileRows);
      at::Tensor w = tile.narrow(0, 0, n1 - n0);
      dequantize_rows<scalar_t>(rp, ap, qp, shift, K, n0, n1, w.data_ptr<scalar_t>());
      if (transposed) {
        y.addmm_(x.narrow(1, n0, n1 - n0), w);  // dx += dy[:, tile]·W[tile, :]
      } else {
        y.narrow(1, n0, n1 - n0).copy_(at::mm(x, w.t()));
      }
    }
    if (bias && !transposed) y.add_(bias_c);
  });
  return y;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("nf4_matmul", &fastpeft::nf4_matmul_cpu); }
