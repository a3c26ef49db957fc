// The Langevin corrector step (Song et al. 2021, Algorithms 4/5), shared by the C++ kernel
// (csrc/cpu/langevin.cpp) and the CUDA kernel (csrc/cuda/langevin.cu); no torch includes.
//
//   s = a x + b model_out                      (the score; a, b per sample or scalar)
//   eps_b = r ||z_b||^2 / ||s_b||^2           (r = 2 alpha_i snr^2; 0 where ||s_b|| = 0)
//     or, batch_mean: eps_b = r (sum_c ||z_c|| / sum_c ||s_c||)^2   (Song et al.'s code)
//   out = (1 + eps a) x + eps b model_out + sqrt(2 eps) z
//
// Two passes over memory. Pass 1 forms s and z (supplied, or the Philox stream of
// csrc/common/philox.h, rounded to the state dtype exactly as the fused update makes it) in
// registers and reduces the per-sample sums of squares in float64. Pass 2 is the fused update
// (csrc/common/fused_update.h) with the per-sample coefficients (1 + eps a, eps b, sqrt(2 eps)),
// regenerating z from its counter. Between them a tiny step turns the sums into coefficients.
//
// The reductions have one fixed order, on every device and for every thread count:
//   - s_i is fma(b, model_out_i, a * x_i) in the accumulation type (float32, float64 for
//     float64 state), like fused_combine; the sums are float64: acc = fma(v, v, acc).
//   - a sample is cut into chunks of kLangevinChunk = 4096 elements (the last one partial);
//     in a chunk, lane q < 1024 accumulates elements q, q + 1024, q + 2048, q + 3072 in that
//     order, and the chunk sum is the adjacent-pairs tree over the lanes
//     ((L0 + L1) + (L2 + L3)) + ...; lanes past the end hold +0, which the tree adds exactly.
//   - a sample's chunk sums, and for batch_mean the per-sample norms, are reduced the same way:
//     lane q adds items q, q + 1024, ... in order (from +0), then the adjacent-pairs tree.
// A CUDA block of 256 threads reproduces this exactly (thread l owns lanes 4l..4l+3, i.e. one
// group of four consecutive elements per 1024, which is one Philox call); the CPU kernel and
// genflow/ops/_reference.py (langevin_sums) compute the same sums. The coefficient arithmetic
// is explicit double operations, each rounded once.
#pragma once

#include <cstdint>

#include "common/fused_update.h"
#include "common/philox.h"

namespace genflow {

constexpr int64_t kLangevinChunk = 4096;  // elements per reduction chunk (a multiple of 4)
constexpr int kLangevinLanes = 1024;      // lanes per chunk
constexpr int kLangevinThreads = 256;     // CUDA threads per chunk: 4 lanes each

struct LangevinParams {
  // Pass 2 (and the inputs of pass 1): x, terms[0] = model_out, the noise (supplied or seeds +
  // offset), out, sizes. num_terms = 1; coef = step (written between the passes), per sample.
  FusedUpdateParams update;
  // (a, b, r): coef[k] or, when coef_per_sample, coef[k * batch + b] ([3, B] on the kernel's
  // device); coef == nullptr: coef_value[k].
  const double* coef;
  bool coef_per_sample;
  double coef_value[3];
  bool batch_mean;   // one eps from the batch-mean norms (Song et al.'s code)
  int64_t chunks;    // chunks per sample, ceil(per_sample / kLangevinChunk)
  double* partial;   // scratch [B, chunks, 2]: chunk sums of s^2 and z^2
  double* norms;     // scratch [B, 2]: per-sample sums (||s_b||^2, ||z_b||^2)
  double* step;      // [3, B]: the pass-2 coefficients (update.coef == step)
};

GF_HD int64_t langevin_chunks(int64_t per_sample) {
  return per_sample <= 0 ? 0 : (per_sample + kLangevinChunk - 1) / kLangevinChunk;
}

GF_HD double langevin_coef(const LangevinParams& p, int k, int64_t b) {
  if (p.coef == nullptr) return p.coef_value[k];
  return p.coef_per_sample ? p.coef[k * p.update.batch + b] : p.coef[k];
}

// ---- double arithmetic rounded once per operation (never contracted into an fma) ----

GF_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GF_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GF_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
GF_HD double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);
#endif
}

// eps for sample b from its sums (per-sample rule) or the batch sums of norms (batch_mean),
// then the pass-2 coefficients (1 + eps a, eps b, sqrt(2 eps)) into step[k * B + b].
// Host code calling this is compiled without FMA contraction (see csrc/cpu/langevin.cpp).
GF_HD void langevin_finalize(const LangevinParams& p, int64_t b, double ss, double zz,
                             double sum_s, double sum_z) {
  const double a = langevin_coef(p, 0, b), bc = langevin_coef(p, 1, b), r = langevin_coef(p, 2, b);
  double eps;
  if (p.batch_mean) {
    const double q = sum_s == 0.0 ? 0.0 : div_rn(sum_z, sum_s);
    eps = mul_rn(r, mul_rn(q, q));
  } else {
    eps = ss == 0.0 ? 0.0 : div_rn(mul_rn(r, zz), ss);
  }
  const int64_t B = p.update.batch;
  p.step[b] = add_rn(1.0, mul_rn(eps, a));
  p.step[B + b] = mul_rn(eps, bc);
  p.step[2 * B + b] = sqrt_rn(mul_rn(2.0, eps));
}

