// Argument checks for the torch-facing op files (csrc/ops/*.cpp): each message names the
// argument and prints the shapes, dtypes or devices involved. Host-only (uses ATen).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
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

// Written outputs: no two elements at one address (e.g. an expand()ed tensor).
inline void no_internal_overlap(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " must not have overlapping memory (several elements at one address, e.g. an "
              "expand()ed tensor), got shape ", t.sizes(), " with strides ", t.strides());
}

// out is `other` itself or shares no memory with it.
inline void no_partial_overlap(const at::Tensor& out, const char* name, const at::Tensor& other,
                               const char* other_name) {
  TORCH_CHECK(at::get_overlap_status(out, other) != at::MemOverlapStatus::Partial, name,
              " must be ", other_name, " itself or not overlap it in memory, got a partial overlap");
}

// A host scalar argument: finite, and >= 0 when `nonnegative`.
inline void finite(double v, const char* name, bool nonnegative = false) {
  TORCH_CHECK(std::isfinite(v) && (!nonnegative || v >= 0), name, " must be finite",
              nonnegative ? " and >= 0" : "", ", got ", v);
}

// Autograd-key kernel of an op without a derivative: while grad mode is on, an input that
// requires grad is an error (instead of outputs that silently carry no gradient); otherwise the
// call goes on to the backend kernel. Register with
//   TORCH_LIBRARY_IMPL(genflow, Autograd, m) {
//     m.impl("op", torch::CppFunction::makeFromBoxedFunction<&checks::not_differentiable>()); }
inline void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                               torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  if (at::GradMode::is_enabled()) {
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      bool grad = v.isTensor() && v.toTensor().requires_grad();
      if (v.isTensorList())
        for (const at::Tensor& t : v.toTensorVector()) grad = grad || t.requires_grad();
      TORCH_CHECK(!grad, op.schema().name(), " is not differentiable: ", args[i].name(),
                  " must not require grad, got requires_grad=True (pass ", args[i].name(),
                  ".detach() or call it under torch.no_grad())");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace checks
}  // namespace genflow
