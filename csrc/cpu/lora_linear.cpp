// CPU face of fastpeft::lora_linear_fwd / lora_linear_bwd (registered below), and the
// device-generic ATen composition the CUDA face also uses above decode sizes.
#include "../lora_linear.h"

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

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                        double scaling, const std::optional<at::Tensor>& x_lora) {
  check_lora_linear_shapes(x, weight, bias, lora_a, lora_b, x_lora);
  at::Tensor s = at::mm(x_lora ? *x_lora : x, lora_a.t());                   // [M, r]
  at::Tensor y = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(s, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);                     // y += scaling·s·Bᵀ, in place
  return {y, s};
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

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear_fwd", &fastpeft::lora_linear_fwd_aten);
  m.impl("lora_linear_bwd", &fastpeft::lora_linear_bwd_aten);
}
