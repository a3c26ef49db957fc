// The Hutchinson trace estimator's kernels, shared by the C++ kernels (csrc/cpu/hutchinson.cpp)
// and the CUDA kernels (csrc/cuda/hutchinson.cu); no torch includes.
//
//   probes:    out[i] = z_i (gaussian, kind 1) or +1 where z_i >= 0 else -1 (rademacher, kind 0),
//              z_i = N(seed_b, offset)[stream index of i] the float32 Philox normal stream of
//              csrc/common/philox.h; gaussian values are z rounded to the output dtype, exactly
//              genflow::philox_normal (gf.ops.randn). The stream index is the flat index i (one
//              seed) or the index within sample b (per-sample seeds), as for the fused update.
//   probe_dot: out[b] = accumulate[b] + scale_b * sum_j probe[b, j] v[b, j]
//              (no accumulate: scale_b * sum), in float64: each product is one rounded multiply
//              of the inputs converted to float64 (exact for float32, bfloat16 and float16).
//              Summation order (genflow/ops/hutchinson.py): a sample's flat range is cut into
//              blocks of kProbeBlock = 1024 consecutive elements; a block's sum is the
//              adjacent-pairs tree ((p0 + p1) + (p2 + p3)) + ... over its 1024 products (the
//              positions past the sample's end hold +0, which the tree adds exactly); the block
//              sums are added in increasing block order, ((s0 + s1) + s2) + ...; the finish is
//              two roundings, add_rn(accumulate, mul_rn(scale, sum)), as torch's
//              ``accumulate + scale * sum``.
// Same bits on every device and for every thread count. (A CUDA block of 256 threads makes one
// block sum: thread l owns products 4l..4l+3, then warp shuffles and the 8 warp sums complete
// the same tree.)
#pragma once

#include <cstdint>

#include "common/fused_update.h"  // Dtype, mul_acc / fma_acc
#include "common/langevin.h"      // add_rn / mul_rn (double, rounded once)
#include "common/philox.h"

