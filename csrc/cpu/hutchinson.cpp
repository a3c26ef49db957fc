// C++ kernels of the Hutchinson trace estimator's ops (math and summation order in
// csrc/common/hutchinson.h).
//
// probes: an at::parallel_for over the elements (per sample when seeds are per sample); blocks
// of kBlock normals are made into a stack buffer by the vectorised Philox/Box-Muller loop of the
// fused update (normal_range), then one vectorised loop stores z or its sign. Each element is a
// pure function of its index, so the split does not matter.
// probe_dot: an at::parallel_for over the (sample, block) pairs: one vectorised loop forms the
// block's 1024 float64 products in a stack buffer, summed by the adjacent-pairs tree; then each
// sample's block sums are added in order and finished. Block boundaries and orders are fixed:
// the result does not depend on the thread count and equals the CUDA kernels' bitwise. Hot loops
// are compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones; same bits). The finish
// (probe_dot_finish) is called from non-cloned code compiled in ISO C++ mode (no contraction).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "common/hutchinson.h"
#include "cpu/kernel.h"

namespace genflow {
namespace {

constexpr int64_t kBlock = 2048;           // probes: elements per inner block (a multiple of 4)
constexpr int64_t kGrainElements = 32768;  // at least this many elements per parallel_for task

// ---- probes: out[i] = z[i] rounded to T, or its sign ----

#define GF_PROBE_FN(NAME, T)                                                         \
  GF_CLONES void NAME(int kind, const float* z, T* out, int64_t n) {                \
    if (kind == kGaussian) {                                                        \
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(z[i]);                \
    } else {                                                                        \
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(z[i] >= 0.0f ? 1.0f : -1.0f); \
    }                                                                               \
  }
GF_PROBE_FN(probe_store_f32, float)
GF_PROBE_FN(probe_store_f64, double)
GF_PROBE_FN(probe_store_bf16, c10::BFloat16)
GF_PROBE_FN(probe_store_f16, c10::Half)
#undef GF_PROBE_FN

GF_INLINE void probe_store(int kind, const float* z, float* out, int64_t n) { probe_store_f32(kind, z, out, n); }
GF_INLINE void probe_store(int kind, const float* z, double* out, int64_t n) { probe_store_f64(kind, z, out, n); }
GF_INLINE void probe_store(int kind, const float* z, c10::BFloat16* out, int64_t n) {
  probe_store_bf16(kind, z, out, n);
}
GF_INLINE void probe_store(int kind, const float* z, c10::Half* out, int64_t n) {
  probe_store_f16(kind, z, out, n);
}

template <typename T>
void probes_run(const ProbeParams& p) {
  const int64_t P = p.per_sample;
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.numel, kGrainElements, [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kBlock + 8];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = p.seed_per_sample ? i / P : 0;
      const int64_t seg_end = p.seed_per_sample ? std::min(end, (b + 1) * P) : end;
      const uint64_t seed = probe_seed_at(p, b);
      const int64_t stream_base = p.seed_per_sample ? b * P : 0;
      for (int64_t j = i; j < seg_end; j += kBlock) {
        const int64_t n = std::min(kBlock, seg_end - j);
        const float* z = normal_range(seed, p.offset, static_cast<uint64_t>(j - stream_base), n, zbuf);
        probe_store(p.kind, z, out + j, n);
      }
      i = seg_end;
    }
  });
}

// ---- probe_dot: q[j] = probe[j] * v[j] in float64 (one rounding), j < n ----

template <typename T>
GF_INLINE void products_impl(const T* probe, const T* v, int64_t n, double* q) {
  for (int64_t j = 0; j < n; ++j)
    q[j] = static_cast<double>(load(probe[j])) * static_cast<double>(load(v[j]));
}

#define GF_PROD_FN(NAME, T)                                                   \
  GF_CLONES void NAME(const T* probe, const T* v, int64_t n, double* q) {    \
    products_impl<T>(probe, v, n, q);                                        \
  }
GF_PROD_FN(products_f32, float)
GF_PROD_FN(products_f64, double)
GF_PROD_FN(products_bf16, c10::BFloat16)
GF_PROD_FN(products_f16, c10::Half)
#undef GF_PROD_FN

GF_INLINE void products(const float* p, const float* v, int64_t n, double* q) { products_f32(p, v, n, q); }
GF_INLINE void products(const double* p, const double* v, int64_t n, double* q) { products_f64(p, v, n, q); }
GF_INLINE void products(const c10::BFloat16* p, const c10::BFloat16* v, int64_t n, double* q) {
  products_bf16(p, v, n, q);
}
GF_INLINE void products(const c10::Half* p, const c10::Half* v, int64_t n, double* q) {
  products_f16(p, v, n, q);
}

