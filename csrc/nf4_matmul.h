// Argument checks of fastpeft::nf4_matmul shared by its CPU and CUDA faces (the Python op
// checks first with friendlier messages; these guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#ifdef __CUDACC__
#define FASTPEFT_HOST_DEVICE __host__ __device__
#else
#define FASTPEFT_HOST_DEVICE
#endif

namespace fastpeft {

constexpr int kNestedShift = 8;  // double quantisation: one nested absmax per 256 blocks

// The float absmax of block b: stored, or decoded from double quantisation's 8-bit codes
// (bitsandbytes' order of operations: level times nested absmax, then the offset).
struct Nf4Scales {
  const float* absmax = nullptr;         // single quantisation
  const uint8_t* codes = nullptr;        // double: one code per block
  const float* nested_absmax = nullptr;  // double: one per 256 blocks
  const float* nested_map = nullptr;     // double: the 256 levels
  float offset = 0.f;

  FASTPEFT_HOST_DEVICE inline float operator()(int64_t b) const {
    if (codes == nullptr) return absmax[b];
    return nested_map[codes[b]] * nested_absmax[b >> kNestedShift] + offset;
  }
};

// Nf4Scales with its kind fixed, for loops that read a scale per step of a few dozen weights: which
// kind it is gets tested once per call (with_fixed_scales), not at every step.
struct SingleScales {
  const float* absmax;
  FASTPEFT_HOST_DEVICE inline float operator()(int64_t b) const { return absmax[b]; }
};
struct NestedScales {
  const uint8_t* codes;
  const float* nested_absmax;
  const float* nested_map;
  float offset;
  FASTPEFT_HOST_DEVICE inline float operator()(int64_t b) const {
    return nested_map[codes[b]] * nested_absmax[b >> kNestedShift] + offset;
  }
};

// fn(SingleScales) or fn(NestedScales), as `scales` holds them.
template <typename F>
void with_fixed_scales(const Nf4Scales& scales, const F& fn) {
  if (scales.codes == nullptr)
    fn(SingleScales{scales.absmax});
  else
    fn(NestedScales{scales.codes, scales.nested_absmax, scales.nested_map, scales.offset});
}

struct Nf4Args {
  at::Tensor x, raw, absmax, qmap;   // contiguous; raw: the packed weight as flat bytes
  at::Tensor nested_absmax, nested_map;  // defined when double-quantised (absmax then holds codes)
  double offset = 0.0;
  int64_t M, N, K;                   // x [M, K] (or [M, N] transposed), weight [N, K]
  int shift;                         // log2(blocksize): element e belongs to block e >> shift

