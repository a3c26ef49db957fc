// torch registration of the fused update and its noise stream (kernels: csrc/cpu/fused_update.cpp,
// csrc/cuda/fused_update.cu; math: csrc/common/fused_update.h, csrc/common/philox.h).
//
//   genflow::fused_update(x, terms, coef, noise, seed, offset) -> out
//       out = c0 x + sum_{k=1..K} c_k terms[k-1] + s z,  coef = (c0, c1..cK, s)
//   genflow::fused_update_out(..., out, nonfinite, step) the same into out (out may be x);
//       nonfinite (int32 [1] on x's device, optional): set to min(nonfinite, step) when some
//       element written is NaN/Inf (gf.sample's divergence check; no extra pass over out)
//   genflow::philox_normal(seed, offset, size, dtype)   the noise stream z alone
//   genflow::philox_normal_out(seed, offset, out)
//
// x (Tensor[B, *D]) float32 | float64 | bfloat16 | float16; terms: K <= 4 tensors like x;
// coef (float64 [K+2] or [K+2, B]) on x's device or the CPU; noise (Tensor[B, *D] like x) or
// seed (int64 [1]: one stream over the flat index, or [B]: one stream per sample) on x's device
// or the CPU, not both; without either the noise term is dropped (and s must be 0 when coef is
// on the CPU). offset >= 0 selects an independent stream for the same seed.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/fused_update.h"

#ifdef GENFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace genflow {
namespace {

int64_t batch_of(const at::Tensor& t) { return t.dim() >= 1 ? t.size(0) : 1; }

// Inputs made contiguous (and moved to the kernel's device) stay alive here while the kernel
// runs; params points into them.
struct Launch {
  FusedUpdateParams p{};
  std::vector<at::Tensor> keep;
  at::Device device{at::kCPU};
  Dtype dtype{Dtype::Float32};
};

void run(const Launch& launch) {
  if (launch.p.numel == 0) return;
  if (launch.device.is_cpu()) {
    fused_update_cpu(launch.p, launch.dtype);
    return;
  }
#ifdef GENFLOW_WITH_CUDA
  if (launch.device.is_cuda()) {
    c10::cuda::CUDAGuard guard(launch.device);
    const cudaError_t err = launch_fused_update(
        launch.p, launch.dtype, c10::cuda::getCurrentCUDAStream(launch.device.index()).stream());
    TORCH_CHECK(err == cudaSuccess, "genflow::fused_update: CUDA launch failed: ",
                cudaGetErrorString(err));
    return;
  }
#endif
  TORCH_CHECK(false, "genflow: no kernel for device ", launch.device);
}

// seed (int64 [1] or [B]) -> launch.p seed fields. [1] on the CPU is passed by value.
void set_seed(Launch& launch, const at::Tensor& seed, int64_t batch, const at::Device& device) {
  checks::dtype_is(seed, "seed", at::kLong);
  TORCH_CHECK(seed.dim() == 1 && (seed.size(0) == 1 || seed.size(0) == batch),
              "seed must have shape [1] (one stream) or [B] = [", batch,
              "] (one stream per sample), got ", seed.sizes());
  checks::on_device(seed, "seed", device, /*cpu_ok=*/true);
  auto& p = launch.p;
  p.seed_per_sample = seed.size(0) > 1;
  if (seed.size(0) == 0) {  // B = 0: nothing is drawn, and there is no element to read
    p.seeds = nullptr;
    p.seed_value = 0;
    return;
  }
  if (seed.device().is_cpu() && !p.seed_per_sample) {
    p.seeds = nullptr;
    p.seed_value = static_cast<uint64_t>(seed.contiguous().data_ptr<int64_t>()[0]);
    return;
  }
  at::Tensor s = seed.to(device).contiguous();
  launch.keep.push_back(s);
  p.seeds = s.data_ptr<int64_t>();
}

// Validate x, terms, coef, noise, seed, offset; fill everything but p.out.
Launch prepare(const at::Tensor& x, at::TensorList terms, const at::Tensor& coef,
               const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
               int64_t offset) {
  Launch launch;
  auto& p = launch.p;
  launch.device = x.device();
  checks::floating_state(x, "x");
  launch.dtype = dtype_of(x.scalar_type());
  const int64_t K = static_cast<int64_t>(terms.size());
  TORCH_CHECK(K <= kMaxTerms, "terms must hold at most ", kMaxTerms, " tensors, got ", K);
  const int64_t B = batch_of(x);
  p.numel = x.numel();
  p.batch = B;
  p.per_sample = B > 0 ? p.numel / B : 0;
  p.num_terms = static_cast<int32_t>(K);
  p.offset = static_cast<uint64_t>(offset);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);

