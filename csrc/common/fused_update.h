// The fused update, shared by the C++ kernel (csrc/cpu/fused_update.cpp) and the CUDA kernel
// (csrc/cuda/fused_update.cu); no torch includes.
//
//   out[i] = c0 x[i] + sum_{k=1..K} c_k terms[k-1][i] + s z[i],     i < numel,  K in 0..4
//
// x, terms, noise and out are contiguous [B, *D] arrays of one dtype (numel = B * per_sample);
// each coefficient is one value or one per sample b = i / per_sample; z is the supplied noise or
// the Philox normal stream (csrc/common/philox.h) rounded to the state dtype. The element's
// stream index is i (one seed) or i - b * per_sample (per-sample seeds, so that sample b of a
// batch equals the same seed drawn alone). Accumulation is in float32 for float32, bfloat16
// and float16 state and float64 for float64 state, with explicit fmas (fused_combine), so the
// CPU clones, the CUDA kernel and the reference (for float32 accumulation) agree bitwise.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/philox.h"

#if defined(__CUDACC__) || defined(GENFLOW_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace genflow {

constexpr int kMaxTerms = 4;

enum class Dtype : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

enum NoiseMode : int32_t {
  kNoNoise = 0,         // the noise term is dropped (s is ignored)
  kSuppliedNoise = 1,   // z = noise[i]
  kGeneratedNoise = 2,  // z = N(seed_b, offset)[stream index of i], rounded to the state dtype
};

struct FusedUpdateParams {
  const void* x;                  // [B, *D]; nullptr: no x term (used by philox_normal)
  const void* terms[kMaxTerms];   // K arrays [B, *D]
  const void* noise;              // [B, *D] when noise_mode == kSuppliedNoise
  void* out;                      // [B, *D]; may equal x or a term (elementwise update)
  int32_t num_terms;              // K
  int32_t noise_mode;             // NoiseMode
  int64_t numel;                  // B * per_sample
  int64_t batch;                  // B
  int64_t per_sample;             // elements per sample (>= 1 when numel > 0)
  // Coefficients (c0, c1..cK, s): coef[k] or, when coef_per_sample, coef[k * batch + b]
  // (a [K+2, B] row-major array on the kernel's device). coef == nullptr: coef_value[k].
  const double* coef;
  bool coef_per_sample;
  double coef_value[kMaxTerms + 2];
  // Seeds: seeds[b] when seed_per_sample, else seeds[0]; seeds == nullptr: seed_value.
  const int64_t* seeds;
  bool seed_per_sample;
  uint64_t seed_value;
  uint64_t offset;
  // Divergence check (gf.sample's check_finite): when non-null, *nonfinite <- min(*nonfinite,
  // step) if some written output element is NaN or Inf (the outputs themselves are unchanged).
  int32_t* nonfinite = nullptr;
  int32_t step = 0;
};

// Coefficient k (0 = c0, K + 1 = s) for sample b.
GF_HD double coef_at(const FusedUpdateParams& p, int k, int64_t b) {
  if (p.coef == nullptr) return p.coef_value[k];
  return p.coef_per_sample ? p.coef[k * p.batch + b] : p.coef[k];
}

// Philox key for sample b.
GF_HD uint64_t seed_at(const FusedUpdateParams& p, int64_t b) {
  if (p.seeds == nullptr) return p.seed_value;
  return static_cast<uint64_t>(p.seed_per_sample ? p.seeds[b] : p.seeds[0]);
}

// Does the element-to-sample map matter (per-sample coefficients or seeds)?
GF_HD bool per_sample_params(const FusedUpdateParams& p) {
  return (p.coef != nullptr && p.coef_per_sample) || p.seed_per_sample;
}

