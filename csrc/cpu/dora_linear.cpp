// CPU face of fastpeft::dora_linear_fwd / dora_linear_bwd (schema, checks and the reference:
// fastpeft/ops/dora_linear.py).
//
// Forward: x's rows (x_lora's with dropout) and A's rows go through one GEMM over W, so W is read
// once for x·Wᵀ and A·Wᵀ; the LoRA delta is added into the x rows in place (addmm_, as
// lora_linear's CPU face); then one pass over [M, N] computes y = g⊙z (+ d) + bias in float32 from
// the row norms ‖Wᵢ‖² + 2s·Bᵢ·(A·Wᵢᵀ) + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ. No [N, K] tensor is made.
// Backward: one pass over dy and z gives dy_g = g⊙dy (and (g − 1)⊙dy with dropout) and the
// magnitude's gradient; without dropout the rest is lora_linear's backward of dy_g.
#include "../cpu_features.h"
#include "../lora_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastpeft {
namespace {

void check_dora_vectors(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& magnitude,
                        const at::Tensor& norm, const char* norm_name) {
  const auto N = weight.size(0);
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == N, "dora_linear: magnitude must be [", N, "]");
  TORCH_CHECK(magnitude.scalar_type() == x.scalar_type() && magnitude.device() == x.device(),
              "dora_linear: magnitude must share x's dtype and device");
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == N && norm.scalar_type() == at::kFloat && norm.device() == x.device(),
              "dora_linear: ", norm_name, " must be float32 [", N, "] on x's device");
}

// Rows [M, N] of a row-major tensor whose rows may be strided: the row stride, checked unit-stride columns.
int64_t row_stride(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), "dora_linear: expected rows of unit stride");
  return t.stride(0);
}

// ‖Wᵢ + s·Bᵢ·A‖ for every row i, float32 [N], from ‖Wᵢ‖² [N] and aw = A·Wᵀ [r, N]. Every term in
// float32; the sum can only fall below zero by rounding where the row nearly cancels, hence the clamp.
at::Tensor row_norms(const at::Tensor& weight_norm_sq, const at::Tensor& aw, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, double scaling) {
  const auto N = lora_b.size(0), r = lora_b.size(1);
  at::Tensor a = lora_a.to(at::kFloat);
  at::Tensor b = lora_b.to(at::kFloat).contiguous();            // [N, r]
  at::Tensor bg = at::mm(b, at::mm(a, a.t()));                  // B·(A·Aᵀ): [N, r]
  at::Tensor awt = aw.to(at::kFloat).t().contiguous();          // (A·Wᵀ)ᵀ: [N, r]
  at::Tensor wsq = weight_norm_sq.contiguous();
  at::Tensor norm = at::empty({N}, weight_norm_sq.options());
  const float* pb = b.data_ptr<float>();
  const float* pbg = bg.data_ptr<float>();
  const float* paw = awt.data_ptr<float>();
  const float* pw = wsq.data_ptr<float>();
  float* out = norm.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  // One thread: 2·N·r multiply-adds (131K at N = 4096, r = 16) are not worth a parallel region,
  // whose barrier, on a machine shared with other jobs, waits for a descheduled thread.
  for (int64_t i = 0; i < N; ++i) {
    float cross = 0.f, quad = 0.f;
    for (int64_t k = 0; k < r; ++k) {
      cross += pb[i * r + k] * paw[i * r + k];
      quad += pbg[i * r + k] * pb[i * r + k];
    }
    out[i] = std::sqrt(std::max(pw[i] + 2.f * s * cross + s * s * quad, 0.f));
  }
  return norm;
}

// The [M, N] passes below work a row at a time in float32: a bf16/fp16 row is widened into a
// per-thread float buffer, float rows are worked on where they lie, and every output is narrowed
// once. The row loops are inline functions over contiguous floats, compiled into one range
// function per instruction-set level (AVX-512, AVX2 + FMA, the portable baseline) and chosen by
// cpu_isa() (so FASTPEFT_CPU_ISA caps them as it caps the NF4 kernels): the extension is built
// without -march, so the baseline alone is SSE2, 4 lanes and no FMA. Element-wise c10::BFloat16
// conversions did not vectorise and made the backward's pass 2.5 ms of a 1024² bf16 step (7.0 ms
// for LoRA's whole backward, AMD EPYC Zen 4, 2 threads).
#if defined(__GNUC__) || defined(__clang__)
#define FASTPEFT_ROW_INLINE inline __attribute__((always_inline))
#else
#define FASTPEFT_ROW_INLINE inline
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FASTPEFT_ROWS_X86 1
#define FASTPEFT_ROWS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FASTPEFT_ROWS_AVX2 __attribute__((target("avx2,fma")))
#endif

