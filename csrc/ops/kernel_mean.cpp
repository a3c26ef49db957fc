// torch registration of the Gaussian-kernel weighted mean and its backward (kernels:
// csrc/cpu/kernel_mean.cpp, csrc/cuda/kernel_mean.cu; math: csrc/common/kernel_mean.h; Python
// wrapper, autograd and the reference: genflow/ops/kernel_mean.py).
//
//   genflow::kernel_weighted_mean(queries, keys, values, log_weights, scale, precision)
//       -> (out [N, dv], lse [N])
//       queries [N, d], keys [M, d] (M >= 1), values [M, dv], log_weights [M] or None, all of one
//       dtype (float32 | float64) and device; scale = 1 / (2 sigma^2) > 0; precision 0 (highest),
//       1 (tf32) or 2 (bf16) (KernelPrecision; the CPU always computes at highest precision).
//   genflow::kernel_weighted_mean_backward(queries, keys, values, log_weights, out, lse, grad_out,
//       scale, output_mask) -> (grad_queries?, grad_keys?, grad_values?)
//       out, grad_out [N, dv] and lse [N] as returned by the forward; an output is None where
//       output_mask is false.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/kernel_mean.h"

#ifdef GENFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace genflow {
namespace {

// Shapes, dtypes and devices of the inputs shared by forward and backward; returns the dtype.
Dtype check_inputs(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                   const std::optional<at::Tensor>& log_weights, double scale) {
  const auto s = queries.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble, "queries must be float32 or float64, got ", s);
  TORCH_CHECK(queries.dim() == 2, "queries must have shape [N, d], got ", queries.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == queries.size(1),
              "keys must have shape [M, d] with queries' d = ", queries.size(1), ", got ",
              keys.sizes());
  TORCH_CHECK(keys.size(0) >= 1, "keys must have at least one row (M >= 1), got ", keys.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(0) == keys.size(0),
              "values must have shape [M, dv] with keys' M = ", keys.size(0), ", got ",
              values.sizes());
  checks::dtype_is(keys, "keys", s);
  checks::dtype_is(values, "values", s);
  checks::on_device(keys, "keys", queries.device(), /*cpu_ok=*/false);
  checks::on_device(values, "values", queries.device(), /*cpu_ok=*/false);
  if (log_weights.has_value()) {
    const at::Tensor& lw = *log_weights;
    TORCH_CHECK(lw.dim() == 1 && lw.size(0) == keys.size(0), "log_weights must have shape [M] = [",
                keys.size(0), "], got ", lw.sizes());
    checks::dtype_is(lw, "log_weights", s);
    checks::on_device(lw, "log_weights", queries.device(), /*cpu_ok=*/false);
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale = 1 / (2 sigma^2) must be finite and > 0, got ",
              scale);
  return dtype_of(s);
}