  Nf4Scales scales() const {  // pointers valid while this Nf4Args lives
    Nf4Scales s;
    if (nested_absmax.defined()) {
      s.codes = absmax.data_ptr<uint8_t>();
      s.nested_absmax = nested_absmax.data_ptr<float>();
      s.nested_map = nested_map.data_ptr<float>();
      s.offset = static_cast<float>(offset);
    } else {
      s.absmax = absmax.data_ptr<float>();
    }
    return s;
  }
};

inline Nf4Args check_nf4_matmul_args(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax_in,
                                     const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                                     const std::optional<at::Tensor>& bias, bool transposed,
                                     const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_l,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_map, double offset) {
  TORCH_CHECK(x_in.dim() == 2, "nf4_matmul: x must be 2-D");
  TORCH_CHECK(blocksize >= 2 && (blocksize & (blocksize - 1)) == 0 && out_features > 0,
              "nf4_matmul: blocksize must be a power of two >= 2 and out_features positive");
  Nf4Args a;
  a.shift = 0;
  while ((int64_t{1} << a.shift) < blocksize) ++a.shift;
  a.x = x_in.contiguous();
  // packed bytes as they are (bitsandbytes' [N·K / 2, 1] uint8): a view made per call costs two
  // tensor allocations
  const bool bytes_as_they_are = packed.scalar_type() == at::kByte && packed.is_contiguous();
  a.raw = bytes_as_they_are ? packed : packed.contiguous().view(at::kByte).reshape({-1});
  a.absmax = absmax_in.contiguous();
  a.qmap = quant_map.contiguous();
  TORCH_CHECK(nested_absmax.has_value() == nested_map.has_value(),
              "nf4_matmul: nested_absmax and nested_quant_map come together");
  TORCH_CHECK(a.absmax.scalar_type() == (nested_absmax ? at::kByte : at::kFloat) &&
                  a.qmap.scalar_type() == at::kFloat && a.qmap.numel() == 16,
              "nf4_matmul: absmax must be float32 (uint8 codes when double-quantised), quant_map 16 float32 levels");
  if (nested_absmax) {
    a.nested_absmax = nested_absmax->contiguous();
    a.nested_map = nested_map->contiguous();
    a.offset = offset;
    TORCH_CHECK(a.nested_absmax.scalar_type() == at::kFloat && a.nested_map.scalar_type() == at::kFloat &&
                    a.nested_map.numel() == 256 &&
                    a.nested_absmax.numel() == ((a.absmax.numel() + (1 << kNestedShift) - 1) >> kNestedShift),
                "nf4_matmul: nested_absmax must be float32, one per 256 blocks; nested_quant_map 256 float32 levels");
    TORCH_CHECK(a.nested_absmax.device() == x_in.device() && a.nested_map.device() == x_in.device(),
                "nf4_matmul: every tensor must be on x's device ", x_in.device());
  }
  for (const at::Tensor* t : {&a.raw, &a.absmax, &a.qmap})
    TORCH_CHECK(t->device() == a.x.device(), "nf4_matmul: every tensor must be on x's device ", a.x.device());
  a.M = a.x.size(0);
  a.N = out_features;
  a.K = transposed ? (2 * a.raw.numel()) / a.N : a.x.size(1);
  TORCH_CHECK((a.N * a.K + 1) / 2 == a.raw.numel(), "nf4_matmul: ", a.raw.numel(), " packed bytes do not hold a [",
              a.N, ", ", a.K, "] weight");
  TORCH_CHECK(a.absmax.numel() == (a.N * a.K + blocksize - 1) / blocksize, "nf4_matmul: absmax has ",
              a.absmax.numel(), " entries; expected one per block of ", blocksize);
  TORCH_CHECK(a.x.size(1) == (transposed ? a.N : a.K), "nf4_matmul: x has ", a.x.size(1), " columns; expected ",
              transposed ? a.N : a.K);
  if (bias)
    TORCH_CHECK(!transposed && bias->numel() == a.N && bias->scalar_type() == a.x.scalar_type() &&
                    bias->device() == a.x.device(),
                "nf4_matmul: bias must be [out_features] in x's dtype on x's device (and only without transposed)");
  TORCH_CHECK(lora_s.has_value() == lora_l.has_value(), "nf4_matmul: lora_s and lora_l come together");
  if (lora_s) {
    const int64_t n_out = transposed ? a.K : a.N;
    TORCH_CHECK(lora_s->dim() == 2 && lora_s->size(0) == a.M && lora_l->dim() == 2 &&
                    lora_l->size(0) == lora_s->size(1) && lora_l->size(1) == n_out,
                "nf4_matmul: lora_s must be [M, r] and lora_l [r, ", n_out, "]");
    for (const at::Tensor* t : {&*lora_s, &*lora_l})
      TORCH_CHECK(t->scalar_type() == a.x.scalar_type() && t->device() == a.x.device(),
                  "nf4_matmul: lora_s and lora_l must have x's dtype and device");
  }
  return a;
}

// y += lora_scaling·lora_s·lora_l (the faces without a fused LoRA term add it with one GEMM).
inline void add_nf4_lora_term(at::Tensor& y, const std::optional<at::Tensor>& lora_s,
                              const std::optional<at::Tensor>& lora_l, double lora_scaling) {
  if (lora_s && y.numel() > 0) y.addmm_(*lora_s, *lora_l, 1.0, lora_scaling);
}

// The CPU face (csrc/cpu/nf4_matmul.cpp): the dispatcher's CPU kernel of fastpeft::nf4_matmul, and
// fastpeft._C.cpu_kernels.nf4_matmul.
at::Tensor nf4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& quant_map, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias, bool transposed,
                          const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_l,
                          double lora_scaling, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_map, double absmax_offset);

}  // namespace fastpeft