FASTPEFT_ROW_INLINE void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(float));
  }
}

// float32 -> bfloat16, rounding to nearest even (NaN stays NaN), as c10's conversion rounds.
FASTPEFT_ROW_INLINE void narrow_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(float));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : rounded);
  }
}

template <typename T>
FASTPEFT_ROW_INLINE void widen(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    widen_bf16(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
FASTPEFT_ROW_INLINE void narrow(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    narrow_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// A row of T as floats: float rows are used where they lie, others widened into `buffer`.
template <typename T>
FASTPEFT_ROW_INLINE const float* as_floats(const T* row, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    widen(row, buffer, n);
    return buffer;
  }
}

// Per-thread float buffers: `count` rows of N each.
struct RowBuffers {
  std::vector<float> data;
  int64_t N;
  RowBuffers(int64_t count, int64_t n) : data(static_cast<size_t>(count * n)), N(n) {}
  float* operator[](int64_t i) { return data.data() + i * N; }
};

// The forward's pass over [M, N]: y = g⊙z (+ d) + bias in float32, rounded once to T, with
// z = x_l·Wᵀ + scaling·s·Bᵀ as the GEMMs left it and, with dropout, d = x·Wᵀ − x_l·Wᵀ (y is
// written over d). Folding the LoRA delta into this pass (z += (scaling·s)·Bᵀ row by row in
// float32, one pass fewer over [M, N]) measured 0.6-4 % slower on the forward than BLAS's addmm_
// followed by this pass (thread CPU time, best and median of 40 alternating calls, the four CPU
// bench shapes, one thread, AMD EPYC Zen 4 under a load average of ~12): the delta stays addmm_.
template <typename T>
struct ForwardPass {
  const T* z;         // [M, N], row stride zs
  int64_t zs;
  const T* d;         // [M, N], row stride ds, or null
  int64_t ds;
  T* y;               // [M, N], row stride ys (may be d)
  int64_t ys;
  const float* g;     // m / norm [N]
  const float* bias;  // [N] float32 or null
  int64_t N;
};

template <typename T>
FASTPEFT_ROW_INLINE void forward_rows_body(const ForwardPass<T>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  RowBuffers buf(3, N);
  const float* __restrict g = a.g;
  for (int64_t m = begin; m < end; ++m) {
    const float* __restrict z = as_floats(a.z + m * a.zs, buf[0], N);
    const float* __restrict extra = a.bias;
    if (a.d) {
      float* __restrict d = buf[1];
      widen(a.d + m * a.ds, d, N);  // d is overwritten by y: read it into the buffer first
      if (a.bias)
        for (int64_t n = 0; n < N; ++n) d[n] += a.bias[n];
      extra = d;
    }
    T* yrow = a.y + m * a.ys;
    float* __restrict y = std::is_same_v<T, float> ? reinterpret_cast<float*>(yrow) : buf[2];
    if (extra)
      for (int64_t n = 0; n < N; ++n) y[n] = z[n] * g[n] + extra[n];
    else
      for (int64_t n = 0; n < N; ++n) y[n] = z[n] * g[n];
    if constexpr (!std::is_same_v<T, float>) narrow(y, yrow, N);
  }
}

// The backward's one pass: dy_g = g⊙dy, dy_gm1 = (g − 1)⊙dy (when given) and this thread's
// Σ_m dy⊙z per column, added into acc.
template <typename T>
struct GradPass {
  const T* dy;   // [M, N] contiguous
  const T* z;    // [M, N] contiguous
  T* dy_g;       // [M, N]
  T* dy_gm1;     // [M, N] or null
  const float* g;
  int64_t N;
};

template <typename T>
FASTPEFT_ROW_INLINE void grad_rows_body(const GradPass<T>& a, float* __restrict acc, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  RowBuffers buf(3, N);
  const float* __restrict g = a.g;
  for (int64_t m = begin; m < end; ++m) {
    const float* __restrict dy = as_floats(a.dy + m * N, buf[0], N);
    const float* __restrict z = as_floats(a.z + m * N, buf[1], N);
    float* __restrict out = std::is_same_v<T, float> ? reinterpret_cast<float*>(a.dy_g + m * N) : buf[2];
    for (int64_t n = 0; n < N; ++n) {
      acc[n] += dy[n] * z[n];
      out[n] = dy[n] * g[n];
    }
    if constexpr (!std::is_same_v<T, float>) narrow(out, a.dy_g + m * N, N);
    if (a.dy_gm1) {
      float* __restrict out1 = std::is_same_v<T, float> ? reinterpret_cast<float*>(a.dy_gm1 + m * N) : buf[2];
      for (int64_t n = 0; n < N; ++n) out1[n] = dy[n] * (g[n] - 1.f);
      if constexpr (!std::is_same_v<T, float>) narrow(out1, a.dy_gm1 + m * N, N);
    }
  }
}

// One range function per level; the inline bodies are compiled inside each with its target.
template <typename T>
void forward_rows_portable(const ForwardPass<T>& a, int64_t begin, int64_t end) { forward_rows_body(a, begin, end); }
template <typename T>
void grad_rows_portable(const GradPass<T>& a, float* acc, int64_t begin, int64_t end) {
  grad_rows_body(a, acc, begin, end);
}
#ifdef FASTPEFT_ROWS_X86
template <typename T>
FASTPEFT_ROWS_AVX2 void forward_rows_avx2(const ForwardPass<T>& a, int64_t begin, int64_t end) {
  forward_rows_body(a, begin, end);
}
template <typename T>
FASTPEFT_ROWS_AVX512 void forward_rows_avx512(const ForwardPass<T>& a, int64_t begin, int64_t end) {
  forward_rows_body(a, begin, end);
}
template <typename T>
FASTPEFT_ROWS_AVX2 void grad_rows_avx2(const GradPass<T>& a, float* acc, int64_t begin, int64_t end) {
  grad_rows_body(a, acc, begin, end);
}
template <typename T>
FASTPEFT_ROWS_AVX512 void grad_rows_avx512(const GradPass<T>& a, float* acc, int64_t begin, int64_t end) {
  grad_rows_body(a, acc, begin, end);
}
#endif

template <typename T>
auto forward_rows_for(CpuIsa isa) {
#ifdef FASTPEFT_ROWS_X86
  if (isa >= CpuIsa::kAvx512) return &forward_rows_avx512<T>;
  if (isa >= CpuIsa::kAvx2) return &forward_rows_avx2<T>;
#endif
  return &forward_rows_portable<T>;
}

template <typename T>
auto grad_rows_for(CpuIsa isa) {
#ifdef FASTPEFT_ROWS_X86
  if (isa >= CpuIsa::kAvx512) return &grad_rows_avx512<T>;
  if (isa >= CpuIsa::kAvx2) return &grad_rows_avx2<T>;
#endif
  return &grad_rows_portable<T>;
}

// Rows per parallel task: about 16K elements.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

// y[m, n] = g[n]·z[m, n] (+ d[m, n]) + bias[n], in float32, rounded once to T. y may be d.
template <typename T>
void scale_rows(const at::Tensor& z, const at::Tensor* d, const at::Tensor& g, const at::Tensor* bias, at::Tensor& y) {
  const int64_t M = z.size(0), N = z.size(1);
  const ForwardPass<T> pass{z.data_ptr<T>(), row_stride(z), d ? d->data_ptr<T>() : nullptr, d ? row_stride(*d) : 0,
                            y.data_ptr<T>(), row_stride(y), g.data_ptr<float>(),
                            bias ? bias->data_ptr<float>() : nullptr, N};
  const auto rows = forward_rows_for<T>(cpu_isa());
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) { rows(pass, begin, end); });
}

