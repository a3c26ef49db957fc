// C++ kernel of the fused update (math in csrc/common/fused_update.h, noise in philox.h).
//
// Work is split over threads with at::parallel_for (so torch.set_num_threads applies); the
// result never depends on the split: every element's value is a pure function of its index
// (its noise of (seed, offset, stream index)). Inside a chunk, elements go per sample (when
// coefficients or seeds are per sample) and in blocks of kBlock: the block's normals are made
// into a small stack buffer by a vectorised Philox/Box-Muller loop, then one vectorised pass
// reads x and the terms, and writes out. Hot loops are compiled for AVX-512, AVX2+FMA and
// baseline x86-64 (target_clones, picked at load time); all three give the same bits, since
// the arithmetic is explicit fmas (csrc/common/fused_update.h). On this 2-core AVX-512 machine
// the clones make the in-kernel noise ~10x faster than a baseline x86-64 build.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/fused_update.h"
#include "cpu/kernel.h"

namespace genflow {

// The noise loop declared in cpu/kernel.h, shared with the Langevin kernel.
GF_CLONES void normal_groups(uint64_t seed, uint64_t offset, uint64_t g0, int64_t ng, float* z) {
  for (int64_t j = 0; j < ng; ++j) {
    float v[4];
    philox::normal4(seed, offset, g0 + static_cast<uint64_t>(j), v);
    z[4 * j + 0] = v[0];
    z[4 * j + 1] = v[1];
    z[4 * j + 2] = v[2];
    z[4 * j + 3] = v[3];
  }
}

namespace {

constexpr int64_t kBlock = 2048;    // elements per inner block (a multiple of 4)
constexpr int64_t kGrain = 32768;   // elements per parallel_for chunk at least

// ---- one block: out[i] = combine(c, x[i], terms[.][i], z[i]), i < n ----

template <typename T, int K, int Mode, bool Inplace>
GF_INLINE void block_impl(const T* x, const T* const* terms, const T* noise, const float* z, T* out,
                          int64_t n, const typename Acc<T>::type* c) {
  using acc_t = typename Acc<T>::type;
  // In place, read x through out itself so the vectoriser sees dependence distance 0.
  const T* xs = Inplace ? out : x;
  const T* t0 = K > 0 ? terms[0] : nullptr;
  const T* t1 = K > 1 ? terms[1] : nullptr;
  const T* t2 = K > 2 ? terms[2] : nullptr;
  const T* t3 = K > 3 ? terms[3] : nullptr;
  acc_t cc[kMaxTerms + 2];
  for (int k = 0; k < K + 2; ++k) cc[k] = c[k];
  for (int64_t i = 0; i < n; ++i) {
    acc_t t[kMaxTerms > 0 ? kMaxTerms : 1];
    if (K > 0) t[0] = load(t0[i]);
    if (K > 1) t[1] = load(t1[i]);
    if (K > 2) t[2] = load(t2[i]);
    if (K > 3) t[3] = load(t3[i]);
    acc_t zi = acc_t(0);
    if (Mode == kSuppliedNoise) zi = load(noise[i]);
    if (Mode == kGeneratedNoise) zi = noise_value<T>(z[i]);
    out[i] = store<T>(fused_combine<acc_t, K, Mode != kNoNoise>(cc, load(xs[i]), t, zi));
  }
}

template <typename T, int Mode, bool Inplace>
GF_INLINE void block_k(int K, const T* x, const T* const* terms, const T* noise, const float* z,
                       T* out, int64_t n, const typename Acc<T>::type* c) {
  switch (K) {
    case 0: return block_impl<T, 0, Mode, Inplace>(x, terms, noise, z, out, n, c);
    case 1: return block_impl<T, 1, Mode, Inplace>(x, terms, noise, z, out, n, c);
    case 2: return block_impl<T, 2, Mode, Inplace>(x, terms, noise, z, out, n, c);
    case 3: return block_impl<T, 3, Mode, Inplace>(x, terms, noise, z, out, n, c);
    default: return block_impl<T, 4, Mode, Inplace>(x, terms, noise, z, out, n, c);
  }
}

template <typename T>
GF_INLINE void block_dispatch(int K, int mode, const T* x, const T* const* terms, const T* noise,
                              const float* z, T* out, int64_t n, const typename Acc<T>::type* c) {
  const bool inplace = static_cast<const void*>(x) == static_cast<const void*>(out);
  if (inplace) {
    if (mode == kGeneratedNoise) return block_k<T, kGeneratedNoise, true>(K, x, terms, noise, z, out, n, c);
    if (mode == kSuppliedNoise) return block_k<T, kSuppliedNoise, true>(K, x, terms, noise, z, out, n, c);
    return block_k<T, kNoNoise, true>(K, x, terms, noise, z, out, n, c);
  }
  if (mode == kGeneratedNoise) return block_k<T, kGeneratedNoise, false>(K, x, terms, noise, z, out, n, c);
  if (mode == kSuppliedNoise) return block_k<T, kSuppliedNoise, false>(K, x, terms, noise, z, out, n, c);
  return block_k<T, kNoNoise, false>(K, x, terms, noise, z, out, n, c);
}

// One compiled (and cloned) block function per dtype.
#define GF_BLOCK_FN(NAME, T)                                                                 \
  GF_CLONES void NAME(int K, int mode, const T* x, const T* const* terms, const T* noise,    \
                      const float* z, T* out, int64_t n, const Acc<T>::type* c) {            \
    block_dispatch<T>(K, mode, x, terms, noise, z, out, n, c);                               \
  }
GF_BLOCK_FN(block_f32, float)
GF_BLOCK_FN(block_f64, double)
GF_BLOCK_FN(block_bf16, c10::BFloat16)
GF_BLOCK_FN(block_f16, c10::Half)
#undef GF_BLOCK_FN

// ---- many small samples (per-sample coefficients, no in-kernel noise): one call per chunk ----
//
// Calling the block function once per sample costs more than the work when samples are a few
// elements (e.g. 2-D points with per-sample step sizes); here the loop over samples is inside
// one cloned function. Same fused_combine, so the same bits as the block path.

template <typename T, int K, int Mode>
GF_INLINE void small_impl(const FusedUpdateParams& p, int64_t begin, int64_t end) {
  using acc_t = typename Acc<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* noise = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  const T* tk[kMaxTerms > 0 ? kMaxTerms : 1];
  for (int k = 0; k < K; ++k) tk[k] = static_cast<const T*>(p.terms[k]);
  const int64_t P = p.per_sample;
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / P;
    const int64_t seg_end = std::min(end, (b + 1) * P);
    acc_t c[kMaxTerms + 2];
    for (int k = 0; k < K + 2; ++k) c[k] = static_cast<acc_t>(coef_at(p, k, b));
    for (; i < seg_end; ++i) {
      acc_t t[kMaxTerms > 0 ? kMaxTerms : 1];
      for (int k = 0; k < K; ++k) t[k] = load(tk[k][i]);
      const acc_t zi = Mode == kSuppliedNoise ? load(noise[i]) : acc_t(0);
      out[i] = store<T>(fused_combine<acc_t, K, Mode != kNoNoise>(c, load(x[i]), t, zi));
    }
  }
}

template <typename T, int Mode>
GF_INLINE void small_k(const FusedUpdateParams& p, int64_t begin, int64_t end) {
  switch (p.num_terms) {
    case 0: return small_impl<T, 0, Mode>(p, begin, end);
    case 1: return small_impl<T, 1, Mode>(p, begin, end);
    case 2: return small_impl<T, 2, Mode>(p, begin, end);
    case 3: return small_impl<T, 3, Mode>(p, begin, end);
    default: return small_impl<T, 4, Mode>(p, begin, end);
  }
}

#define GF_SMALL_FN(NAME, T)                                                               \
  GF_CLONES void NAME(const FusedUpdateParams& p, int64_t begin, int64_t end) {            \
    if (p.noise_mode == kSuppliedNoise) return small_k<T, kSuppliedNoise>(p, begin, end);  \
    return small_k<T, kNoNoise>(p, begin, end);                                            \
  }
GF_SMALL_FN(small_f32, float)
GF_SMALL_FN(small_f64, double)
GF_SMALL_FN(small_bf16, c10::BFloat16)
GF_SMALL_FN(small_f16, c10::Half)
#undef GF_SMALL_FN

GF_INLINE void small_fn(const FusedUpdateParams& p, int64_t b, int64_t e, const float*) { small_f32(p, b, e); }
GF_INLINE void small_fn(const FusedUpdateParams& p, int64_t b, int64_t e, const double*) { small_f64(p, b, e); }
GF_INLINE void small_fn(const FusedUpdateParams& p, int64_t b, int64_t e, const c10::BFloat16*) {
  small_bf16(p, b, e);
}
GF_INLINE void small_fn(const FusedUpdateParams& p, int64_t b, int64_t e, const c10::Half*) {
  small_f16(p, b, e);
}

constexpr int64_t kSmallSample = 64;  // per-sample sizes up to this take the small-sample path

GF_INLINE void block_fn(int K, int mode, const float* x, const float* const* t, const float* nz,
                        const float* z, float* out, int64_t n, const float* c) {
  block_f32(K, mode, x, t, nz, z, out, n, c);
}
GF_INLINE void block_fn(int K, int mode, const double* x, const double* const* t, const double* nz,
                        const float* z, double* out, int64_t n, const double* c) {
  block_f64(K, mode, x, t, nz, z, out, n, c);
}
GF_INLINE void block_fn(int K, int mode, const c10::BFloat16* x, const c10::BFloat16* const* t,
                        const c10::BFloat16* nz, const float* z, c10::BFloat16* out, int64_t n,
                        const float* c) {
  block_bf16(K, mode, x, t, nz, z, out, n, c);
}
GF_INLINE void block_fn(int K, int mode, const c10::Half* x, const c10::Half* const* t,
                        const c10::Half* nz, const float* z, c10::Half* out, int64_t n,
                        const float* c) {
  block_f16(K, mode, x, t, nz, z, out, n, c);
}

// philox_normal (x == nullptr, K == 0, s == 1): out[i] = z rounded to T.
GF_CLONES void normal_store_f32(const float* z, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = z[i];
}
GF_CLONES void normal_store_f64(const float* z, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(z[i]);
}
GF_CLONES void normal_store_bf16(const float* z, c10::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::BFloat16>(z[i]);
}
GF_CLONES void normal_store_f16(const float* z, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::Half>(z[i]);
}
GF_INLINE void normal_store(const float* z, float* out, int64_t n) { normal_store_f32(z, out, n); }
GF_INLINE void normal_store(const float* z, double* out, int64_t n) { normal_store_f64(z, out, n); }
GF_INLINE void normal_store(const float* z, c10::BFloat16* out, int64_t n) { normal_store_bf16(z, out, n); }
GF_INLINE void normal_store(const float* z, c10::Half* out, int64_t n) { normal_store_f16(z, out, n); }

// ---- divergence check: does out[0, n) hold a NaN/Inf? (exponent bits all ones) ----
//
// Run on a block just written (still in L1) only when p.nonfinite is set; the update's own
// loops are untouched. A branch-free OR over the block so that it vectorises.

template <typename U, U kMask, typename T>
GF_INLINE bool any_exponent_max(const T* v, int64_t n) {
  static_assert(sizeof(U) == sizeof(T), "bit width");
  U acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, v + i, sizeof(U));
    acc |= static_cast<U>((u & kMask) == kMask);
  }
  return acc != 0;
}
GF_CLONES bool any_nonfinite(const float* v, int64_t n) {
  return any_exponent_max<uint32_t, 0x7f800000u>(v, n);
}
GF_CLONES bool any_nonfinite(const double* v, int64_t n) {
  return any_exponent_max<uint64_t, 0x7ff0000000000000ull>(v, n);
}
GF_CLONES bool any_nonfinite(const c10::BFloat16* v, int64_t n) {
  return any_exponent_max<uint16_t, uint16_t(0x7f80)>(v, n);
}
GF_CLONES bool any_nonfinite(const c10::Half* v, int64_t n) {
  return any_exponent_max<uint16_t, uint16_t(0x7c00)>(v, n);
}

