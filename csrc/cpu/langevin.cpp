// C++ kernel of the Langevin corrector step (layout and reduction order in
// csrc/common/langevin.h; pass 2 is the fused update's own CPU kernel).
//
// Pass 1 is an at::parallel_for over the (sample, chunk) pairs: a chunk's normals are made into
// a stack buffer by a vectorised Philox/Box-Muller loop, then one vectorised loop forms s and
// accumulates s^2 and z^2 into 1024 float64 lanes (independent lanes, so the vectoriser keeps
// the order), summed by the adjacent-pairs tree. The per-sample and batch reductions and the
// coefficients follow on a few values per sample. Chunk boundaries and orders are fixed, so the
// result does not depend on the thread count, and equals the CUDA kernels' bitwise. Hot loops
// are compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones; same bits, explicit
// fmas). The coefficient math (langevin_finalize) is called from non-cloned code: this file is
// compiled in ISO C++ mode, where GCC does not contract a * b + c into an fma.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "common/langevin.h"
#include "cpu/kernel.h"

namespace genflow {
namespace {

// At least this many elements (or chunk sums) per parallel_for task: smaller work runs inline,
// without waking the thread pool (as the fused update's own kernel does).
constexpr int64_t kGrainElements = 32768;

// ---- pass 1 on one chunk: lanes ls/lz[q] += s^2 / z^2 of elements q + 1024 k ----

template <typename T, int Mode>
GF_INLINE void chunk_impl(const T* x, const T* mo, const T* noise, const float* z, int64_t len,
                          typename Acc<T>::type ca, typename Acc<T>::type cb, double* ls,
                          double* lz) {
  using acc_t = typename Acc<T>::type;
  for (int64_t k0 = 0; k0 < len; k0 += kLangevinLanes) {
    const int64_t n = std::min<int64_t>(kLangevinLanes, len - k0);
    const T* xk = x + k0;
    const T* mk = mo + k0;
    for (int64_t q = 0; q < n; ++q) {
      const acc_t s = fma_acc(cb, load(mk[q]), mul_acc(ca, load(xk[q])));
      acc_t zi = acc_t(0);
      if (Mode == kSuppliedNoise) zi = load(noise[k0 + q]);
      if (Mode == kGeneratedNoise) zi = noise_value<T>(z[k0 + q]);
      const double sd = static_cast<double>(s), zd = static_cast<double>(zi);
      ls[q] = fma_acc(sd, sd, ls[q]);
      lz[q] = fma_acc(zd, zd, lz[q]);
    }
  }
}

#define GF_CHUNK_FN(NAME, T)                                                                   \
  GF_CLONES void NAME(int mode, const T* x, const T* mo, const T* noise, const float* z,       \
                      int64_t len, Acc<T>::type ca, Acc<T>::type cb, double* ls, double* lz) { \
    if (mode == kGeneratedNoise)                                                               \
      return chunk_impl<T, kGeneratedNoise>(x, mo, noise, z, len, ca, cb, ls, lz);             \
    return chunk_impl<T, kSuppliedNoise>(x, mo, noise, z, len, ca, cb, ls, lz);                \
  }
GF_CHUNK_FN(chunk_f32, float)
GF_CHUNK_FN(chunk_f64, double)
GF_CHUNK_FN(chunk_bf16, c10::BFloat16)
GF_CHUNK_FN(chunk_f16, c10::Half)
#undef GF_CHUNK_FN

GF_INLINE void chunk_fn(int mode, const float* x, const float* mo, const float* nz, const float* z,
                        int64_t len, float ca, float cb, double* ls, double* lz) {
  chunk_f32(mode, x, mo, nz, z, len, ca, cb, ls, lz);
}
GF_INLINE void chunk_fn(int mode, const double* x, const double* mo, const double* nz,
                        const float* z, int64_t len, double ca, double cb, double* ls, double* lz) {
  chunk_f64(mode, x, mo, nz, z, len, ca, cb, ls, lz);
}
GF_INLINE void chunk_fn(int mode, const c10::BFloat16* x, const c10::BFloat16* mo,
                        const c10::BFloat16* nz, const float* z, int64_t len, float ca, float cb,
                        double* ls, double* lz) {
  chunk_bf16(mode, x, mo, nz, z, len, ca, cb, ls, lz);
}
GF_INLINE void chunk_fn(int mode, const c10::Half* x, const c10::Half* mo, const c10::Half* nz,
                        const float* z, int64_t len, float ca, float cb, double* ls, double* lz) {
  chunk_f16(mode, x, mo, nz, z, len, ca, cb, ls, lz);
}

// ---- the fixed-order sums ----

int64_t next_pow2(int64_t n) {
  int64_t m = 1;
  while (m < n) m <<= 1;
  return m;
}

// Adjacent-pairs tree over v[0..n), n a power of two (v is overwritten).
double pair_tree(double* v, int64_t n) {
  for (; n > 1; n >>= 1)
    for (int64_t i = 0; i < n / 2; ++i) v[i] = v[2 * i] + v[2 * i + 1];
  return v[0];
}

// The lane reduction of n items (langevin.h): lane q adds items q + 1024 k in order, then the
// tree. With n < 1024 the lanes past next_pow2(n) hold +0 and drop out of the tree exactly.
template <typename Item>
double lane_sum(int64_t n, Item item) {
  double lanes[kLangevinLanes];
  const int64_t nl = std::min<int64_t>(kLangevinLanes, next_pow2(std::max<int64_t>(n, 1)));
  for (int64_t q = 0; q < nl; ++q) {
    double acc = 0.0;
    for (int64_t j = q; j < n; j += kLangevinLanes) acc = acc + item(j);
    lanes[q] = acc;
  }
  return pair_tree(lanes, nl);
}

// Per-sample sums from the chunk sums, the batch sums, and the coefficients.
void finish(const LangevinParams& p) {
  const int64_t B = p.update.batch, nch = p.chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(nch, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double* part = p.partial + 2 * b * nch;
      p.norms[2 * b] = lane_sum(nch, [&](int64_t j) { return part[2 * j]; });
      p.norms[2 * b + 1] = lane_sum(nch, [&](int64_t j) { return part[2 * j + 1]; });
    }
  });
  double sum_s = 0.0, sum_z = 0.0;
  if (p.batch_mean) {
    sum_s = lane_sum(B, [&](int64_t b) { return sqrt_rn(p.norms[2 * b]); });
    sum_z = lane_sum(B, [&](int64_t b) { return sqrt_rn(p.norms[2 * b + 1]); });
  }
  for (int64_t b = 0; b < B; ++b)
    langevin_finalize(p, b, p.norms[2 * b], p.norms[2 * b + 1], sum_s, sum_z);
}