// ---- pass 1, the GPU's unit of work (also run on the host by genflow::_langevin_grouped) ----
//
// Thread l < 256 of the block for chunk c of sample b: lanes 4l..4l+3, i.e. the groups of four
// elements at offsets 4l + 1024k (k = 0..3) of the chunk. Returns the thread's partial sums
// (L0 + L1) + (L2 + L3) of s^2 (sums[0]) and z^2 (sums[1]).
// Conv: static acc_t load(T), static T store(acc_t) (round to nearest even).
template <typename T, typename acc_t, int Mode, typename Conv>
GF_HD void langevin_thread_sums(const LangevinParams& p, int64_t b, int64_t c, int l,
                                double sums[2]) {
  const FusedUpdateParams& u = p.update;
  const T* x = static_cast<const T*>(u.x);
  const T* mo = static_cast<const T*>(u.terms[0]);
  const T* noise = static_cast<const T*>(u.noise);
  const int64_t P = u.per_sample;
  const acc_t ca = static_cast<acc_t>(langevin_coef(p, 0, b));
  const acc_t cb = static_cast<acc_t>(langevin_coef(p, 1, b));
  const uint64_t seed = Mode == kGeneratedNoise ? seed_at(u, b) : 0u;
  double ls[4] = {0.0, 0.0, 0.0, 0.0}, lz[4] = {0.0, 0.0, 0.0, 0.0};
  for (int k = 0; k < 4; ++k) {
    const int64_t j0 = c * kLangevinChunk + 1024 * k + 4 * l;  // index within the sample
    if (j0 >= P) break;
    const int64_t count = P - j0 < 4 ? P - j0 : 4;
    const int64_t i0 = b * P + j0;  // flat index
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (Mode == kGeneratedNoise) {
      // stream index of element j0: within the sample (per-sample seeds) or flat
      const uint64_t n0 = static_cast<uint64_t>(u.seed_per_sample ? j0 : i0);
      const unsigned lead = static_cast<unsigned>(n0 & 3u);
      float g[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      philox::normal4(seed, u.offset, n0 >> 2, g);
      if (lead != 0u && lead + count > 4) philox::normal4(seed, u.offset, (n0 >> 2) + 1u, g + 4);
      for (int m = 0; m < 4; ++m) z[m] = g[lead + m];
    }
    for (int m = 0; m < 4; ++m) {
      if (m >= count) break;
      const int64_t i = i0 + m;
      const acc_t s = fma_acc(cb, Conv::load(mo[i]), mul_acc(ca, Conv::load(x[i])));
      acc_t zi = acc_t(0);
      if (Mode == kSuppliedNoise) zi = Conv::load(noise[i]);
      if (Mode == kGeneratedNoise) zi = Conv::load(Conv::store(static_cast<acc_t>(z[m])));
      const double sd = static_cast<double>(s), zd = static_cast<double>(zi);
      ls[m] = fma_acc(sd, sd, ls[m]);
      lz[m] = fma_acc(zd, zd, lz[m]);
    }
  }
  sums[0] = add_rn(add_rn(ls[0], ls[1]), add_rn(ls[2], ls[3]));
  sums[1] = add_rn(add_rn(lz[0], lz[1]), add_rn(lz[2], lz[3]));
}

// Lanes 4l..4l+3 of a lane reduction over n items item(j) (j < n): lane q adds items
// q + 1024k in order from +0; returns (L0 + L1) + (L2 + L3) of the thread's lanes.
template <typename Item>
GF_HD double lane_thread_sum(int64_t n, int l, Item item) {
  double L[4] = {0.0, 0.0, 0.0, 0.0};
  for (int m = 0; m < 4; ++m)
    for (int64_t j = 4 * l + m; j < n; j += kLangevinLanes) L[m] = add_rn(L[m], item(j));
  return add_rn(add_rn(L[0], L[1]), add_rn(L[2], L[3]));
}

// Entry points. CPU: csrc/cpu/langevin.cpp (at::parallel_for over chunks, then samples).
void langevin_update_cpu(const LangevinParams& p, Dtype dtype);
// The CUDA kernels' per-thread work and block trees run serially on the host (a test of the
// CUDA indexing and reduction order on machines without a GPU).
void langevin_update_cpu_grouped(const LangevinParams& p, Dtype dtype);
// CUDA: csrc/cuda/langevin.cu; all pointers on the current device, asynchronous on stream.
#if defined(__CUDACC__) || defined(GENFLOW_WITH_CUDA)
cudaError_t launch_langevin_update(const LangevinParams& p, Dtype dtype, cudaStream_t stream);
#endif

}  // namespace genflow
