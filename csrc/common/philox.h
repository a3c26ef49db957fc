// Counter-based Philox4x32-10 and its standard-normal stream, shared by the C++ and CUDA
// kernels (and mirrored bit for bit by genflow/ops/_reference.py). No torch includes.
//
// Philox4x32-10: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3"
// (SC 2011), the Random123 parameters: multipliers 0xD2511F53 / 0xCD9E8D57, Weyl key
// increments 0x9E3779B9 / 0xBB67AE85, ten rounds.
//
// The genflow normal stream N(seed, offset)[n], n = 0, 1, 2, ... (uint64):
//   key     = (lo32(seed), hi32(seed))                        (seed as a 64-bit two's complement)
//   counter = (lo32(n >> 2), hi32(n >> 2), lo32(offset), hi32(offset))
//   (w0, w1, w2, w3) = Philox4x32-10(counter, key)
//   lane n & 3 = 0, 1 come from Box-Muller on (w0, w1); lanes 2, 3 from (w2, w3):
//     u     = float(w_a) * 2^-32 + 2^-33            (float32, u in (0, 1])
//     r     = sqrt(-2 log u)
//     theta = 2 pi float(w_b) 2^-32
//     lane even = r cos theta, lane odd = r sin theta.
// Everything after Philox is float32 arithmetic with our own log, sin/cos of 2 pi t and square
// root (errors, checked exhaustively over their inputs here: log 0.87 ulp, sin/cos 1.7 ulp,
// sqrt 0.5 ulp), written with explicit fmaf and no library calls, so that every compiler, ISA
// (target clone) and device rounds identically and GCC vectorises it: the stream is the same
// bits on CPU and GPU. Callers convert the float32 value to the state dtype (float64 state gets
// the float32 value exactly).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace genflow {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

// ---- exact float32 building blocks (identical on host and device, whatever the flags) ----

GF_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

GF_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

// a * b + c with one rounding (nvcc's --use_fast_math keeps fmaf exact).
GF_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

GF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);  // never contracted into an fma
#else
  return a * b;
#endif
}

// ---- Philox4x32-10 ----