template <typename T>
void run(const LangevinParams& p, Dtype dtype) {
  using acc_t = typename Acc<T>::type;
  const FusedUpdateParams& u = p.update;
  const int64_t P = u.per_sample, nch = p.chunks;
  const T* x = static_cast<const T*>(u.x);
  const T* mo = static_cast<const T*>(u.terms[0]);
  const T* noise = static_cast<const T*>(u.noise);
  const int mode = u.noise_mode;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(P, kLangevinChunk));
  at::parallel_for(0, u.batch * nch, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kLangevinChunk + 8];
    alignas(64) double ls[kLangevinLanes];
    alignas(64) double lz[kLangevinLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nch, c = task - b * nch;
      const int64_t j0 = c * kLangevinChunk;
      const int64_t len = std::min(kLangevinChunk, P - j0);
      const int64_t i0 = b * P + j0;
      const int64_t nl = std::min<int64_t>(kLangevinLanes, next_pow2(len));
      std::fill(ls, ls + nl, 0.0);
      std::fill(lz, lz + nl, 0.0);
      const float* z = nullptr;
      if (mode == kGeneratedNoise)
        z = normal_range(seed_at(u, b), u.offset, static_cast<uint64_t>(u.seed_per_sample ? j0 : i0),
                         len, zbuf);
      chunk_fn(mode, x + i0, mo + i0, mode == kSuppliedNoise ? noise + i0 : nullptr, z, len,
               static_cast<acc_t>(langevin_coef(p, 0, b)), static_cast<acc_t>(langevin_coef(p, 1, b)),
               ls, lz);
      p.partial[2 * task] = pair_tree(ls, nl);
      p.partial[2 * task + 1] = pair_tree(lz, nl);
    }
  });
  finish(p);
  fused_update_cpu(u, dtype);
}

