// Argument checks for the torch-facing op files (csrc/ops/*.cpp): each message names the
// argument and prints the shapes, dtypes or devices involved. Host-only (uses ATen).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common/fused_update.h"  // Dtype

namespace genflow {

// The kernels' Dtype of a state tensor's scalar type (float32 | float64 | bfloat16 | float16).
inline Dtype dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return Dtype::Float32;
    case at::kDouble: return Dtype::Float64;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    default: TORCH_CHECK(false, "genflow: unsupported dtype ", s);
  }
}

namespace checks {

// t must have ref's shape, dtype and device ("terms[1] must have x's shape [4, 3], got [4]").
inline void same_as(const at::Tensor& t, const std::string& name, const at::Tensor& ref,
                    const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have ", ref_name, "'s shape ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ",
              ref.device(), ", got ", t.device());
}

inline void dtype_is(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// On `device`, or on the CPU when `cpu_ok`.
inline void on_device(const at::Tensor& t, const char* name, const at::Device& device,
                      bool cpu_ok) {
  TORCH_CHECK(t.device() == device || (cpu_ok && t.device().is_cpu()), name, " must be on ",
              device, cpu_ok && !device.is_cpu() ? " (or the CPU)" : "", ", got ", t.device());
}

// float32, float64, bfloat16 or float16 state.
inline void floating_state(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", s);
}

}  // namespace checks
}  // namespace genflow
