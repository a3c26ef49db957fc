// Pieces shared by the CPU kernels (csrc/cpu/*.cpp): the target_clones switch, the dtype traits
// (load to the accumulation type, store rounding to nearest even), and the Philox normals for a
// range of stream indices.
#pragma once

#include <cstdint>

#include "common/philox.h"

// GENFLOW_NO_TARGET_CLONES (for benchmarking): compile hot loops for the build's -march only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(GENFLOW_NO_TARGET_CLONES)
#define GF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GF_CLONES
#endif
#define GF_INLINE inline __attribute__((always_inline))

namespace genflow {

// ---- dtype traits: load to the accumulation type, store with round-to-nearest-even ----

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> GF_INLINE typename Acc<T>::type load(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <typename T> GF_INLINE T store(typename Acc<T>::type v) { return static_cast<T>(v); }

// Generated noise is the float32 stream rounded to the state dtype (so it equals the noise that
// philox_normal would supply), then widened to the accumulation type.
template <typename T> GF_INLINE typename Acc<T>::type noise_value(float z) {
  return load<T>(static_cast<T>(z));
}
template <> GF_INLINE float noise_value<float>(float z) { return z; }
template <> GF_INLINE double noise_value<double>(float z) { return static_cast<double>(z); }

// ---- noise: z[j] = N(seed, offset)[4 g0 + j], j < 4 ng (defined in fused_update.cpp) ----

void normal_groups(uint64_t seed, uint64_t offset, uint64_t g0, int64_t ng, float* z);

// Normals for stream indices [n0, n0 + len) into buf (at least len + 8 floats); returns
// buf + (n0 & 3), where element n0 of the range lies.
inline const float* normal_range(uint64_t seed, uint64_t offset, uint64_t n0, int64_t len,
                                 float* buf) {
  const uint64_t lead = n0 & 3u;
  const int64_t ng = static_cast<int64_t>((lead + static_cast<uint64_t>(len) + 3u) >> 2);
  normal_groups(seed, offset, n0 >> 2, ng, buf);
  return buf + lead;
}

}  // namespace genflow
