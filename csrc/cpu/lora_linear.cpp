// CPU face of fastpeft::lora_linear_fwd / lora_linear_bwd (registered below), and the
// device-generic ATen composition the CUDA face uses above decode sizes.
#include "../dense_linear.h"
#include "../lora_linear.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace fastpeft {

void check_lora_linear_shapes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& x_lora) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2,
              "lora_linear: x, weight, lora_a and lora_b must be 2-D");
  const auto K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == K, "lora_linear: weight must be [N, ", K, "], got ", weight.sizes());
  TORCH_CHECK(r >= 1, "lora_linear: LoRA rank r must be >= 1");
  TORCH_CHECK(lora_a.size(1) == K, "lora_linear: lora_a must be [r, ", K, "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(1) == r, "lora_linear: lora_b must be [", N, ", ", r, "], got ",
              lora_b.sizes());
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_linear: bias must be [", N, "]");
  if (x_lora) TORCH_CHECK(x_lora->sizes() == x.sizes(), "lora_linear: x_lora must have x's shape");
  std::vector<const at::Tensor*> others{&weight, &lora_a, &lora_b};
  if (bias) others.push_back(&*bias);
  if (x_lora) others.push_back(&*x_lora);
  for (const auto* t : others) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lora_linear: all tensors must share x's dtype ",
                x.scalar_type());
    TORCH_CHECK(t->device() == x.device(), "lora_linear: all tensors must be on x's device ", x.device());
  }
}

namespace {

// y += scaling·s·Bᵀ in place, s = x_lora·Aᵀ [M, r] (x_lora: x where absent); returns {y, s}.
std::tuple<at::Tensor, at::Tensor> add_lora_delta(at::Tensor y, const at::Tensor& x, const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, double scaling,
                                                  const std::optional<at::Tensor>& x_lora) {
  at::Tensor s = at::mm(x_lora ? *x_lora : x, lora_a.t());
  y.addmm_(s, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, s};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                        double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, bias, lora_a, lora_b, x_lora);
  at::Tensor y = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  return add_lora_delta(y, x, lora_a, lora_b, scaling, x_lora);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& s, double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, std::nullopt, lora_a, lora_b, x_lora);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
              "lora_linear_bwd: grad_y must be [M, N]");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == lora_a.size(0),
              "lora_linear_bwd: s must be [M, r]");
  at::Tensor t = at::mm(grad_y, lora_b);                                      // dy·B: [M, r]
  at::Tensor grad_x = at::mm(grad_y, weight);
  at::Tensor grad_x_lora;
  if (x_lora) {
    grad_x_lora = at::mm(t, lora_a).mul_(scaling);
  } else {
    grad_x.addmm_(t, lora_a, /*beta=*/1, /*alpha=*/scaling);
    grad_x_lora = at::empty({0}, x.options());
  }
  at::Tensor grad_a = at::mm(t.t(), x_lora ? *x_lora : x).mul_(scaling);
  at::Tensor grad_b = at::mm(grad_y.t(), s).mul_(scaling);
  return {grad_x, grad_x_lora, grad_a, grad_b};
}

namespace {

// A small layer on few rows is computed in one pass: ATen's three GEMM calls (s = x·Aᵀ, x·Wᵀ + b,
// += scaling·s·Bᵀ) cost about 2 us each before any arithmetic (dispatch, allocation, BLAS set-up),
// 8.5 us for a 64x64 layer at M = 1 against this pass's ~2 us (AMD EPYC Zen 4, one thread). Up to
// this many multiply-adds (M·K·(N + r)) the pass runs; above, ATen's blocked GEMMs win.
constexpr int64_t kOnePassMaxMacs = int64_t{1} << 15;

// Σ_k a[k]·b[k] in float over 8 independent partial sums: the compiler vectorises the lanes without
// reassociating a single sum, and no add waits on the one before.
template <typename T>
inline float dot(const float* a, const T* b, int64_t K) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int u = 0; u < 8; ++u) lane[u] += a[k + u] * static_cast<float>(b[k + u]);
  float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; k < K; ++k) sum += a[k] * static_cast<float>(b[k]);
  return sum;
}

// y = x·Wᵀ + b + scaling·s·Bᵀ with s = x_lora·Aᵀ, row by row, accumulated in float32. s is rounded
// to the dtype before it is used, as the reference's s (a tensor of that dtype) is. Contiguous W, A,
// B and bias; x and x_lora with unit-stride rows.
template <typename T>
void lora_linear_fwd_one_pass(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                              const std::optional<at::Tensor>& x_lora, at::Tensor& y, at::Tensor& s) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  const T* w = weight.data_ptr<T>();
  const T* a = lora_a.data_ptr<T>();
  const T* b = lora_b.data_ptr<T>();
  const T* bias_p = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  T* sp = s.data_ptr<T>();
  const float c = static_cast<float>(scaling);
  std::vector<float> xf(K), xlf(x_lora ? K : 0), sf(r);
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x.data_ptr<T>() + m * x.stride(0);
    for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xr[k]);
    const float* lora_in = xf.data();
    if (x_lora) {
      const T* xlr = x_lora->data_ptr<T>() + m * x_lora->stride(0);
      for (int64_t k = 0; k < K; ++k) xlf[k] = static_cast<float>(xlr[k]);
      lora_in = xlf.data();
    }
    for (int64_t j = 0; j < r; ++j) {
      const T sj = static_cast<T>(dot(lora_in, a + j * K, K));
      sp[m * r + j] = sj;
      sf[j] = static_cast<float>(sj);
    }
    for (int64_t n = 0; n < N; ++n) {
      const float base = dot(xf.data(), w + n * K, K) + (bias_p ? static_cast<float>(bias_p[n]) : 0.0f);
      yp[m * N + n] = static_cast<T>(base + c * dot(sf.data(), b + n * r, r));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, bias, lora_a, lora_b, x_lora);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  const auto dtype = x.scalar_type();
  const bool one_pass = M * K * (N + r) <= kOnePassMaxMacs &&
                        (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                        (x.stride(1) == 1 || K == 1) && (!x_lora || x_lora->stride(1) == 1 || K == 1) &&
                        weight.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous() &&
                        (!bias || bias->is_contiguous());
  // Above one pass, the base through dense_linear's CPU face: at decode (a few rows) its GEMV streams
  // W once where torch's GEMM does not reach the memory's speed. SmolLM2's layer shapes at M = 1, one
  // thread, AMD EPYC Zen 4 with AVX512_BF16 (30 layers each, alternating, medians): bf16 576x576
  // 45.8 -> 23.6 us, 576x1536 84.5 -> 56.0, 4096x4096 2987 -> 1708; fp32 576x576 32.2 -> 27.6. More
  // rows take torch's matmul there as here.
  if (!one_pass) return add_lora_delta(dense_linear_cpu(x, weight, bias), x, lora_a, lora_b, scaling, x_lora);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = at::empty({M, r}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lora_linear_fwd_one_pass", [&] {
    lora_linear_fwd_one_pass<scalar_t>(x, weight, bias, lora_a, lora_b, scaling, x_lora, y, s);
  });
  return {y, s};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear_fwd", &fastpeft::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &fastpeft::lora_linear_bwd_aten);
}
