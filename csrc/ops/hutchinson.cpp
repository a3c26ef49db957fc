// torch registration of the Hutchinson trace estimator's ops (kernels: csrc/cpu/hutchinson.cpp,
// csrc/cuda/hutchinson.cu; math and summation order: csrc/common/hutchinson.h; Python wrappers
// and the reference: genflow/ops/hutchinson.py).
//
//   genflow::hutchinson_probes(seed, offset, size, dtype, kind) -> Tensor[size] on seed's device
//       kind 0 (rademacher): +1 where the float32 stream N(seed, offset)[i] >= 0, else -1;
//       kind 1 (gaussian): the stream rounded to dtype (exactly genflow::philox_normal).
//       seed int64 [1] (one stream over the flat index) or [B] (one stream per sample); offset >= 0.
//   genflow::probe_dot(probe, v, scale, accumulate) -> float64 [B] on probe's device
//       accumulate[b] + scale_b * sum_{*D} probe[b] v[b]; probe, v [B, *D] of one dtype
//       (float32 | float64 | bfloat16 | float16); scale float64 [1] or [B] (probe's device or the
//       CPU; finite there); accumulate float64 [B] on probe's device, or None. Not differentiable:
//       inputs that require grad are rejected.
//   genflow::_hutchinson_probes_grouped / _probe_dot_grouped (CPU only): test hooks running the
//       CUDA kernels' per-thread work serially on the host.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/hutchinson.h"

#ifdef GENFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace genflow {
namespace {

// ---- probes ----

struct ProbeLaunch {
  ProbeParams p{};
  std::vector<at::Tensor> keep;
  at::Device device{at::kCPU};
  Dtype dtype{Dtype::Float32};
  at::Tensor out;
};

ProbeLaunch prepare_probes(const at::Tensor& seed, int64_t offset, at::IntArrayRef size,
                           at::ScalarType dtype, int64_t kind) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(kind == kRademacher || kind == kGaussian,
              "kind must be 0 (rademacher) or 1 (gaussian), got ", kind);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  for (const int64_t s : size) TORCH_CHECK(s >= 0, "size must be non-negative, got ", size);
  ProbeLaunch launch;
  auto& p = launch.p;
  launch.device = seed.device();
  launch.dtype = dtype_of(dtype);
  launch.out = at::empty(size, seed.options().dtype(dtype));
  const int64_t B = size.empty() ? 1 : size[0];
  checks::dtype_is(seed, "seed", at::kLong);
  TORCH_CHECK(seed.dim() == 1 && (seed.size(0) == 1 || seed.size(0) == B),
              "seed must have shape [1] (one stream) or [B] = [", B,
              "] (one stream per sample), got ", seed.sizes());
  p.out = launch.out.data_ptr();
  p.numel = launch.out.numel();
  p.batch = B;
  p.per_sample = B > 0 ? p.numel / B : 0;
  p.kind = static_cast<int32_t>(kind);
  p.offset = static_cast<uint64_t>(offset);
  p.seed_per_sample = seed.size(0) != 1;  // [B] with B != 1 (B = 0: nothing is generated)
  if (seed.size(0) == 0) {
    p.seeds = nullptr;
    p.seed_value = 0;
  } else if (seed.device().is_cpu() && !p.seed_per_sample) {
    p.seeds = nullptr;
    p.seed_value = static_cast<uint64_t>(seed.contiguous().data_ptr<int64_t>()[0]);
  } else {
    at::Tensor s = seed.contiguous();
    launch.keep.push_back(s);
    p.seeds = s.data_ptr<int64_t>();
  }
  return launch;
}