// Accumulation primitives: an explicit fma (never left to the compiler's contraction, which
// differs between code paths, clones and devices), so every path rounds identically.
GF_HD float mul_acc(float a, float b) { return philox::mul_rn(a, b); }
GF_HD float fma_acc(float a, float b, float c) { return philox::fma_rn(a, b, c); }
GF_HD double mul_acc(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GF_HD double fma_acc(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// Is v NaN or +-Inf? An exponent test on the bits (exact under fast-math flags, vectorisable).
GF_HD bool not_finite(float v) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x7f800000u) == 0x7f800000u;
}
GF_HD bool not_finite(double v) {
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// The per-element math, in this order and rounding:
//   acc = c[0] * x;  acc = fma(c[k+1], t[k], acc) for k < K;  acc = fma(c[K+1], z, acc).
template <typename acc_t, int K, bool kNoise>
GF_HD acc_t fused_combine(const acc_t* c, acc_t x, const acc_t* t, acc_t z) {
  acc_t acc = mul_acc(c[0], x);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < K; ++k) acc = fma_acc(c[k + 1], t[k], acc);
  if (kNoise) acc = fma_acc(c[K + 1], z, acc);
  return acc;
}

// ---- the GPU kernel's unit of work (also run on the host by genflow::_fused_update_grouped,
// so the CUDA indexing is tested on machines without a GPU) ----
//
// Groups of four consecutive elements of one Philox stream: one Philox call gives the group's
// four normals. With one seed the groups tile the flat index; with per-sample seeds they tile
// each sample (the last group of a sample may be partial).
GF_HD int64_t group_count(const FusedUpdateParams& p) {
  return p.seed_per_sample ? p.batch * ((p.per_sample + 3) / 4) : (p.numel + 3) / 4;
}

// Group g. Conv: static acc_t load(T) and static T store(acc_t) (round to nearest even).
// Returns whether some element written is NaN/Inf (for p.nonfinite; the caller records it).
template <typename T, typename acc_t, int K, int Mode, typename Conv>
GF_HD bool fused_update_group(const FusedUpdateParams& p, int64_t g) {
  const T* x = static_cast<const T*>(p.x);  // out may equal x: no __restrict__
  const T* noise = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.out);
  const int64_t P = p.per_sample;
  const bool segmented = per_sample_params(p);
  int64_t first, count, stream_group, b;
  if (p.seed_per_sample) {
    const int64_t groups_per_sample = (P + 3) / 4;
    b = g / groups_per_sample;
    stream_group = g - b * groups_per_sample;
    first = b * P + 4 * stream_group;
    count = P - 4 * stream_group;
  } else {
    stream_group = g;
    first = 4 * g;
    count = p.numel - first;
    b = segmented ? first / P : 0;
  }
  if (count > 4) count = 4;
  bool bad = false;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (Mode == kGeneratedNoise)
    philox::normal4(seed_at(p, b), p.offset, static_cast<uint64_t>(stream_group), z);
  int64_t sample_end = segmented ? (b + 1) * P : p.numel;
  acc_t c[kMaxTerms + 2];
  for (int k = 0; k < K + 2; ++k) c[k] = static_cast<acc_t>(coef_at(p, k, b));
  for (int l = 0; l < 4; ++l) {
    if (l >= count) break;
    const int64_t i = first + l;
    if (i >= sample_end) {  // one stream crossing into the next sample (per-sample coefs)
      while (i >= sample_end) {
        ++b;
        sample_end += P;
      }
      for (int k = 0; k < K + 2; ++k) c[k] = static_cast<acc_t>(coef_at(p, k, b));
    }
    acc_t zi = acc_t(0);
    if (Mode == kSuppliedNoise) zi = Conv::load(noise[i]);
    // generated: the float32 stream rounded to the state dtype (as philox_normal makes it)
    if (Mode == kGeneratedNoise) zi = Conv::load(Conv::store(static_cast<acc_t>(z[l])));
    if (x == nullptr) {  // philox_normal: the stream value itself (keeps the sign of zero)
      out[i] = Conv::store(zi);
      continue;
    }
    acc_t t[kMaxTerms > 0 ? kMaxTerms : 1];
    for (int k = 0; k < K; ++k) t[k] = Conv::load(static_cast<const T*>(p.terms[k])[i]);
    const T v = Conv::store(fused_combine<acc_t, K, Mode != kNoNoise>(c, Conv::load(x[i]), t, zi));
    out[i] = v;
    bad |= not_finite(Conv::load(v));
  }
  return bad;
}

// ---- the vectorised variant: a full, aligned group moved as one load/store per array ----
//
// Four consecutive elements as one aligned access: 16 bytes for float32, two 16-byte accesses
// for float64, 8 bytes for bfloat16 / float16.
template <typename T>
struct alignas(sizeof(T) * 4 > 16 ? 16 : sizeof(T) * 4) Pack4 {
  T v[4];
};