  at::Tensor x_c = x.contiguous();
  launch.keep.push_back(x_c);
  p.x = x_c.data_ptr();
  for (int64_t k = 0; k < K; ++k) {
    checks::same_as(terms[k], "terms[" + std::to_string(k) + "]", x, "x");
    at::Tensor t = terms[k].contiguous();
    launch.keep.push_back(t);
    p.terms[k] = t.data_ptr();
  }

  // coef: float64 [K+2] or [K+2, B]
  checks::dtype_is(coef, "coef", at::kDouble);
  const bool coef_ok = (coef.dim() == 1 && coef.size(0) == K + 2) ||
                       (coef.dim() == 2 && coef.size(0) == K + 2 && coef.size(1) == B);
  TORCH_CHECK(coef_ok, "coef must have shape [K+2] = [", K + 2, "] or [K+2, B] = [", K + 2,
              ", ", B, "] (c0, c1..cK, s for K = ", K, " terms, B = x.size(0)), got ",
              coef.sizes());
  checks::on_device(coef, "coef", x.device(), /*cpu_ok=*/true);
  p.coef_per_sample = coef.dim() == 2;
  at::Tensor coef_cpu = coef.device().is_cpu() ? coef.contiguous() : at::Tensor();
  if (coef_cpu.defined() && !p.coef_per_sample) {
    p.coef = nullptr;
    for (int64_t k = 0; k < K + 2; ++k) p.coef_value[k] = coef_cpu.data_ptr<double>()[k];
  } else {
    at::Tensor c = coef.to(x.device()).contiguous();
    launch.keep.push_back(c);
    p.coef = c.data_ptr<double>();
  }

  TORCH_CHECK(!(noise.has_value() && seed.has_value()),
              "pass either noise or seed (to generate the noise in the kernel), not both");
  if (noise.has_value()) {
    checks::same_as(*noise, "noise", x, "x");
    at::Tensor n = noise->contiguous();
    launch.keep.push_back(n);
    p.noise = n.data_ptr();
    p.noise_mode = kSuppliedNoise;
  } else if (seed.has_value()) {
    set_seed(launch, *seed, B, x.device());
    p.noise_mode = kGeneratedNoise;
  } else {
    p.noise_mode = kNoNoise;
    if (coef_cpu.defined()) {  // a CUDA coef is not read back (that would synchronise)
      // read the noise-scale row in place (no tensor ops: this runs on every call)
      const double* s = coef_cpu.data_ptr<double>() + (p.coef_per_sample ? (K + 1) * B : K + 1);
      const int64_t n = p.coef_per_sample ? B : 1;
      bool zero = true;
      for (int64_t b = 0; b < n && zero; ++b) zero = s[b] == 0.0;
      TORCH_CHECK(zero, "seed (or noise) is required: the noise scale coef[K+1] = coef[", K + 1,
                  "] is nonzero but neither noise nor seed was given");
    }
  }
  return launch;
}

// out (like x, no partial overlap with any input) <- update; computes into a contiguous
// buffer and copies back when out is not contiguous.
void write_into(Launch& launch, const at::Tensor& x, at::TensorList terms,
                const std::optional<at::Tensor>& noise, const at::Tensor& out) {
  checks::same_as(out, "out", x, "x");
  checks::no_internal_overlap(out, "out");
  checks::no_partial_overlap(out, "out", x, "x");
  for (size_t k = 0; k < terms.size(); ++k)
    checks::no_partial_overlap(out, "out", terms[k], ("terms[" + std::to_string(k) + "]").c_str());
  if (noise.has_value()) checks::no_partial_overlap(out, "out", *noise, "noise");
  if (out.is_contiguous()) {
    launch.p.out = out.data_ptr();
    run(launch);
    return;
  }
  at::Tensor dest = at::empty(x.sizes(), x.options());
  launch.p.out = dest.data_ptr();
  run(launch);
  out.copy_(dest);
}

at::Tensor fused_update(const at::Tensor& x, at::TensorList terms, const at::Tensor& coef,
                        const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& seed, int64_t offset) {
  Launch launch = prepare(x, terms, coef, noise, seed, offset);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch.p.out = out.data_ptr();
  run(launch);
  return out;
}

