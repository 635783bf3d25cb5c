// CPU face of fastpeft::sgmv_shrink / sgmv_expand: one BLAS GEMM per segment of tokens sharing an
// adapter, rows gathered with index_select and scattered back with index_copy_/index_add_. PEFT's
// mixed batch does the same per adapter from Python, through boolean masks built from a list of
// adapter names per row; here the routing is built once per batch and the loop runs in C++.
#include "../lora_gather.h"

#include <torch/library.h>

namespace fastpeft {
namespace {

struct Segment {
  int64_t start, length, slot;
};

// The segments to run, each checked against the tensors it indexes: a bad routing value is an
// error here, never an out-of-bounds read.
std::vector<Segment> checked_segments(const char* op, int64_t T, int64_t S, const at::Tensor& sorted_tokens,
                                      const at::Tensor& seg_starts, const at::Tensor& seg_lens,
                                      const at::Tensor& seg_adapters) {
  for (const auto* t : {&sorted_tokens, &seg_starts, &seg_lens, &seg_adapters}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->device().is_cpu(), op,
                ": routing tensors must be 1-D int32 on the CPU");
  }
  TORCH_CHECK(sorted_tokens.size(0) == T, op, ": sorted_tokens must have one entry per token (", T, ")");
  const auto U = seg_starts.size(0);
  TORCH_CHECK(seg_lens.size(0) == U && seg_adapters.size(0) == U, op, ": segment tensors differ in length");
  auto starts = seg_starts.contiguous(), lens = seg_lens.contiguous(), slots = seg_adapters.contiguous();
  auto tokens = sorted_tokens.contiguous();
  const int32_t* tok = tokens.data_ptr<int32_t>();
  std::vector<Segment> segments;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t start = starts.data_ptr<int32_t>()[u], length = lens.data_ptr<int32_t>()[u];
    const int64_t slot = slots.data_ptr<int32_t>()[u];
    TORCH_CHECK(start >= 0 && length >= 0 && start + length <= T, op, ": segment ", u, " [", start, ", ",
                start + length, ") lies outside the ", T, " tokens");
    TORCH_CHECK(slot >= 0 && slot < S, op, ": segment ", u, " names slot ", slot, ", outside [0, ", S, ")");
    for (int64_t i = start; i < start + length; ++i) {
      TORCH_CHECK(tok[i] >= 0 && tok[i] < T, op, ": sorted_tokens[", i, "] = ", tok[i], " is not a token index");
    }
    if (length > 0) segments.push_back({start, length, slot});
  }
  return segments;
}

}  // namespace

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_tokens,
                           const at::Tensor& seg_starts, const at::Tensor& seg_lens, const at::Tensor& seg_adapters,
                           int64_t /*max_seg_len*/) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_a.size(2) == x.size(1),
              "sgmv_shrink: x must be [T, K] and lora_a [S, R, K]");
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type(), "sgmv_shrink: lora_a must have x's dtype");
  const auto segments = checked_segments("sgmv_shrink", x.size(0), lora_a.size(0), sorted_tokens, seg_starts,
                                         seg_lens, seg_adapters);
  at::Tensor s = at::zeros({x.size(0), lora_a.size(1)}, x.options());
  const at::Tensor tokens = sorted_tokens.to(at::kLong);
  for (const auto& seg : segments) {
    const at::Tensor idx = tokens.narrow(0, seg.start, seg.length);
    s.index_copy_(0, idx, at::mm(x.index_select(0, idx), lora_a.select(0, seg.slot).t()));
  }
  return s;
}

at::Tensor sgmv_expand_cpu(const at::Tensor& base, const at::Tensor& s, const at::Tensor& lora_b,
                           const at::Tensor& scalings, const at::Tensor& sorted_tokens, const at::Tensor& seg_starts,
                           const at::Tensor& seg_lens, const at::Tensor& seg_adapters, int64_t /*max_seg_len*/) {
  TORCH_CHECK(base.dim() == 2 && s.dim() == 2 && lora_b.dim() == 3 && s.size(0) == base.size(0) &&
                  lora_b.size(1) == base.size(1) && lora_b.size(2) == s.size(1),
              "sgmv_expand: base must be [T, N], s [T, R], lora_b [S, N, R]");
  TORCH_CHECK(s.scalar_type() == base.scalar_type() && lora_b.scalar_type() == base.scalar_type(),
              "sgmv_expand: s and lora_b must have base's dtype");
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == lora_b.size(0) && scalings.scalar_type() == at::kFloat,
              "sgmv_expand: scalings must be float32 [S]");
  const auto segments = checked_segments("sgmv_expand", base.size(0), lora_b.size(0), sorted_tokens, seg_starts,
                                         seg_lens, seg_adapters);
  at::Tensor out = base.clone();
  const at::Tensor tokens = sorted_tokens.to(at::kLong);
  const auto scale = scalings.contiguous();
  for (const auto& seg : segments) {
    const at::Tensor idx = tokens.narrow(0, seg.start, seg.length);
    const double alpha = scale.data_ptr<float>()[seg.slot];
    out.index_add_(0, idx, at::mm(s.index_select(0, idx), lora_b.select(0, seg.slot).t()), alpha);
  }
  return out;
}

// out[slot] = sum over the segments naming slot of a[tokens]^T . b[tokens], summed in float32 (the
// stacks' gradients): one GEMM per segment, accumulated into the slot's matrix.
at::Tensor sgmv_outer_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sorted_tokens,
                          const at::Tensor& seg_starts, const at::Tensor& seg_lens, const at::Tensor& seg_adapters,
                          int64_t /*max_seg_len*/, int64_t num_slots) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "sgmv_outer: a must be [T, P] and b [T, Q]");
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "sgmv_outer: b must have a's dtype");
  TORCH_CHECK(num_slots >= 1, "sgmv_outer: num_slots must be >= 1");
  const auto segments = checked_segments("sgmv_outer", a.size(0), num_slots, sorted_tokens, seg_starts, seg_lens,
                                         seg_adapters);
  at::Tensor out = at::zeros({num_slots, a.size(1), b.size(1)}, a.options().dtype(at::kFloat));
  const at::Tensor tokens = sorted_tokens.to(at::kLong);
  for (const auto& seg : segments) {
    const at::Tensor idx = tokens.narrow(0, seg.start, seg.length);
    out.select(0, seg.slot).addmm_(a.index_select(0, idx).to(at::kFloat).t(), b.index_select(0, idx).to(at::kFloat));
  }
  return out.to(a.scalar_type());
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("sgmv_shrink", &fastpeft::sgmv_shrink_cpu);
  m.impl("sgmv_expand", &fastpeft::sgmv_expand_cpu);
  m.impl("sgmv_outer", &fastpeft::sgmv_outer_cpu);
}
