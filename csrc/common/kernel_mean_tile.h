// The streaming (online) log-sum-exp of the Gaussian-kernel weighted mean (csrc/common/kernel_mean.h),
// shared by the CUDA kernel (csrc/cuda/kernel_mean.cu) and its host test
// (tests/cpp/test_kernel_mean_tile.cpp). No torch includes.
//
// Scores are kept in base-2 units, s2_ij = log2(e) * s_ij = lw2_j - scale2 |q_i - k_j|^2 with
// scale2 = log2(e) scale and lw2 = log2(e) lw, so every exponential is one exp2 (on the GPU,
// exp2f is the MUFU.EX2 instruction: the float32 forward pass is bounded by its throughput).
// A row's state after keys j in J is
//   m = a running upper bound of max_{j in J} s2_j   (kLseInit before the first key)
//   l = sum_{j in J} 2^(s2_j - m)
//   acc[x] = sum_{j in J} 2^(s2_j - m) v_j[x]
// so that out = acc / l and lse = ln 2 * (m + log2 l) (seed 004: the kernel mean as a softmax
// over keys; the update is the online softmax of Milakov & Gimelshein, "Online normalizer
// calculation for softmax", 2018, as used by FlashAttention, Dao et al. 2022, Algorithm 1).
// States over disjoint key sets merge exactly (lse_merge), which is how several threads split
// one row's keys.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/philox.h"  // GF_HD

namespace genflow {

constexpr double kLog2e = 1.4426950408889634074;  // log2(e)
constexpr double kLn2 = 0.69314718055994530942;    // ln(2)

GF_HD float exp2_acc(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}
GF_HD double exp2_acc(double x) {
#if defined(__CUDA_ARCH__)
  return exp2(x);
#else
  return std::exp2(x);
#endif
}
GF_HD float log2_acc(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}
GF_HD double log2_acc(double x) {
#if defined(__CUDA_ARCH__)
  return log2(x);
#else
  return std::log2(x);
#endif
}

// The initial running max: the lowest finite value, so that a key with s2 = -inf (a zero
// weight) gives 2^(-inf - m) = 0 instead of the NaN of -inf - (-inf).
template <typename A> GF_HD A lse_init();
template <> GF_HD float lse_init<float>() { return -FLT_MAX; }
template <> GF_HD double lse_init<double>() { return -DBL_MAX; }

// Adds one key with base-2 score s2 and value v[x * v_stride], x < DV, to the state (m, l, acc).
// The max is raised only when a score exceeds it (rare after the first keys: about log M times
// per row for keys in random order), so a key costs one exp2.
template <int DV, typename A>
GF_HD void lse_accumulate(A s2, const A* v, int v_stride, A& m, A& l, A (&acc)[DV]) {
  if (s2 > m) {
    const A alpha = exp2_acc(m - s2);
    l *= alpha;
    for (int x = 0; x < DV; ++x) acc[x] *= alpha;
    m = s2;
  }
  const A p = exp2_acc(s2 - m);
  l += p;
  for (int x = 0; x < DV; ++x) acc[x] += p * v[x * v_stride];
}

// Raises the running max m to cover a tile whose largest score is tile_max and returns the
// factor alpha = 2^(m_old - m_new) by which the caller rescales l and acc before adding the
// tile's terms 2^(s2_j - m_new).
template <typename A> GF_HD A lse_rescale(A& m, A tile_max) {
  const A m_new = m > tile_max ? m : tile_max;
  const A alpha = exp2_acc(m - m_new);
  m = m_new;
  return alpha;
}

// Merges the state (m2, l2, acc2) of a disjoint key set into (m, l, acc).
template <int DV, typename A>
GF_HD void lse_merge(A& m, A& l, A (&acc)[DV], A m2, A l2, const A (&acc2)[DV]) {
  const A m_new = m > m2 ? m : m2;
  const A a = exp2_acc(m - m_new), b = exp2_acc(m2 - m_new);
  l = l * a + l2 * b;
  for (int x = 0; x < DV; ++x) acc[x] = acc[x] * a + acc2[x] * b;
  m = m_new;
}

// lse = ln(sum_j exp(s_ij)) in natural units from the base-2 state.
template <typename A> GF_HD A lse_finish(A m, A l) {
  return static_cast<A>(kLn2) * (m + log2_acc(l));
}

}  // namespace genflow
