// dense_linear: y = x·Wᵀ + bias with a float weight. Schema, checks and the reference live in
// fastpeft/ops/dense_linear.py; this header declares the CPU face (csrc/cpu/dense_linear.cpp).
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

namespace fastpeft {

// The dispatcher's CPU kernel of fastpeft::dense_linear, and lora_linear_fwd's CPU base.
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// The path dense_linear's CPU face takes for an [M, K] x of `dtype` ("float32", "float16" or
// "bfloat16") at the current cpu_isa(): "gemv-avx2" or "aten".
std::string dense_cpu_path(int64_t M, const std::string& dtype);

// The path this thread's last dense_linear CPU call took ("" before any); the CPU face of
// lora_linear_fwd computes its base through dense_linear_cpu, so its calls above one pass count too.
std::string dense_cpu_last_path();

}  // namespace fastpeft