at::Tensor hutchinson_probes(const at::Tensor& seed, int64_t offset, at::IntArrayRef size,
                             at::ScalarType dtype, int64_t kind) {
  ProbeLaunch launch = prepare_probes(seed, offset, size, dtype, kind);
  if (launch.p.numel == 0) return launch.out;
  if (launch.device.is_cpu()) {
    hutchinson_probes_cpu(launch.p, launch.dtype);
    return launch.out;
  }
#ifdef GENFLOW_WITH_CUDA
  if (launch.device.is_cuda()) {
    c10::cuda::CUDAGuard guard(launch.device);
    const cudaError_t err = launch_hutchinson_probes(
        launch.p, launch.dtype, c10::cuda::getCurrentCUDAStream(launch.device.index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::hutchinson_probes: CUDA launch failed: ",
                cudaGetErrorString(err));
    return launch.out;
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", launch.device);
}

// Test hook: the CUDA kernel's group loop (probe_group) serially on the CPU.
at::Tensor hutchinson_probes_grouped(const at::Tensor& seed, int64_t offset, at::IntArrayRef size,
                                     at::ScalarType dtype, int64_t kind) {
  ProbeLaunch launch = prepare_probes(seed, offset, size, dtype, kind);
  hutchinson_probes_cpu_grouped(launch.p, launch.dtype);
  return launch.out;
}

// ---- probe_dot ----

struct DotLaunch {
  ProbeDotParams p{};
  std::vector<at::Tensor> keep;
  at::Device device{at::kCPU};
  Dtype dtype{Dtype::Float32};
  at::Tensor out;
};

DotLaunch prepare_dot(const at::Tensor& probe, const at::Tensor& v, const at::Tensor& scale,
                      const std::optional<at::Tensor>& accumulate) {
  checks::floating_state(probe, "probe");
  TORCH_CHECK(probe.dim() >= 1, "probe must have a batch dimension [B, *D], got a 0-dim tensor");
  checks::same_as(v, "v", probe, "probe");
  DotLaunch launch;
  auto& p = launch.p;
  launch.device = probe.device();
  launch.dtype = dtype_of(probe.scalar_type());
  const int64_t B = probe.size(0);
  p.batch = B;
  p.per_sample = B > 0 ? probe.numel() / B : 0;
  p.blocks = probe_dot_blocks(p.per_sample);

  checks::dtype_is(scale, "scale", at::kDouble);
  TORCH_CHECK(scale.dim() == 1 && (scale.size(0) == 1 || scale.size(0) == B),
              "scale must have shape [1] or [B] = [", B, "], got ", scale.sizes());
  checks::on_device(scale, "scale", probe.device(), /*cpu_ok=*/true);
  p.scale_per_sample = scale.size(0) != 1;  // [B] with B != 1
  if (scale.device().is_cpu()) {  // host values: checked without a device sync
    const at::Tensor s = scale.contiguous();
    for (int64_t b = 0; b < s.size(0); ++b) checks::finite(s.data_ptr<double>()[b], "scale");
  }
  if (scale.size(0) == 0) {
    p.scale = nullptr;
    p.scale_value = 0.0;
  } else if (scale.device().is_cpu() && !p.scale_per_sample) {
    p.scale = nullptr;
    p.scale_value = scale.contiguous().data_ptr<double>()[0];
  } else {
    at::Tensor s = scale.to(probe.device()).contiguous();
    launch.keep.push_back(s);
    p.scale = s.data_ptr<double>();
  }
  if (accumulate.has_value()) {
    const at::Tensor& a = *accumulate;
    checks::dtype_is(a, "accumulate", at::kDouble);
    TORCH_CHECK(a.dim() == 1 && a.size(0) == B, "accumulate must have shape [B] = [", B, "], got ",
                a.sizes());
    checks::on_device(a, "accumulate", probe.device(), /*cpu_ok=*/false);
    at::Tensor ac = a.contiguous();
    launch.keep.push_back(ac);
    p.accumulate = ac.data_ptr<double>();
  } else {
    p.accumulate = nullptr;
  }

  at::Tensor pc = probe.contiguous(), vc = v.contiguous();
  launch.keep.push_back(pc);
  launch.keep.push_back(vc);
  p.probe = pc.data_ptr();
  p.v = vc.data_ptr();
  const auto f64 = probe.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({std::max<int64_t>(B * p.blocks, 1)}, f64);
  launch.keep.push_back(partial);
  p.partial = partial.data_ptr<double>();
  launch.out = at::empty({B}, f64);
  p.out = launch.out.data_ptr<double>();
  return launch;
}

at::Tensor probe_dot(const at::Tensor& probe, const at::Tensor& v, const at::Tensor& scale,
                     const std::optional<at::Tensor>& accumulate) {
  DotLaunch launch = prepare_dot(probe, v, scale, accumulate);
  if (launch.p.batch == 0) return launch.out;
  if (launch.device.is_cpu()) {
    probe_dot_cpu(launch.p, launch.dtype);
    return launch.out;
  }
#ifdef GENFLOW_WITH_CUDA
  if (launch.device.is_cuda()) {
    c10::cuda::CUDAGuard guard(launch.device);
    const cudaError_t err = launch_probe_dot(
        launch.p, launch.dtype, c10::cuda::getCurrentCUDAStream(launch.device.index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::probe_dot: CUDA launch failed: ",
                cudaGetErrorString(err));
    return launch.out;
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", launch.device);
}

// Test hook: the CUDA kernels' per-thread products, block trees and finish serially on the CPU.
at::Tensor probe_dot_grouped(const at::Tensor& probe, const at::Tensor& v, const at::Tensor& scale,
                             const std::optional<at::Tensor>& accumulate) {
  DotLaunch launch = prepare_dot(probe, v, scale, accumulate);
  probe_dot_cpu_grouped(launch.p, launch.dtype);
  return launch.out;
}

}  // namespace
}  // namespace genflow

TORCH_LIBRARY_FRAGMENT(genflow, m) {
  m.def("hutchinson_probes(Tensor seed, int offset, SymInt[] size, ScalarType dtype, int kind) -> Tensor");
  m.def("probe_dot(Tensor probe, Tensor v, Tensor scale, Tensor? accumulate) -> Tensor");
  m.def("_hutchinson_probes_grouped(Tensor seed, int offset, SymInt[] size, ScalarType dtype, "
        "int kind) -> Tensor");
  m.def("_probe_dot_grouped(Tensor probe, Tensor v, Tensor scale, Tensor? accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(genflow, CPU, m) {
  m.impl("hutchinson_probes", &genflow::hutchinson_probes);
  m.impl("probe_dot", &genflow::probe_dot);
  m.impl("_hutchinson_probes_grouped", &genflow::hutchinson_probes_grouped);
  m.impl("_probe_dot_grouped", &genflow::probe_dot_grouped);
}

TORCH_LIBRARY_IMPL(genflow, Autograd, m) {
  m.impl("probe_dot", torch::CppFunction::makeFromBoxedFunction<&genflow::checks::not_differentiable>());
}

#ifdef GENFLOW_WITH_CUDA
TORCH_LIBRARY_IMPL(genflow, CUDA, m) {
  m.impl("hutchinson_probes", &genflow::hutchinson_probes);
  m.impl("probe_dot", &genflow::probe_dot);
}
#endif