// nonfinite (int32 [1] on x's device) and step in [0, 2^31) -> launch.p.
void set_nonfinite(Launch& launch, const at::Tensor& x, const at::Tensor& nonfinite,
                   int64_t step) {
  checks::dtype_is(nonfinite, "nonfinite", at::kInt);
  TORCH_CHECK(nonfinite.dim() == 1 && nonfinite.size(0) == 1,
              "nonfinite must have shape [1] (one int32 flag), got ", nonfinite.sizes());
  checks::on_device(nonfinite, "nonfinite", x.device(), /*cpu_ok=*/false);
  TORCH_CHECK(step >= 0 && step <= INT32_MAX, "step must be in [0, 2^31), got ", step);
  launch.p.nonfinite = nonfinite.data_ptr<int32_t>();
  launch.p.step = static_cast<int32_t>(step);
}

void fused_update_out(const at::Tensor& x, at::TensorList terms, const at::Tensor& coef,
                      const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& seed, int64_t offset,
                      const at::Tensor& out, const std::optional<at::Tensor>& nonfinite,
                      int64_t step) {
  Launch launch = prepare(x, terms, coef, noise, seed, offset);
  if (nonfinite.has_value()) set_nonfinite(launch, x, *nonfinite, step);
  write_into(launch, x, terms, noise, out);
}

void philox_normal_out(const at::Tensor& seed, int64_t offset, const at::Tensor& out) {
  checks::floating_state(out, "out");
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  checks::no_internal_overlap(out, "out");
  Launch launch;
  launch.device = out.device();
  launch.dtype = dtype_of(out.scalar_type());
  auto& p = launch.p;
  const int64_t B = batch_of(out);
  p.x = nullptr;
  p.num_terms = 0;
  p.noise_mode = kGeneratedNoise;
  p.numel = out.numel();
  p.batch = B;
  p.per_sample = B > 0 ? p.numel / B : 0;
  p.offset = static_cast<uint64_t>(offset);
  p.coef = nullptr;
  p.coef_value[0] = 0.0;  // c0 (no x)
  p.coef_value[1] = 1.0;  // s
  set_seed(launch, seed, B, out.device());
  if (out.is_contiguous()) {
    p.out = out.data_ptr();
    run(launch);
    return;
  }
  at::Tensor dest = at::empty(out.sizes(), out.options());
  p.out = dest.data_ptr();
  run(launch);
  out.copy_(dest);
}

at::Tensor philox_normal(const at::Tensor& seed, int64_t offset, at::IntArrayRef size,
                         at::ScalarType dtype) {
  at::Tensor out = at::empty(size, seed.options().dtype(dtype));
  philox_normal_out(seed, offset, out);
  return out;
}

// ---- autograd (functional fused_update only) ----
//
// d out / d x = c0, d out / d terms[k] = c_{k+1}, d out / d noise = s (per sample when coef is
// [K+2, B]); d out / d coef[k] = the k-th input (x, terms, z), summed over the elements of each
// sample (or all elements). Generated noise z is regenerated from (seed, offset) when needed.
class FusedUpdateFunction : public torch::autograd::Function<FusedUpdateFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            at::TensorList terms, const at::Tensor& coef,
                            const std::optional<at::Tensor>& noise,
                            const std::optional<at::Tensor>& seed, int64_t offset) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("genflow::fused_update", "")
                           .typed<decltype(fused_update)>();
      out = op.call(x, terms, coef, noise, seed, offset);
    }
    std::vector<at::Tensor> saved = {x, coef, noise.value_or(at::Tensor()),
                                     seed.value_or(at::Tensor())};
    for (const auto& t : terms) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["coef_grad"] = coef.requires_grad();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& coef = saved[1];
    const at::Tensor& noise = saved[2];
    const at::Tensor& seed = saved[3];
    const int64_t K = static_cast<int64_t>(saved.size()) - 4;
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const bool per_sample = coef.dim() == 2;
    std::vector<int64_t> cshape;
    if (per_sample && x.dim() > 0) {
      cshape.assign(static_cast<size_t>(x.dim()), 1);
      cshape[0] = coef.size(1);
    }
    auto c = [&](int64_t k) { return coef.select(0, k).to(x.device(), acc).reshape(cshape); };
    const at::Tensor g = grads[0].to(acc);
    torch::autograd::variable_list out(static_cast<size_t>(K + 5));
    out[0] = (c(0) * g).to(x.scalar_type());
    for (int64_t k = 0; k < K; ++k) out[1 + k] = (c(k + 1) * g).to(x.scalar_type());
    if (noise.defined()) out[K + 2] = (c(K + 1) * g).to(x.scalar_type());
    if (ctx->saved_data["coef_grad"].toBool()) {
      at::Tensor z;
      if (noise.defined()) {
        z = noise;
      } else if (seed.defined()) {
        static auto normal = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("genflow::philox_normal", "")
                                 .typed<decltype(philox_normal)>();
        z = normal.call(seed.to(x.device()), ctx->saved_data["offset"].toInt(), x.sizes(),
                        x.scalar_type());
      } else {
        z = at::zeros_like(x);
      }
      std::vector<int64_t> dims;
      for (int64_t d = per_sample ? 1 : 0; d < x.dim(); ++d) dims.push_back(d);
      std::vector<at::Tensor> rows;
      for (int64_t k = 0; k < K + 2; ++k) {
        const at::Tensor& v = k == 0 ? x : (k <= K ? saved[3 + k] : z);
        at::Tensor prod = (g * v.to(acc)).to(at::kDouble);
        rows.push_back(dims.empty() ? prod : prod.sum(dims));
      }
      out[K + 1] = at::stack(rows).to(coef.device());
    }
    return out;  // seed and offset get no gradient
  }
};