// dy_g = g⊙dy, dy_gm1 = (g − 1)⊙dy (when given) and Σ_m dy⊙z per column (float32, summed per
// thread then added up: rows are split between threads, so every thread reads contiguous memory).
template <typename T>
at::Tensor scale_grad(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& g, at::Tensor& dy_g,
                      at::Tensor* dy_gm1) {
  const int64_t M = dy.size(0), N = dy.size(1);
  at::Tensor partial = at::zeros({at::get_num_threads(), N}, g.options());
  const GradPass<T> pass{dy.data_ptr<T>(), z.data_ptr<T>(), dy_g.data_ptr<T>(),
                         dy_gm1 ? dy_gm1->data_ptr<T>() : nullptr, g.data_ptr<float>(), N};
  float* ppart = partial.data_ptr<float>();
  const auto rows = grad_rows_for<T>(cpu_isa());
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    rows(pass, ppart + at::get_thread_num() * N, begin, end);
  });
  return partial.sum(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, const at::Tensor& weight_norm_sq, double scaling,
    const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, bias, lora_a, lora_b, x_lora);
  check_dora_vectors(x, weight, magnitude, weight_norm_sq, "weight_norm_sq");
  const int64_t M = x.size(0), N = weight.size(0), r = lora_a.size(0);
  const at::Tensor& x_l = x_lora ? *x_lora : x;
  // One GEMM over W: [x_l; A]·Wᵀ. Rows [0, M) become z, rows [M, M + r) are A·Wᵀ.
  at::Tensor p = at::mm(at::cat({x_l, lora_a}, 0), weight.t());
  at::Tensor z = p.narrow(0, 0, M);
  at::Tensor aw = p.narrow(0, M, r);
  at::Tensor s = at::mm(x_l, lora_a.t());
  // With dropout PEFT adds (g − 1)⊙(x_l·Wᵀ) to the base layer's x·Wᵀ: y = g⊙z + d + bias with
  // d = x·Wᵀ − x_l·Wᵀ, taken before the delta joins z; y is then written over d.
  at::Tensor d;
  if (x_lora) d = at::mm(x, weight.t()).sub_(z);
  z.addmm_(s, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);  // z = x_l·Wᵀ + scaling·s·Bᵀ
  at::Tensor norm = row_norms(weight_norm_sq, aw, lora_a, lora_b, scaling);
  at::Tensor g = magnitude.to(at::kFloat).div(norm);
  std::optional<at::Tensor> bias_f;
  if (bias) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor y = x_lora ? d : at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dora_linear_fwd_cpu", [&] {
    scale_rows<scalar_t>(z, x_lora ? &d : nullptr, g, bias_f ? &*bias_f : nullptr, y);
  });
  return {y, s, z, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, const at::Tensor& s, const at::Tensor& z,
    const at::Tensor& norm, double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, std::nullopt, lora_a, lora_b, x_lora);
  check_dora_vectors(x, weight, magnitude, norm, "norm");
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "dora_linear_bwd: grad_y must be [M, N]");
  TORCH_CHECK(z.sizes() == grad_y.sizes(), "dora_linear_bwd: z must be [M, N]");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == lora_a.size(0), "dora_linear_bwd: s must be [M, r]");
  at::Tensor dy = grad_y.contiguous();
  at::Tensor zc = z.contiguous();
  at::Tensor g = magnitude.to(at::kFloat).div(norm);
  at::Tensor dy_g = at::empty_like(dy);
  at::Tensor dy_gm1 = x_lora ? at::empty_like(dy) : at::Tensor();
  at::Tensor dyz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "dora_linear_bwd_cpu", [&] {
    dyz = scale_grad<scalar_t>(dy, zc, g, dy_g, x_lora ? &dy_gm1 : nullptr);
  });
  at::Tensor grad_m = dyz.div_(norm).to(magnitude.scalar_type());
  if (!x_lora) {
    auto [grad_x, grad_x_lora, grad_a, grad_b] = lora_linear_bwd_aten(dy_g, x, weight, lora_a, lora_b, s, scaling,
                                                                      std::nullopt);
    return {grad_x, grad_x_lora, grad_a, grad_b, grad_m};
  }
  at::Tensor t = at::mm(dy_g, lora_b);                                        // dy_g·B: [M, r]
  at::Tensor grad_x = at::mm(dy, weight);
  at::Tensor grad_x_lora = at::mm(dy_gm1, weight).addmm_(t, lora_a, /*beta=*/1, /*alpha=*/scaling);
  at::Tensor grad_a = at::mm(t.t(), *x_lora).mul_(scaling);
  at::Tensor grad_b = at::mm(dy_g.t(), s).mul_(scaling);
  return {grad_x, grad_x_lora, grad_a, grad_b, grad_m};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("dora_linear_fwd", &fastpeft::dora_linear_fwd_cpu);
  m.impl("dora_linear_bwd", &fastpeft::dora_linear_bwd_cpu);
}