GF_HD bool aligned_to(const void* ptr, uintptr_t alignment) {
  return reinterpret_cast<uintptr_t>(ptr) % alignment == 0;
}

// May every full group use fused_update_group_vec? All arrays aligned to Pack4<T>, and no group
// straddles two samples (groups tile the flat index from 0 and, where the element-to-sample map
// matters, per_sample is a multiple of 4, so group g is elements 4g..4g+3 of one sample).
template <typename T>
GF_HD bool vector_groups_ok(const FusedUpdateParams& p) {
  const uintptr_t a = alignof(Pack4<T>);
  if (p.x == nullptr || !aligned_to(p.x, a) || !aligned_to(p.out, a)) return false;
  for (int k = 0; k < p.num_terms; ++k)
    if (!aligned_to(p.terms[k], a)) return false;
  if (p.noise_mode == kSuppliedNoise && !aligned_to(p.noise, a)) return false;
  return !per_sample_params(p) || p.per_sample % 4 == 0;
}

// Group g when vector_groups_ok(p) and 4 g + 4 <= numel: the same elements, stream values,
// coefficients and rounding as fused_update_group (so the results are bitwise equal); returns
// whether some element written is NaN/Inf.
template <typename T, typename acc_t, int K, int Mode, typename Conv>
GF_HD bool fused_update_group_vec(const FusedUpdateParams& p, int64_t g) {
  const int64_t first = 4 * g;
  const int64_t b = per_sample_params(p) ? first / p.per_sample : 0;
  const int64_t stream_group = p.seed_per_sample ? g - b * (p.per_sample / 4) : g;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (Mode == kGeneratedNoise)
    philox::normal4(seed_at(p, b), p.offset, static_cast<uint64_t>(stream_group), z);
  acc_t c[kMaxTerms + 2];
  for (int k = 0; k < K + 2; ++k) c[k] = static_cast<acc_t>(coef_at(p, k, b));
  const Pack4<T> xv = *reinterpret_cast<const Pack4<T>*>(static_cast<const T*>(p.x) + first);
  Pack4<T> tv[kMaxTerms > 0 ? kMaxTerms : 1];
  for (int k = 0; k < K; ++k)
    tv[k] = *reinterpret_cast<const Pack4<T>*>(static_cast<const T*>(p.terms[k]) + first);
  Pack4<T> nv{};
  if (Mode == kSuppliedNoise)
    nv = *reinterpret_cast<const Pack4<T>*>(static_cast<const T*>(p.noise) + first);
  Pack4<T> ov;
  bool bad = false;
  for (int l = 0; l < 4; ++l) {
    acc_t zi = acc_t(0);
    if (Mode == kSuppliedNoise) zi = Conv::load(nv.v[l]);
    if (Mode == kGeneratedNoise) zi = Conv::load(Conv::store(static_cast<acc_t>(z[l])));
    acc_t t[kMaxTerms > 0 ? kMaxTerms : 1];
    for (int k = 0; k < K; ++k) t[k] = Conv::load(tv[k].v[l]);
    ov.v[l] = Conv::store(fused_combine<acc_t, K, Mode != kNoNoise>(c, Conv::load(xv.v[l]), t, zi));
    bad |= not_finite(Conv::load(ov.v[l]));
  }
  *reinterpret_cast<Pack4<T>*>(static_cast<T*>(p.out) + first) = ov;
  return bad;
}

// Entry points. CPU: csrc/cpu/fused_update.cpp (parallel over at::parallel_for chunks).
void fused_update_cpu(const FusedUpdateParams& p, Dtype dtype);
// The CUDA kernel's group loop (vectorised groups included) run serially on the host (a test of
// its indexing).
void fused_update_cpu_grouped(const FusedUpdateParams& p, Dtype dtype);
// CUDA: csrc/cuda/fused_update.cu; all pointers on the current device, asynchronous on stream.
#if defined(__CUDACC__) || defined(GENFLOW_WITH_CUDA)
cudaError_t launch_fused_update(const FusedUpdateParams& p, Dtype dtype, cudaStream_t stream);
#endif

}  // namespace genflow