at::Tensor fused_update_autograd(const at::Tensor& x, at::TensorList terms, const at::Tensor& coef,
                                 const std::optional<at::Tensor>& noise,
                                 const std::optional<at::Tensor>& seed, int64_t offset) {
  return FusedUpdateFunction::apply(x, terms, coef, noise, seed, offset);
}

// Test hook: the CUDA kernel's group loop (fused_update_group) run serially on the CPU, so that
// its indexing is checked against the CPU kernel on machines without a GPU. stream_only: output
// the noise stream alone (the philox_normal path), in x's shape and dtype.
at::Tensor fused_update_grouped(const at::Tensor& x, at::TensorList terms, const at::Tensor& coef,
                                const std::optional<at::Tensor>& noise,
                                const std::optional<at::Tensor>& seed, int64_t offset,
                                bool stream_only) {
  Launch launch = prepare(x, terms, coef, noise, seed, offset);
  if (stream_only) {
    TORCH_CHECK(seed.has_value(), "stream_only needs seed");
    launch.p.x = nullptr;
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch.p.out = out.data_ptr();
  fused_update_cpu_grouped(launch.p, launch.dtype);
  return out;
}

}  // namespace
}  // namespace genflow

TORCH_LIBRARY_FRAGMENT(genflow, m) {
  m.def("fused_update(Tensor x, Tensor[] terms, Tensor coef, Tensor? noise, Tensor? seed, "
        "int offset) -> Tensor");
  m.def("fused_update_out(Tensor x, Tensor[] terms, Tensor coef, Tensor? noise, Tensor? seed, "
        "int offset, Tensor(a!) out, Tensor(b!)? nonfinite=None, int step=0) -> ()");
  m.def("philox_normal(Tensor seed, int offset, SymInt[] size, ScalarType dtype) -> Tensor");
  m.def("philox_normal_out(Tensor seed, int offset, Tensor(a!) out) -> ()");
  m.def("_fused_update_grouped(Tensor x, Tensor[] terms, Tensor coef, Tensor? noise, "
        "Tensor? seed, int offset, bool stream_only) -> Tensor");
}

TORCH_LIBRARY_IMPL(genflow, CPU, m) {
  m.impl("fused_update", &genflow::fused_update);
  m.impl("fused_update_out", &genflow::fused_update_out);
  m.impl("philox_normal", &genflow::philox_normal);
  m.impl("philox_normal_out", &genflow::philox_normal_out);
  m.impl("_fused_update_grouped", &genflow::fused_update_grouped);
}

TORCH_LIBRARY_IMPL(genflow, Autograd, m) {
  m.impl("fused_update", &genflow::fused_update_autograd);
}

#ifdef GENFLOW_WITH_CUDA
TORCH_LIBRARY_IMPL(genflow, CUDA, m) {
  m.impl("fused_update", &genflow::fused_update);
  m.impl("fused_update_out", &genflow::fused_update_out);
  m.impl("philox_normal", &genflow::philox_normal);
  m.impl("philox_normal_out", &genflow::philox_normal_out);
}
#endif