std::tuple<at::Tensor, at::Tensor> kernel_weighted_mean(const at::Tensor& queries, const at::Tensor& keys,
                                                        const at::Tensor& values,
                                                        const std::optional<at::Tensor>& log_weights,
                                                        double scale, int64_t precision) {
  const Dtype dtype = check_inputs(queries, keys, values, log_weights, scale);
  TORCH_CHECK(precision >= kPrecisionHighest && precision <= kPrecisionBF16,
              "precision must be 0 (highest), 1 (tf32) or 2 (bf16), got ", precision);
  const at::Tensor q = queries.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const at::Tensor lw = log_weights.has_value() ? log_weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({q.size(0), v.size(1)}, q.options());
  at::Tensor lse = at::empty({q.size(0)}, q.options());
  if (q.size(0) == 0) return {out, lse};
  KernelMeanParams p{};
  p.queries = q.data_ptr();
  p.keys = k.data_ptr();
  p.values = v.data_ptr();
  p.log_weights = lw.defined() ? lw.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.n = q.size(0);
  p.m = k.size(0);
  p.d = q.size(1);
  p.dv = v.size(1);
  p.scale = scale;
  p.precision = static_cast<int32_t>(precision);
  if (q.device().is_cpu()) {
    kernel_weighted_mean_cpu(p, dtype);
    return {out, lse};
  }
#ifdef GENFLOW_WITH_CUDA
  if (q.device().is_cuda()) {
    c10::cuda::CUDAGuard guard(q.device());
    const cudaError_t err = launch_kernel_weighted_mean(
        p, dtype, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::kernel_weighted_mean: CUDA launch failed: ",
                cudaGetErrorString(err));
    return {out, lse};
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", q.device());
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor> kernel_weighted_mean_backward(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& log_weights, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& grad_out, double scale, std::array<bool, 3> output_mask) {
  const Dtype dtype = check_inputs(queries, keys, values, log_weights, scale);
  const int64_t n = queries.size(0), dv = values.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == dv, "out must have shape [N, dv] = [",
              n, ", ", dv, "], got ", out.sizes());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == dv,
              "grad_out must have shape [N, dv] = [", n, ", ", dv, "], got ", grad_out.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must have shape [N] = [", n, "], got ", lse.sizes());
  checks::same_as(grad_out, "grad_out", out, "out");
  checks::dtype_is(out, "out", queries.scalar_type());
  checks::dtype_is(lse, "lse", queries.scalar_type());
  checks::on_device(out, "out", queries.device(), /*cpu_ok=*/false);
  checks::on_device(lse, "lse", queries.device(), /*cpu_ok=*/false);
  const at::Tensor q = queries.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const at::Tensor lw = log_weights.has_value() ? log_weights->contiguous() : at::Tensor();
  const at::Tensor o = out.contiguous(), l = lse.contiguous(), g = grad_out.contiguous();
  OptTensor dq, dk, dvals;
  if (output_mask[0]) dq = at::empty_like(q);
  if (output_mask[1]) dk = at::empty_like(k);
  if (output_mask[2]) dvals = at::empty_like(v);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dq, dk, dvals};
  KernelMeanBackwardParams p{};
  p.queries = q.data_ptr();
  p.keys = k.data_ptr();
  p.values = v.data_ptr();
  p.log_weights = lw.defined() ? lw.data_ptr() : nullptr;
  p.out = o.data_ptr();
  p.lse = l.data_ptr();
  p.grad_out = g.data_ptr();
  p.grad_queries = dq ? dq->data_ptr() : nullptr;
  p.grad_keys = dk ? dk->data_ptr() : nullptr;
  p.grad_values = dvals ? dvals->data_ptr() : nullptr;
  p.n = n;
  p.m = k.size(0);
  p.d = q.size(1);
  p.dv = dv;
  p.scale = scale;
  if (q.device().is_cpu()) {
    kernel_weighted_mean_backward_cpu(p, dtype);
    return {dq, dk, dvals};
  }
#ifdef GENFLOW_WITH_CUDA
  if (q.device().is_cuda()) {
    c10::cuda::CUDAGuard guard(q.device());
    const cudaError_t err = launch_kernel_weighted_mean_backward(
        p, dtype, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::kernel_weighted_mean_backward: CUDA launch failed: ",
                cudaGetErrorString(err));
    return {dq, dk, dvals};
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", q.device());
}

}  // namespace
}  // namespace genflow

TORCH_LIBRARY_FRAGMENT(genflow, m) {
  m.def("kernel_weighted_mean(Tensor queries, Tensor keys, Tensor values, Tensor? log_weights, "
        "float scale, int precision) -> (Tensor out, Tensor lse)");
  m.def("kernel_weighted_mean_backward(Tensor queries, Tensor keys, Tensor values, Tensor? log_weights, "
        "Tensor out, Tensor lse, Tensor grad_out, float scale, bool[3] output_mask) "
        "-> (Tensor?, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(genflow, CPU, m) {
  m.impl("kernel_weighted_mean", &genflow::kernel_weighted_mean);
  m.impl("kernel_weighted_mean_backward", &genflow::kernel_weighted_mean_backward);
}

#ifdef GENFLOW_WITH_CUDA
TORCH_LIBRARY_IMPL(genflow, CUDA, m) {
  m.impl("kernel_weighted_mean", &genflow::kernel_weighted_mean);
  m.impl("kernel_weighted_mean_backward", &genflow::kernel_weighted_mean_backward);
}
#endif