namespace genflow {

enum ProbeKind : int32_t { kRademacher = 0, kGaussian = 1 };

struct ProbeParams {
  void* out;            // [B, *D] contiguous, of the output dtype
  int64_t numel;        // B * per_sample
  int64_t batch;        // B
  int64_t per_sample;   // elements per sample
  int32_t kind;         // ProbeKind
  // Seeds: seeds[b] when seed_per_sample, else seeds[0]; seeds == nullptr: seed_value.
  const int64_t* seeds;
  bool seed_per_sample;
  uint64_t seed_value;
  uint64_t offset;
};

GF_HD uint64_t probe_seed_at(const ProbeParams& p, int64_t b) {
  if (p.seeds == nullptr) return p.seed_value;
  return static_cast<uint64_t>(p.seed_per_sample ? p.seeds[b] : p.seeds[0]);
}

// The probe value of one float32 stream value (in the accumulation type acc_t).
template <typename acc_t>
GF_HD acc_t probe_value(int32_t kind, float z) {
  if (kind == kGaussian) return static_cast<acc_t>(z);
  return z >= 0.0f ? acc_t(1) : acc_t(-1);
}

// ---- probes: the GPU kernel's unit of work (also run on the host by _hutchinson_probes_grouped)
// Groups of four consecutive elements of one stream (one Philox call); with one seed they tile
// the flat index, with per-sample seeds each sample (the last group of a sample may be partial).
GF_HD int64_t probe_group_count(const ProbeParams& p) {
  return p.seed_per_sample ? p.batch * ((p.per_sample + 3) / 4) : (p.numel + 3) / 4;
}

// Conv: static T store(acc_t) (round to nearest even).
template <typename T, typename acc_t, typename Conv>
GF_HD void probe_group(const ProbeParams& p, int64_t g) {
  T* out = static_cast<T*>(p.out);
  int64_t first, count, stream_group, b = 0;
  if (p.seed_per_sample) {
    const int64_t groups_per_sample = (p.per_sample + 3) / 4;
    b = g / groups_per_sample;
    stream_group = g - b * groups_per_sample;
    first = b * p.per_sample + 4 * stream_group;
    count = p.per_sample - 4 * stream_group;
  } else {
    stream_group = g;
    first = 4 * g;
    count = p.numel - first;
  }
  if (count > 4) count = 4;
  float z[4];
  philox::normal4(probe_seed_at(p, b), p.offset, static_cast<uint64_t>(stream_group), z);
  for (int l = 0; l < 4; ++l) {
    if (l >= count) break;
    out[first + l] = Conv::store(probe_value<acc_t>(p.kind, z[l]));
  }
}

// ---- probe_dot ----

constexpr int64_t kProbeBlock = 1024;  // elements per summation block
constexpr int kProbeDotThreads = 256;  // CUDA threads per block sum: 4 products each

struct ProbeDotParams {
  const void* probe;        // [B, P] contiguous
  const void* v;            // [B, P] contiguous, probe's dtype
  int64_t batch;            // B (>= 1)
  int64_t per_sample;       // P (>= 0)
  int64_t blocks;           // ceil(P / kProbeBlock) summation blocks per sample
  // scale: scale[b] (scale_per_sample) or scale[0]; scale == nullptr: scale_value.
  const double* scale;
  bool scale_per_sample;
  double scale_value;
  const double* accumulate;  // [B] or nullptr (then out = scale * sum)
  double* partial;           // scratch [B, blocks]: the block sums
  double* out;               // [B]
};

GF_HD int64_t probe_dot_blocks(int64_t per_sample) {
  return per_sample <= 0 ? 0 : (per_sample + kProbeBlock - 1) / kProbeBlock;
}

GF_HD double probe_dot_scale(const ProbeDotParams& p, int64_t b) {
  if (p.scale == nullptr) return p.scale_value;
  return p.scale_per_sample ? p.scale[b] : p.scale[0];
}

// Thread l < 256 of the CUDA block for summation block k of sample b: products 4l..4l+3 of the
// block (+0 past the sample's end); returns (p0 + p1) + (p2 + p3). Conv: static acc_t load(T).
template <typename T, typename Conv>
GF_HD double probe_dot_thread_sum(const ProbeDotParams& p, int64_t b, int64_t k, int l) {
  const T* probe = static_cast<const T*>(p.probe);
  const T* v = static_cast<const T*>(p.v);
  const int64_t P = p.per_sample;
  const int64_t j0 = k * kProbeBlock + 4 * l;
  double q[4] = {0.0, 0.0, 0.0, 0.0};
  for (int m = 0; m < 4; ++m) {
    if (j0 + m >= P) break;
    const int64_t i = b * P + j0 + m;
    q[m] = mul_rn(static_cast<double>(Conv::load(probe[i])), static_cast<double>(Conv::load(v[i])));
  }
  return add_rn(add_rn(q[0], q[1]), add_rn(q[2], q[3]));
}

// Sample b's block sums (partial[b * blocks + k]) added in increasing block order, then the
// finish: out[b] = accumulate[b] + scale_b * sum (or scale_b * sum). Host code calling this is
// compiled without FMA contraction (ISO C++ mode), and the CUDA code uses explicit roundings.
GF_HD void probe_dot_finish(const ProbeDotParams& p, int64_t b) {
  const double* part = p.partial + b * p.blocks;
  double sum = 0.0;
  if (p.blocks > 0) {
    sum = part[0];
    for (int64_t k = 1; k < p.blocks; ++k) sum = add_rn(sum, part[k]);
  }
  const double r = mul_rn(probe_dot_scale(p, b), sum);
  p.out[b] = p.accumulate == nullptr ? r : add_rn(p.accumulate[b], r);
}

// Entry points. CPU: csrc/cpu/hutchinson.cpp (at::parallel_for).
void hutchinson_probes_cpu(const ProbeParams& p, Dtype dtype);
void probe_dot_cpu(const ProbeDotParams& p, Dtype dtype);
// The CUDA kernels' per-thread work and block trees, serially on the host (tests of the CUDA
// indexing and summation order on machines without a GPU).
void hutchinson_probes_cpu_grouped(const ProbeParams& p, Dtype dtype);
void probe_dot_cpu_grouped(const ProbeDotParams& p, Dtype dtype);
// CUDA: csrc/cuda/hutchinson.cu; all pointers on the current device, asynchronous on stream.
#if defined(__CUDACC__) || defined(GENFLOW_WITH_CUDA)
cudaError_t launch_hutchinson_probes(const ProbeParams& p, Dtype dtype, cudaStream_t stream);
cudaError_t launch_probe_dot(const ProbeDotParams& p, Dtype dtype, cudaStream_t stream);
#endif

}  // namespace genflow