// *flag <- min(*flag, step) (threads of one call may race).
void record_nonfinite(int32_t* flag, int32_t step) {
  int32_t seen = __atomic_load_n(flag, __ATOMIC_RELAXED);
  while (step < seen &&
         !__atomic_compare_exchange_n(flag, &seen, step, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// ---- driver: chunks -> per-sample segments -> blocks ----

template <typename T>
void run(const FusedUpdateParams& p) {
  using acc_t = typename Acc<T>::type;
  const int K = p.num_terms;
  const int mode = p.noise_mode;
  const bool segmented = per_sample_params(p);
  const int64_t P = p.per_sample;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  if (segmented && mode != kGeneratedNoise && x != nullptr && P <= kSmallSample) {
    at::parallel_for(0, p.numel, kGrain, [&](int64_t begin, int64_t end) {
      small_fn(p, begin, end, x);
      if (p.nonfinite != nullptr && any_nonfinite(out + begin, end - begin))
        record_nonfinite(p.nonfinite, p.step);
    });
    return;
  }
  at::parallel_for(0, p.numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kBlock + 8];
    bool bad = false;
    int64_t i = begin;
    while (i < end) {
      // Segment [i, seg_end): one sample (or everything when nothing is per-sample).
      const int64_t b = segmented ? i / P : 0;
      const int64_t seg_end = segmented ? std::min(end, (b + 1) * P) : end;
      acc_t c[kMaxTerms + 2];
      for (int k = 0; k < K + 2; ++k) c[k] = static_cast<acc_t>(coef_at(p, k, b));
      const uint64_t seed = seed_at(p, b);
      const int64_t stream_base = p.seed_per_sample ? b * P : 0;
      for (int64_t j = i; j < seg_end; j += kBlock) {
        const int64_t n = std::min(kBlock, seg_end - j);
        const float* z = nullptr;
        if (mode == kGeneratedNoise)
          z = normal_range(seed, p.offset, static_cast<uint64_t>(j - stream_base), n, zbuf);
        if (x == nullptr) {  // philox_normal
          normal_store(z, out + j, n);
          continue;
        }
        const T* terms[kMaxTerms];
        for (int k = 0; k < K; ++k) terms[k] = static_cast<const T*>(p.terms[k]) + j;
        const T* noise = mode == kSuppliedNoise ? static_cast<const T*>(p.noise) + j : nullptr;
        block_fn(K, mode, x + j, terms, noise, z, out + j, n, c);
        if (p.nonfinite != nullptr && !bad) bad = any_nonfinite(out + j, n);
      }
      i = seg_end;
    }
    if (bad) record_nonfinite(p.nonfinite, p.step);
  });
}

// ---- the CUDA kernel's group loop, serially (tests its indexing on machines without a GPU) ----

template <typename T> struct C10Conv {
  using acc_t = typename Acc<T>::type;
  static acc_t load(T v) { return static_cast<acc_t>(v); }
  static T store(acc_t v) { return static_cast<T>(v); }
};

template <typename T, int K, int Mode>
void grouped_typed(const FusedUpdateParams& p) {
  const int64_t groups = group_count(p);
  const bool vec = vector_groups_ok<T>(p);
  bool bad = false;
  for (int64_t g = 0; g < groups; ++g) {
    if (vec && 4 * g + 4 <= p.numel)
      bad |= fused_update_group_vec<T, typename Acc<T>::type, K, Mode, C10Conv<T>>(p, g);
    else
      bad |= fused_update_group<T, typename Acc<T>::type, K, Mode, C10Conv<T>>(p, g);
  }
  if (bad && p.nonfinite != nullptr) record_nonfinite(p.nonfinite, p.step);
}

template <typename T, int Mode>
void grouped_k(const FusedUpdateParams& p) {
  switch (p.num_terms) {
    case 0: return grouped_typed<T, 0, Mode>(p);
    case 1: return grouped_typed<T, 1, Mode>(p);
    case 2: return grouped_typed<T, 2, Mode>(p);
    case 3: return grouped_typed<T, 3, Mode>(p);
    default: return grouped_typed<T, 4, Mode>(p);
  }
}

template <typename T>
void grouped(const FusedUpdateParams& p) {
  if (p.noise_mode == kGeneratedNoise) return grouped_k<T, kGeneratedNoise>(p);
  if (p.noise_mode == kSuppliedNoise) return grouped_k<T, kSuppliedNoise>(p);
  return grouped_k<T, kNoNoise>(p);
}

}  // namespace

void fused_update_cpu_grouped(const FusedUpdateParams& p, Dtype dtype) {
  if (p.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return grouped<float>(p);
    case Dtype::Float64: return grouped<double>(p);
    case Dtype::BFloat16: return grouped<c10::BFloat16>(p);
    case Dtype::Float16: return grouped<c10::Half>(p);
  }
}

void fused_update_cpu(const FusedUpdateParams& p, Dtype dtype) {
  if (p.numel <= 0) return;
  switch (dtype) {
    case Dtype::Float32: return run<float>(p);
    case Dtype::Float64: return run<double>(p);
    case Dtype::BFloat16: return run<c10::BFloat16>(p);
    case Dtype::Float16: return run<c10::Half>(p);
  }
}

}  // namespace genflow