// ---- the CUDA kernels' work, serially (tests their indexing and order without a GPU) ----

template <typename T> struct C10Conv {
  using acc_t = typename Acc<T>::type;
  static acc_t load(T v) { return static_cast<acc_t>(v); }
  static T store(acc_t v) { return static_cast<T>(v); }
};

// A block's reduction of its 256 thread sums: warp trees (shuffle offsets 1..16), then the
// tree over the 8 warp sums: together the adjacent-pairs tree over the threads.
double block_tree(double* t) { return pair_tree(t, kLangevinThreads); }

template <typename T, int Mode>
void grouped_mode(const LangevinParams& p, Dtype dtype) {
  const FusedUpdateParams& u = p.update;
  const int64_t B = u.batch, nch = p.chunks;
  double ts[kLangevinThreads], tz[kLangevinThreads];
  for (int64_t task = 0; task < B * nch; ++task) {
    const int64_t b = task / nch, c = task - b * nch;
    for (int l = 0; l < kLangevinThreads; ++l) {
      double sums[2];
      langevin_thread_sums<T, typename Acc<T>::type, Mode, C10Conv<T>>(p, b, c, l, sums);
      ts[l] = sums[0];
      tz[l] = sums[1];
    }
    p.partial[2 * task] = block_tree(ts);
    p.partial[2 * task + 1] = block_tree(tz);
  }
  for (int64_t b = 0; b < B; ++b) {
    const double* part = p.partial + 2 * b * nch;
    for (int l = 0; l < kLangevinThreads; ++l) {
      ts[l] = lane_thread_sum(nch, l, [&](int64_t j) { return part[2 * j]; });
      tz[l] = lane_thread_sum(nch, l, [&](int64_t j) { return part[2 * j + 1]; });
    }
    p.norms[2 * b] = block_tree(ts);
    p.norms[2 * b + 1] = block_tree(tz);
  }
  double sum_s = 0.0, sum_z = 0.0;
  if (p.batch_mean) {
    for (int l = 0; l < kLangevinThreads; ++l) {
      ts[l] = lane_thread_sum(B, l, [&](int64_t j) { return sqrt_rn(p.norms[2 * j]); });
      tz[l] = lane_thread_sum(B, l, [&](int64_t j) { return sqrt_rn(p.norms[2 * j + 1]); });
    }
    sum_s = block_tree(ts);
    sum_z = block_tree(tz);
  }
  for (int64_t b = 0; b < B; ++b)
    langevin_finalize(p, b, p.norms[2 * b], p.norms[2 * b + 1], sum_s, sum_z);
  fused_update_cpu_grouped(u, dtype);
}

template <typename T>
void grouped(const LangevinParams& p, Dtype dtype) {
  if (p.update.noise_mode == kGeneratedNoise) return grouped_mode<T, kGeneratedNoise>(p, dtype);
  return grouped_mode<T, kSuppliedNoise>(p, dtype);
}

}  // namespace

void langevin_update_cpu(const LangevinParams& p, Dtype dtype) {
  if (p.update.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return run<float>(p, dtype);
    case Dtype::Float64: return run<double>(p, dtype);
    case Dtype::BFloat16: return run<c10::BFloat16>(p, dtype);
    case Dtype::Float16: return run<c10::Half>(p, dtype);
  }
}

void langevin_update_cpu_grouped(const LangevinParams& p, Dtype dtype) {
  if (p.update.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return grouped<float>(p, dtype);
    case Dtype::Float64: return grouped<double>(p, dtype);
    case Dtype::BFloat16: return grouped<c10::BFloat16>(p, dtype);
    case Dtype::Float16: return grouped<c10::Half>(p, dtype);
  }
}

}  // namespace genflow
