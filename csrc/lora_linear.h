// lora_linear: y = x·Wᵀ + bias + scaling·(x_lora·Aᵀ)·Bᵀ. Schema, checks and the reference live in
// fastpeft/ops/lora_linear.py; this header declares the C++ faces' shared pieces.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace fastpeft {

// Device-generic ATen composition (the CUDA face above decode sizes; the CPU face takes the same
// steps with dense_linear's CPU face for the base):
// the LoRA delta is added into the base output with one in-place addmm, so no [M, N] delta tensor,
// no separate scale and no separate add are ever made (PEFT's layer makes all three).
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                        double scaling, const std::optional<at::Tensor>& x_lora);

// Backward: dx = dy·W + scaling·(dy·B)·A with the second GEMM accumulated in place into the first.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& s, double scaling, const std::optional<at::Tensor>& x_lora);

// The CPU face (csrc/cpu/lora_linear.cpp): the dispatcher's CPU kernel of fastpeft::lora_linear_fwd,
// and fastpeft._C.cpu_kernels.lora_linear_fwd.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scaling, const std::optional<at::Tensor>& x_lora);

// The checks a kernel relies on to never read out of bounds (the Python entry checks more, with
// friendlier messages, before any face runs; these guard direct torch.ops calls).
void check_lora_linear_shapes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& x_lora);

}  // namespace fastpeft
