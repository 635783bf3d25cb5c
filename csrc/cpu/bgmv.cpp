// CPU face of fastpeft::bgmv_shrink / bgmv_expand: the rows are grouped by adapter slot here (a
// stable sort of the ids) and handed to the segment path of csrc/cpu/sgmv.cpp, so each slot's
// factors are read once per batch instead of once per row.
#include "../lora_gather.h"

#include <torch/library.h>

namespace fastpeft {
namespace {

// (sorted_tokens, seg_starts, seg_lens, seg_adapters) from per-token slots; ids outside [0, S) are
// left out (those rows keep s = 0, out = base).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> segments_of(const at::Tensor& adapter_ids, int64_t S) {
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.scalar_type() == at::kInt && adapter_ids.device().is_cpu(),
              "bgmv: adapter_ids must be a 1-D int32 CPU tensor");
  const at::Tensor ids = adapter_ids.to(at::kLong);
  const at::Tensor in_range = ids.ge(0).logical_and(ids.lt(S));
  const at::Tensor key = at::where(in_range, ids, at::full_like(ids, -1));
  const at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(key + 1, /*weights=*/{}, /*minlength=*/S + 1);
  const at::Tensor starts = counts.cumsum(0) - counts;
  const at::Tensor present = counts.slice(0, 1).nonzero().flatten();
  return {order.to(at::kInt), starts.slice(0, 1).index_select(0, present).to(at::kInt),
          counts.slice(0, 1).index_select(0, present).to(at::kInt), present.to(at::kInt)};
}

at::Tensor bgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& adapter_ids) {
  TORCH_CHECK(lora_a.dim() == 3, "bgmv_shrink: lora_a must be [S, R, K]");
  TORCH_CHECK(adapter_ids.size(0) == x.size(0), "bgmv_shrink: adapter_ids must have one entry per row of x");
  auto [tokens, starts, lens, slots] = segments_of(adapter_ids, lora_a.size(0));
  return sgmv_shrink_cpu(x, lora_a, tokens, starts, lens, slots, 0);
}

at::Tensor bgmv_expand_cpu(const at::Tensor& base, const at::Tensor& s, const at::Tensor& lora_b,
                           const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  TORCH_CHECK(lora_b.dim() == 3, "bgmv_expand: lora_b must be [S, N, R]");
  TORCH_CHECK(adapter_ids.size(0) == base.size(0), "bgmv_expand: adapter_ids must have one entry per row of base");
  auto [tokens, starts, lens, slots] = segments_of(adapter_ids, lora_b.size(0));
  return sgmv_expand_cpu(base, s, lora_b, scalings, tokens, starts, lens, slots, 0);
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("bgmv_shrink", &fastpeft::bgmv_shrink_cpu);
  m.impl("bgmv_expand", &fastpeft::bgmv_expand_cpu);
}