GF_HD void philox4x32_10(const uint32_t ctr[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// ---- float32 approximations (coefficients fitted for genflow, minimax in relative error) ----

// Natural log of a positive normal float. u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(1 + f) = f + f^2 P(f), f = m - 1 (exact), P of degree 8; log u = e ln2 + log(1 + f).
// Max error under 1 ulp on (0, 1] (tests/ops/test_philox.py checks it).
GF_HD float log_approx(float u) {
  const uint32_t ix = float_bits(u);
  const int32_t e = static_cast<int32_t>(ix - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = sqrt(1/2)
  const float m = bits_float(ix - (static_cast<uint32_t>(e) << 23));
  const float f = m - 1.0f;
  float p = -0.07621793448925018f;
  p = fma_rn(p, f, 0.12904445827007294f);
  p = fma_rn(p, f, -0.13242986798286438f);
  p = fma_rn(p, f, 0.14181822538375854f);
  p = fma_rn(p, f, -0.16609081625938416f);
  p = fma_rn(p, f, 0.2000197470188141f);
  p = fma_rn(p, f, -0.25001582503318787f);
  p = fma_rn(p, f, 0.33333325386047363f);
  p = fma_rn(p, f, -0.49999988079071045f);
  const float y = fma_rn(mul_rn(f, f), p, f);
  const float ef = static_cast<float>(e);
  // ln 2 = 0.693145751953125 (exact in 16 bits) + 1.428606765330187e-06
  return fma_rn(ef, 0.693145751953125f, fma_rn(ef, 1.428606765330187e-06f, y));
}

// (cos, sin) of 2 pi t for t in [0, 1]. q = nearest integer to 4 t (ties to even), r = t - q/4
// (exact, |r| <= 1/8); sin(2 pi r) = r S(r^2), cos(2 pi r) = 1 + r^2 C(r^2); the quadrant q
// swaps and negates. Max error under 2 ulp (absolute 1.5 * 2^-24 near the zeros).
GF_HD void sincos_2pi_approx(float t, float* cos_out, float* sin_out) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds 4t to an integer
  const float qm = fma_rn(t, 4.0f, magic);
  const uint32_t quadrant = float_bits(qm) & 3u;
  const float q = qm - magic;
  const float r = fma_rn(q, -0.25f, t);
  const float v = mul_rn(r, r);
  float s = -75.39356231689453f;
  s = fma_rn(s, v, 81.59235382080078f);
  s = fma_rn(s, v, -41.3416633605957f);
  s = fma_rn(s, v, 6.2831854820251465f);
  s = mul_rn(r, s);
  float c = 59.229244232177734f;
  c = fma_rn(c, v, -85.4432373046875f);
  c = fma_rn(c, v, 64.93932342529297f);
  c = fma_rn(c, v, -19.739208221435547f);
  c = fma_rn(c, v, 1.0f);
  const bool swap = (quadrant & 1u) != 0u;
  const uint32_t cos_sign = ((quadrant + 1u) & 2u) << 30;  // quadrants 1, 2
  const uint32_t sin_sign = (quadrant & 2u) << 30;         // quadrants 2, 3
  *cos_out = bits_float(float_bits(swap ? s : c) ^ cos_sign);
  *sin_out = bits_float(float_bits(swap ? c : s) ^ sin_sign);
}

// Square root of a float in [0, 2^64]: bit-trick reciprocal square root of max(|v|, 1e-30)
// (which keeps the Newton steps finite at v = 0), two Newton steps and one residual correction,
// all explicit fmaf. Within 1 ulp, and sqrt(+-0) = +-0. (A library sqrtf would be correctly
// rounded, but GCC will not vectorise it without -fno-math-errno, and this is the same bits
// everywhere.)
GF_HD float sqrt_approx(float v) {
  uint32_t b = float_bits(v) & 0x7fffffffu;
  b = b > 0x0DA24260u ? b : 0x0DA24260u;  // 0x0DA24260 = 1e-30f; integer max keeps it vectorised
  const float vc = bits_float(b);
  float y = bits_float(0x5f375a86u - (b >> 1));  // ~ 1/sqrt(vc), 0.2% error
  const float h = mul_rn(0.5f, vc);
  y = mul_rn(y, fma_rn(-h, mul_rn(y, y), 1.5f));
  y = mul_rn(y, fma_rn(-h, mul_rn(y, y), 1.5f));
  const float s = mul_rn(v, y);
  return fma_rn(fma_rn(-s, s, v), mul_rn(0.5f, y), s);
}

// Box-Muller on one pair of Philox words: (r cos theta, r sin theta).
GF_HD void box_muller(uint32_t wa, uint32_t wb, float* even, float* odd) {
  const float u = fma_rn(static_cast<float>(wa), 2.3283064365386963e-10f, 1.1641532182693481e-10f);
  const float r = sqrt_approx(mul_rn(-2.0f, log_approx(u)));
  const float t = mul_rn(static_cast<float>(wb), 2.3283064365386963e-10f);
  float c, s;
  sincos_2pi_approx(t, &c, &s);
  *even = mul_rn(r, c);
  *odd = mul_rn(r, s);
}

// The four normals of group g = n >> 2 of stream (seed, offset): z[l] = N(seed, offset)[4g + l].
GF_HD void normal4(uint64_t seed, uint64_t offset, uint64_t group, float z[4]) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                           static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  uint32_t w[4];
  philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), w);
  box_muller(w[0], w[1], &z[0], &z[1]);
  box_muller(w[2], w[3], &z[2], &z[3]);
}

// One element N(seed, offset)[n] (computes the whole group; prefer normal4 in loops).
GF_HD float normal_at(uint64_t seed, uint64_t offset, uint64_t n) {
  float z[4];
  normal4(seed, offset, n >> 2, z);
  return z[n & 3u];
}

}  // namespace philox
}  // namespace genflow
