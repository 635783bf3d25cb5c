// Mixed-adapter LoRA products (BGMV per token, SGMV per segment). Schemas, checks and references
// live in fastpeft/ops/bgmv.py and fastpeft/ops/sgmv.py.
#pragma once

#include <ATen/ATen.h>

namespace fastpeft {

// Segment routing as fastpeft.ops.AdapterBatch holds it (int32 tensors on the CPU).
at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& sorted_tokens,
                           const at::Tensor& seg_starts, const at::Tensor& seg_lens, const at::Tensor& seg_adapters,
                           int64_t max_seg_len);
at::Tensor sgmv_expand_cpu(const at::Tensor& base, const at::Tensor& s, const at::Tensor& lora_b,
                           const at::Tensor& scalings, const at::Tensor& sorted_tokens, const at::Tensor& seg_starts,
                           const at::Tensor& seg_lens, const at::Tensor& seg_adapters, int64_t max_seg_len);

}  // namespace fastpeft
