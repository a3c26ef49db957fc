// torch registration of the Langevin corrector step (kernels: csrc/cpu/langevin.cpp,
// csrc/cuda/langevin.cu; math and reduction order: csrc/common/langevin.h).
//
//   genflow::langevin_update(x, model_out, coef, noise, seed, offset, batch_mean) -> out
//       s = a x + b model_out, eps_b = r ||z_b||^2 / ||s_b||^2 (batch_mean: r (sum ||z|| / sum ||s||)^2),
//       out = x + eps s + sqrt(2 eps) z,  coef = (a, b, r), r = 2 alpha_i snr^2
//   genflow::langevin_update_out(..., out)          the same into out (out may be x)
//
// x (Tensor[B, *D]) float32 | float64 | bfloat16 | float16; model_out like x; coef (float64 [3]
// or [3, B]) on x's device or the CPU (there its values must be finite, r >= 0); exactly one of
// noise (Tensor[B, *D] like x) or seed (int64 [1]: one stream over the flat index, or [B]: one
// stream per sample; x's device or the CPU), as for genflow::fused_update. offset >= 0.
// langevin_update_out rejects inputs that require grad (it has no autograd formula).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/langevin.h"

#ifdef GENFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace genflow {
namespace {

// Inputs made contiguous, scratch and the step coefficients stay alive here while the kernels
// run; params point into them.
struct LangevinLaunch {
  LangevinParams p{};
  std::vector<at::Tensor> keep;
  at::Device device{at::kCPU};
  Dtype dtype{Dtype::Float32};
};

// Validate the arguments; fill everything but p.update.out.
LangevinLaunch prepare(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                       const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& seed, int64_t offset, bool batch_mean) {
  LangevinLaunch launch;
  auto& p = launch.p;
  auto& u = p.update;
  launch.device = x.device();
  checks::floating_state(x, "x");
  launch.dtype = dtype_of(x.scalar_type());
  checks::same_as(model_out, "model_out", x, "x");
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  const int64_t B = x.dim() >= 1 ? x.size(0) : 1;
  u.numel = x.numel();
  u.batch = B;
  u.per_sample = B > 0 ? u.numel / B : 0;
  u.num_terms = 1;
  u.offset = static_cast<uint64_t>(offset);
  p.batch_mean = batch_mean;
  p.chunks = langevin_chunks(u.per_sample);

  at::Tensor x_c = x.contiguous(), m_c = model_out.contiguous();
  launch.keep.push_back(x_c);
  launch.keep.push_back(m_c);
  u.x = x_c.data_ptr();
  u.terms[0] = m_c.data_ptr();

  // coef: float64 (a, b, r), [3] or [3, B]
  checks::dtype_is(coef, "coef", at::kDouble);
  const bool coef_ok = (coef.dim() == 1 && coef.size(0) == 3) ||
                       (coef.dim() == 2 && coef.size(0) == 3 && coef.size(1) == B);
  TORCH_CHECK(coef_ok, "coef must have shape [3] or [3, B] = [3, ", B,
              "] (a, b, r: score = a x + b model_out, r = 2 alpha_i snr^2), got ", coef.sizes());
  checks::on_device(coef, "coef", x.device(), /*cpu_ok=*/true);
  p.coef_per_sample = coef.dim() == 2;
  if (coef.device().is_cpu()) {  // host values: checked without a device sync
    const at::Tensor c = coef.contiguous();
    const double* v = c.data_ptr<double>();
    const int64_t per_row = p.coef_per_sample ? B : 1;
    const char* names[3] = {"coef[0] (a)", "coef[1] (b)", "coef[2] (r = 2 alpha_i snr^2)"};
    for (int64_t i = 0; i < 3 * per_row; ++i)
      checks::finite(v[i], names[i / per_row], /*nonnegative=*/i >= 2 * per_row);
  }
  if (coef.device().is_cpu() && !p.coef_per_sample) {
    at::Tensor c = coef.contiguous();
    p.coef = nullptr;
    for (int k = 0; k < 3; ++k) p.coef_value[k] = c.data_ptr<double>()[k];
  } else {
    at::Tensor c = coef.to(x.device()).contiguous();
    launch.keep.push_back(c);
    p.coef = c.data_ptr<double>();
  }

  TORCH_CHECK(noise.has_value() != seed.has_value(),
              noise.has_value() ? "pass either noise or seed (to generate the noise in the kernel), not both"
                                : "langevin_update needs noise: pass noise or seed");
  if (noise.has_value()) {
    checks::same_as(*noise, "noise", x, "x");
    at::Tensor n = noise->contiguous();
    launch.keep.push_back(n);
    u.noise = n.data_ptr();
    u.noise_mode = kSuppliedNoise;
  } else {
    checks::dtype_is(*seed, "seed", at::kLong);
    TORCH_CHECK(seed->dim() == 1 && (seed->size(0) == 1 || seed->size(0) == B),
                "seed must have shape [1] (one stream) or [B] = [", B,
                "] (one stream per sample), got ", seed->sizes());
    checks::on_device(*seed, "seed", x.device(), /*cpu_ok=*/true);
    u.noise_mode = kGeneratedNoise;
    u.seed_per_sample = seed->size(0) > 1;
    if (seed->size(0) == 0) {  // [B] with B = 0: nothing is generated
      u.seeds = nullptr;
      u.seed_value = 0;
    } else if (seed->device().is_cpu() && !u.seed_per_sample) {
      u.seeds = nullptr;
      u.seed_value = static_cast<uint64_t>(seed->contiguous().data_ptr<int64_t>()[0]);
    } else {
      at::Tensor s = seed->to(x.device()).contiguous();
      launch.keep.push_back(s);
      u.seeds = s.data_ptr<int64_t>();
    }
  }

  // scratch and the pass-2 coefficients, on the kernel's device
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({std::max<int64_t>(B * p.chunks * 2, 1)}, f64);
  at::Tensor norms = at::empty({std::max<int64_t>(B * 2, 1)}, f64);
  at::Tensor step = at::empty({std::max<int64_t>(B * 3, 1)}, f64);
  launch.keep.insert(launch.keep.end(), {partial, norms, step});
  p.partial = partial.data_ptr<double>();
  p.norms = norms.data_ptr<double>();
  p.step = step.data_ptr<double>();
  u.coef = p.step;
  u.coef_per_sample = true;
  return launch;
}

void run(const LangevinLaunch& launch) {
  if (launch.p.update.numel == 0) return;
  if (launch.device.is_cpu()) {
    langevin_update_cpu(launch.p, launch.dtype);
    return;
  }
#ifdef GENFLOW_WITH_CUDA
  if (launch.device.is_cuda()) {
    c10::cuda::CUDAGuard guard(launch.device);
    const cudaError_t err = launch_langevin_update(
        launch.p, launch.dtype, c10::cuda::getCurrentCUDAStream(launch.device.index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::langevin_update: CUDA launch failed: ",
                cudaGetErrorString(err));
    return;
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", launch.device);
}

at::Tensor langevin_update(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                           const std::optional<at::Tensor>& noise,
                           const std::optional<at::Tensor>& seed, int64_t offset, bool batch_mean) {
  LangevinLaunch launch = prepare(x, model_out, coef, noise, seed, offset, batch_mean);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch.p.update.out = out.data_ptr();
  run(launch);
  return out;
}

// out (like x; may be x, model_out or noise, but must not partially overlap one): pass 1 reads
// every input before pass 2 writes, and pass 2 is elementwise.
void langevin_update_out(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                         const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& seed, int64_t offset, bool batch_mean,
                         const at::Tensor& out) {
  LangevinLaunch launch = prepare(x, model_out, coef, noise, seed, offset, batch_mean);
  checks::same_as(out, "out", x, "x");
  checks::no_internal_overlap(out, "out");
  checks::no_partial_overlap(out, "out", x, "x");
  checks::no_partial_overlap(out, "out", model_out, "model_out");
  if (noise.has_value()) checks::no_partial_overlap(out, "out", *noise, "noise");
  if (out.is_contiguous()) {
    launch.p.update.out = out.data_ptr();
    run(launch);
    return;
  }
  at::Tensor dest = at::empty(x.sizes(), x.options());
  launch.p.update.out = dest.data_ptr();
  run(launch);
  out.copy_(dest);
}

// Test hook: the CUDA kernels' per-thread work and block reductions run serially on the CPU,
// so that their indexing and summation order are checked against the CPU kernel without a GPU.
at::Tensor langevin_update_grouped(const at::Tensor& x, const at::Tensor& model_out,
                                   const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                   const std::optional<at::Tensor>& seed, int64_t offset,
                                   bool batch_mean) {
  LangevinLaunch launch = prepare(x, model_out, coef, noise, seed, offset, batch_mean);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch.p.update.out = out.data_ptr();
  langevin_update_cpu_grouped(launch.p, launch.dtype);
  return out;
}

}  // namespace
}  // namespace genflow

TORCH_LIBRARY_FRAGMENT(genflow, m) {
  m.def("langevin_update(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, Tensor? seed, "
        "int offset, bool batch_mean=False) -> Tensor");
  m.def("langevin_update_out(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, "
        "Tensor? seed, int offset, bool batch_mean, Tensor(a!) out) -> ()");
  m.def("_langevin_update_grouped(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, "
        "Tensor? seed, int offset, bool batch_mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(genflow, CPU, m) {
  m.impl("langevin_update", &genflow::langevin_update);
  m.impl("langevin_update_out", &genflow::langevin_update_out);
  m.impl("_langevin_update_grouped", &genflow::langevin_update_grouped);
}

// langevin_update has its autograd formula in genflow/ops/langevin.py; the out= variant has none.
TORCH_LIBRARY_IMPL(genflow, Autograd, m) {
  m.impl("langevin_update_out",
         torch::CppFunction::makeFromBoxedFunction<&genflow::checks::not_differentiable>());
}

#ifdef GENFLOW_WITH_CUDA
TORCH_LIBRARY_IMPL(genflow, CUDA, m) {
  m.impl("langevin_update", &genflow::langevin_update);
  m.impl("langevin_update_out", &genflow::langevin_update_out);
}
#endif