// Adjacent-pairs tree over q[0..n), n a power of two (q is overwritten).
GF_CLONES double pair_tree(double* q, int64_t n) {
  for (; n > 1; n >>= 1)
    for (int64_t i = 0; i < n / 2; ++i) q[i] = q[2 * i] + q[2 * i + 1];
  return q[0];
}

int64_t next_pow2(int64_t n) {
  int64_t m = 1;
  while (m < n) m <<= 1;
  return m;
}

template <typename T>
void dot_run(const ProbeDotParams& p) {
  const int64_t P = p.per_sample, nblk = p.blocks, B = p.batch;
  const T* probe = static_cast<const T*>(p.probe);
  const T* v = static_cast<const T*>(p.v);
  if (nblk > 0) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(P, kProbeBlock));
    at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
      alignas(64) double q[kProbeBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nblk, k = task - b * nblk;
        const int64_t j0 = k * kProbeBlock;
        const int64_t len = std::min(kProbeBlock, P - j0);
        const int64_t n = next_pow2(len);  // the +0 products past the end drop out of the tree
        products(probe + b * P + j0, v + b * P + j0, len, q);
        std::fill(q + len, q + n, 0.0);
        // ... except that the full tree adds them to the first n: s + 0 (-0 becomes +0)
        const double s = pair_tree(q, n);
        p.partial[task] = n < kProbeBlock ? s + 0.0 : s;
      }
    });
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(nblk, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) probe_dot_finish(p, b);
  });
}

// ---- the CUDA kernels' work, serially (tests their indexing and order without a GPU) ----

template <typename T> struct C10Conv {
  using acc_t = typename Acc<T>::type;
  static acc_t load(T v) { return static_cast<acc_t>(v); }
  static T store(acc_t v) { return static_cast<T>(v); }
};

template <typename T>
void probes_grouped(const ProbeParams& p) {
  const int64_t groups = probe_group_count(p);
  for (int64_t g = 0; g < groups; ++g) probe_group<T, typename Acc<T>::type, C10Conv<T>>(p, g);
}

// A CUDA block's reduction of its 256 thread sums: warp trees (shuffle offsets 1..16), then the
// tree over the 8 warp sums: together the adjacent-pairs tree over the threads.
template <typename T>
void dot_grouped(const ProbeDotParams& p) {
  const int64_t B = p.batch, nblk = p.blocks;
  double t[kProbeDotThreads];
  for (int64_t task = 0; task < B * nblk; ++task) {
    const int64_t b = task / nblk, k = task - b * nblk;
    for (int l = 0; l < kProbeDotThreads; ++l) t[l] = probe_dot_thread_sum<T, C10Conv<T>>(p, b, k, l);
    p.partial[task] = pair_tree(t, kProbeDotThreads);
  }
  for (int64_t b = 0; b < B; ++b) probe_dot_finish(p, b);
}

}  // namespace

void hutchinson_probes_cpu(const ProbeParams& p, Dtype dtype) {
  if (p.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return probes_run<float>(p);
    case Dtype::Float64: return probes_run<double>(p);
    case Dtype::BFloat16: return probes_run<c10::BFloat16>(p);
    case Dtype::Float16: return probes_run<c10::Half>(p);
  }
}

void hutchinson_probes_cpu_grouped(const ProbeParams& p, Dtype dtype) {
  if (p.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return probes_grouped<float>(p);
    case Dtype::Float64: return probes_grouped<double>(p);
    case Dtype::BFloat16: return probes_grouped<c10::BFloat16>(p);
    case Dtype::Float16: return probes_grouped<c10::Half>(p);
  }
}

void probe_dot_cpu(const ProbeDotParams& p, Dtype dtype) {
  if (p.batch <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return dot_run<float>(p);
    case Dtype::Float64: return dot_run<double>(p);
    case Dtype::BFloat16: return dot_run<c10::BFloat16>(p);
    case Dtype::Float16: return dot_run<c10::Half>(p);
  }
}

void probe_dot_cpu_grouped(const ProbeDotParams& p, Dtype dtype) {
  if (p.batch <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return dot_grouped<float>(p);
    case Dtype::Float64: return dot_grouped<double>(p);
    case Dtype::BFloat16: return dot_grouped<c10::BFloat16>(p);
    case Dtype::Float16: return dot_grouped<c10::Half>(p);
  }
}

}  // namespace genflow
