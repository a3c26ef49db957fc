// C++ kernel of the Gaussian-kernel weighted mean and its backward (math and notation in
// csrc/common/kernel_mean.h).
//
// Layout. The keys (and values) are copied once into d-major arrays kt[c][j] (vt[c][j]) padded
// to a multiple of the vector width (an odd number of 64-byte lines) with zero keys of
// log-weight -inf (weight exactly 0), so every inner loop runs over whole vectors of keys.
// Vectors are GCC vector extensions of 64 bytes (16 floats / 8 doubles), compiled for AVX-512,
// AVX2+FMA and baseline x86-64 (GF_CLONES).
//
// Forward and dq: at::parallel_for over query tiles of kTileQ rows; for each key tile of kTileK
// keys the scores s[r][j] are formed from sums of squared differences (unrolled for d <= 4, else
// in blocks of kFeatureBlock features), then per row: the tile max, the online log-sum-exp
// update (running max, sum and weighted sum rescaled by exp(old_max - new_max) when the max
// grows), p = exp(s - max) by a vectorised exponential (Cody-Waite reduction and a degree-7
// (float) / degree-13 (double) polynomial, about 1 ulp; glibc's expf does not vectorise without
// -ffast-math), and the weighted sum of values: in vector lanes over keys for widths <=
// kMaxLaneWidth, else an axpy over the feature dimension with the accumulators in registers.
// Tile sums are formed separately and added to the running sums (two-level summation).
// dk and dv: at::parallel_for over key tiles, each owned by one task (no atomics), looping over
// all query tiles with the saved lse (w = exp(s - lse), no second log-sum-exp pass).
// Every row (key) is reduced in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/kernel_mean.h"
#include "cpu/kernel.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors stay inside always-inline helpers

namespace genflow {
namespace {

constexpr int64_t kTileQ = 16;               // queries per tile
constexpr int64_t kTileK = 256;              // keys per tile (forward, dq)
constexpr int64_t kBackwardAcc = 4096;       // (d + dv) * keys per tile of the dk/dv pass, at most
constexpr int64_t kMaxLaneWidth = 8;         // widths accumulated in vector lanes over keys
constexpr int64_t kFeatureBlock = 16;        // features per partial sum of a squared distance
constexpr int64_t kGrainPairs = 1 << 16;     // query-key pairs per parallel task, at least

template <typename A> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int64_t W = 16;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int64_t W = 8;
};

template <typename V, typename A> GF_INLINE V vload(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename A> GF_INLINE void vstore(A* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
template <typename A> GF_INLINE typename Vec<A>::V splat(A x) { return typename Vec<A>::V{} + x; }

// Fixed-order lane reductions.
template <typename A> GF_INLINE A hsum(const typename Vec<A>::V& v) {
  A l[Vec<A>::W];
  std::memcpy(l, &v, sizeof(v));
  for (int64_t w = Vec<A>::W / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) l[i] += l[i + w];
  return l[0];
}
template <typename A> GF_INLINE A hmax(const typename Vec<A>::V& v) {
  A l[Vec<A>::W];
  std::memcpy(l, &v, sizeof(v));
  A m = l[0];
  for (int64_t i = 1; i < Vec<A>::W; ++i) m = l[i] > m ? l[i] : m;
  return m;
}

// exp(x) for x <= 0 (up to rounding; larger x saturate at exp(88) / exp(709)), 0 below the
// smallest normal: x = n ln2 + r, |r| <= ln2 / 2 (n by the 1.5 * 2^23 rounding trick), the
// Taylor polynomial of exp(r), times 2^n built in the exponent bits.
GF_INLINE Vec<float>::V vexp(const Vec<float>::V& arg) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const V lo = splat(-87.33654f), hi = splat(88.0f), magic = splat(12582912.0f);
  const I under = arg < lo;
  V x = arg < lo ? lo : arg;
  x = x > hi ? hi : x;
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  V p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I e = (((I)t - (I)magic) + 127) << 23;  // vector casts reinterpret the bits
  const V res = p * (V)e;
  return under ? V{} : res;
}

GF_INLINE Vec<double>::V vexp(const Vec<double>::V& arg) {
  using V = Vec<double>::V;
  using I = Vec<double>::I;
  const V lo = splat(-708.3964185322641), hi = splat(709.0), magic = splat(6755399441055744.0);
  const I under = arg < lo;
  V x = arg < lo ? lo : arg;
  x = x > hi ? hi : x;
  const V t = x * 1.4426950408889634074 + magic;
  const V n = t - magic;
  V r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  constexpr double c[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                             1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800,
                             1.0 / 479001600, 1.0 / 6227020800.0};  // 1 / k!
  V p = splat(c[13]);
  for (int k = 12; k >= 0; --k) p = p * r + c[k];
  const I e = (((I)t - (I)magic) + 1023) << 52;
  const V res = p * (V)e;
  return under ? V{} : res;
}

// Everything a tile needs. Row-major inputs q [n, d], k [m, d], v [m, dv]; d-major padded
// copies kt [d, ld], vt [dv, ld] and lw [ld] (-inf on the padding).
template <typename A> struct Ctx {
  const A* q;
  const A* k;
  const A* v;
  const A* kt;
  const A* vt;
  const A* lw;
  int64_t n, m, d, dv, ld;
  A scale;
  A* out;           // forward
  A* lse;
  const A* lse_in;  // backward
  const A* g;
  const A* go;      // g_i . out_i
  A* dq;
  A* dk;
  A* dvals;
  int64_t tkb;      // keys per tile of the dk/dv pass
};

// S[r * sld + j] = lw[j0 + j] - scale * sum_c (q_r[c] - k_{j0+j}[c])^2, r < nr, j < len.
template <typename A, int D>
GF_INLINE void scores(const Ctx<A>& c, const A* q, int64_t nr, int64_t j0, int64_t len, A* S, int64_t sld) {
  using V = typename Vec<A>::V;
  constexpr int64_t W = Vec<A>::W;
  const A* kt = c.kt + j0;
  const A* lw = c.lw + j0;
  if (D > 0) {
    for (int64_t r = 0; r < nr; ++r) {
      V qr[D > 0 ? D : 1];
      for (int64_t e = 0; e < D; ++e) qr[e] = splat(q[r * c.d + e]);
      for (int64_t j = 0; j < len; j += W) {
        V acc = V{};
        for (int64_t e = 0; e < D; ++e) {
          const V diff = qr[e] - vload<V>(kt + e * c.ld + j);
          acc += diff * diff;
        }
        vstore(S + r * sld + j, vload<V>(lw + j) - acc * c.scale);
      }
    }
    return;
  }
  // features in blocks of kFeatureBlock: a block's partial sums P are added to S (two-level
  // summation, error ~ (block + d / block) ulp instead of d ulp)
  std::vector<A> P(nr * sld);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t j = 0; j < len; j += W) vstore(S + r * sld + j, V{});
  for (int64_t e0 = 0; e0 < c.d; e0 += kFeatureBlock) {
    std::fill(P.begin(), P.end(), A(0));
    for (int64_t e = e0; e < std::min(c.d, e0 + kFeatureBlock); ++e) {
      const A* ke = kt + e * c.ld;
      for (int64_t r = 0; r < nr; ++r) {
        const V qe = splat(q[r * c.d + e]);
        A* pr = P.data() + r * sld;
        for (int64_t j = 0; j < len; j += W) {
          const V diff = qe - vload<V>(ke + j);
          vstore(pr + j, vload<V>(pr + j) + diff * diff);
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t j = 0; j < len; j += W)
        vstore(S + r * sld + j, vload<V>(S + r * sld + j) + vload<V>(P.data() + r * sld + j));
  }
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t j = 0; j < len; j += W)
      vstore(S + r * sld + j, vload<V>(lw + j) - vload<V>(S + r * sld + j) * c.scale);
}

template <typename A>
GF_INLINE void scores_any(const Ctx<A>& c, const A* q, int64_t nr, int64_t j0, int64_t len, A* S, int64_t sld) {
  switch (c.d) {
    case 1: return scores<A, 1>(c, q, nr, j0, len, S, sld);
    case 2: return scores<A, 2>(c, q, nr, j0, len, S, sld);
    case 3: return scores<A, 3>(c, q, nr, j0, len, S, sld);
    case 4: return scores<A, 4>(c, q, nr, j0, len, S, sld);
    default: return scores<A, 0>(c, q, nr, j0, len, S, sld);
  }
}

// tacc[e] = sum_{j < len} p[j] (x_{j0+j}[e] - center[e]) for e < width (center nullptr: 0), from
// the d-major padded xt in vector lanes (width <= kMaxLaneWidth) or the row-major x.
template <typename A, int WIDTH>
GF_INLINE void weighted_lanes(const A* p, const A* xt, int64_t ld, int64_t len, const A* center, A* tacc) {
  using V = typename Vec<A>::V;
  constexpr int64_t W = Vec<A>::W;
  V acc[WIDTH];
  V cen[WIDTH];
  for (int64_t e = 0; e < WIDTH; ++e) {
    acc[e] = V{};
    cen[e] = splat(center ? center[e] : A(0));
  }
  for (int64_t j = 0; j < len; j += W) {
    const V pv = vload<V>(p + j);
    for (int64_t e = 0; e < WIDTH; ++e) acc[e] += pv * (vload<V>(xt + e * ld + j) - cen[e]);
  }
  for (int64_t e = 0; e < WIDTH; ++e) tacc[e] = hsum<A>(acc[e]);
}

// Features [e0, e0 + NV W) of the row-major weighted sum, accumulated in registers (even and
// odd keys apart, so consecutive fmas do not wait on each other).
template <typename A, int NV>
GF_INLINE void weighted_rows(const A* p, const A* x, int64_t width, int64_t count, const A* center, int64_t e0,
                             A* tacc) {
  using V = typename Vec<A>::V;
  constexpr int64_t W = Vec<A>::W;
  V acc0[NV], acc1[NV], cen[NV];
  for (int64_t u = 0; u < NV; ++u) {
    acc0[u] = V{};
    acc1[u] = V{};
    cen[u] = center ? vload<V>(center + e0 + u * W) : V{};
  }
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    const V p0 = splat(p[j]), p1 = splat(p[j + 1]);
    const A* x0 = x + j * width + e0;
    for (int64_t u = 0; u < NV; ++u) {
      acc0[u] += p0 * (vload<V>(x0 + u * W) - cen[u]);
      acc1[u] += p1 * (vload<V>(x0 + width + u * W) - cen[u]);
    }
  }
  if (j < count) {
    const V p0 = splat(p[j]);
    for (int64_t u = 0; u < NV; ++u) acc0[u] += p0 * (vload<V>(x + j * width + e0 + u * W) - cen[u]);
  }
  for (int64_t u = 0; u < NV; ++u) vstore(tacc + e0 + u * W, acc0[u] + acc1[u]);
}

template <typename A>
GF_INLINE void weighted_sum(const A* p, const A* xt, const A* x, int64_t ld, int64_t width, int64_t len,
                            int64_t count, const A* center, A* tacc) {
  switch (width) {
    case 1: return weighted_lanes<A, 1>(p, xt, ld, len, center, tacc);
    case 2: return weighted_lanes<A, 2>(p, xt, ld, len, center, tacc);
    case 3: return weighted_lanes<A, 3>(p, xt, ld, len, center, tacc);
    case 4: return weighted_lanes<A, 4>(p, xt, ld, len, center, tacc);
    case 5: return weighted_lanes<A, 5>(p, xt, ld, len, center, tacc);
    case 6: return weighted_lanes<A, 6>(p, xt, ld, len, center, tacc);
    case 7: return weighted_lanes<A, 7>(p, xt, ld, len, center, tacc);
    case 8: return weighted_lanes<A, 8>(p, xt, ld, len, center, tacc);
    default: break;
  }
  // wider: an axpy over the row-major x (the padding, j >= count, has p = 0), blocks of 4 vectors
  constexpr int64_t W = Vec<A>::W;
  const int64_t full = width / W * W;
  int64_t e0 = 0;
  for (; e0 + 4 * W <= full; e0 += 4 * W) weighted_rows<A, 4>(p, x, width, count, center, e0, tacc);
  switch ((full - e0) / W) {
    case 3: weighted_rows<A, 3>(p, x, width, count, center, e0, tacc); break;
    case 2: weighted_rows<A, 2>(p, x, width, count, center, e0, tacc); break;
    case 1: weighted_rows<A, 1>(p, x, width, count, center, e0, tacc); break;
    default: break;
  }
  for (int64_t e = full; e < width; ++e) {  // the last width % W features: four partial sums
    const A ce = center ? center[e] : A(0);
    A t[4] = {A(0), A(0), A(0), A(0)};
    int64_t j = 0;
    for (; j + 3 < count; j += 4)
      for (int64_t u = 0; u < 4; ++u) t[u] += p[j + u] * (x[(j + u) * width + e] - ce);
    for (; j < count; ++j) t[0] += p[j] * (x[j * width + e] - ce);
    tacc[e] = (t[0] + t[1]) + (t[2] + t[3]);
  }
}

// The max of s[0..len).
template <typename A> GF_INLINE A row_max(const A* s, int64_t len) {
  using V = typename Vec<A>::V;
  V m = splat(-std::numeric_limits<A>::infinity());
  for (int64_t j = 0; j < len; j += Vec<A>::W) {
    const V x = vload<V>(s + j);
    m = x > m ? x : m;
  }
  return hmax<A>(m);
}

// s <- exp(s - shift) over s[0..len); returns the sum.
template <typename A> GF_INLINE A exp_row(A* s, int64_t len, A shift) {
  using V = typename Vec<A>::V;
  V tot = V{};
  for (int64_t j = 0; j < len; j += Vec<A>::W) {
    const V p = vexp(vload<V>(s + j) - shift);
    vstore(s + j, p);
    tot += p;
  }
  return hsum<A>(tot);
}

// ---- forward: one query tile [r0, r0 + nr) ----

template <typename A> GF_INLINE void forward_tile_impl(const Ctx<A>& c, int64_t r0, int64_t nr) {
  const A inf = std::numeric_limits<A>::infinity();
  std::vector<A> S(kTileQ * kTileK), acc(nr * c.dv, A(0)), tacc(c.dv);
  A mx[kTileQ], sum[kTileQ];
  std::fill(mx, mx + kTileQ, -inf);
  std::fill(sum, sum + kTileQ, A(0));
  const A* q = c.q + r0 * c.d;
  for (int64_t j0 = 0; j0 < c.ld; j0 += kTileK) {
    const int64_t len = std::min(kTileK, c.ld - j0), count = std::min(len, c.m - j0);
    scores_any(c, q, nr, j0, len, S.data(), kTileK);
    for (int64_t r = 0; r < nr; ++r) {
      A* s = S.data() + r * kTileK;
      const A new_max = std::max(mx[r], row_max(s, len));
      if (new_max == -inf) continue;  // every weight so far is exactly 0
      const A f = std::exp(mx[r] - new_max);
      mx[r] = new_max;
      const A tsum = exp_row(s, len, new_max);
      weighted_sum<A>(s, c.vt ? c.vt + j0 : nullptr, c.v + j0 * c.dv, c.ld, c.dv, len, count, nullptr,
                   tacc.data());
      sum[r] = sum[r] * f + tsum;
      A* ar = acc.data() + r * c.dv;
      for (int64_t e = 0; e < c.dv; ++e) ar[e] = ar[e] * f + tacc[e];
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t e = 0; e < c.dv; ++e) c.out[(r0 + r) * c.dv + e] = acc[r * c.dv + e] / sum[r];
    c.lse[r0 + r] = mx[r] + std::log(sum[r]);
  }
}

// ---- dq: one query tile; a_j = w_j (g . v_j - g . out), dq = 2 scale sum_j a_j (k_j - q) ----

template <typename A> GF_INLINE void dq_tile_impl(const Ctx<A>& c, int64_t r0, int64_t nr) {
  using V = typename Vec<A>::V;
  constexpr int64_t W = Vec<A>::W;
  std::vector<A> S(kTileQ * kTileK), G(kTileK), acc(nr * c.d, A(0)), tacc(c.d);
  const A* q = c.q + r0 * c.d;
  for (int64_t j0 = 0; j0 < c.ld; j0 += kTileK) {
    const int64_t len = std::min(kTileK, c.ld - j0), count = std::min(len, c.m - j0);
    scores_any(c, q, nr, j0, len, S.data(), kTileK);
    for (int64_t r = 0; r < nr; ++r) {
      A* s = S.data() + r * kTileK;
      const A* g = c.g + (r0 + r) * c.dv;
      const A lse = c.lse_in[r0 + r], go = c.go[r0 + r];
      std::fill(G.begin(), G.begin() + len, A(0));  // G[j] = g . v_{j0+j}
      for (int64_t e = 0; e < c.dv; ++e) {
        const A* ve = c.vt + e * c.ld + j0;
        for (int64_t j = 0; j < len; j += W) vstore(G.data() + j, vload<V>(G.data() + j) + g[e] * vload<V>(ve + j));
      }
      for (int64_t j = 0; j < len; j += W)
        vstore(s + j, vexp(vload<V>(s + j) - lse) * (vload<V>(G.data() + j) - go));
      weighted_sum<A>(s, c.kt + j0, c.k + j0 * c.d, c.ld, c.d, len, count, q + r * c.d, tacc.data());
      A* ar = acc.data() + r * c.d;
      for (int64_t e = 0; e < c.d; ++e) ar[e] += tacc[e];
    }
  }
  for (int64_t i = 0; i < nr * c.d; ++i) c.dq[r0 * c.d + i] = A(2) * c.scale * acc[i];
}

// ---- dk, dv: one key tile [j0, j0 + len), all queries ----
// dv_j = sum_i w_ij g_i;  dk_j = 2 scale sum_i a_ij (q_i - k_j). D, DV: compile-time widths, or
// 0 (read from c).

template <typename A, int D, int DV>
GF_INLINE void dkdv_tile(const Ctx<A>& c, int64_t j0) {
  using V = typename Vec<A>::V;
  constexpr int64_t W = Vec<A>::W;
  const int64_t d = D > 0 ? D : c.d, dv = DV > 0 ? DV : c.dv;
  const int64_t tkb = c.tkb, len = std::min(tkb, c.ld - j0), count = std::min(len, c.m - j0);
  std::vector<A> S(kTileQ * tkb), dkt(c.dk ? d * tkb : 0, A(0)), dvt(c.dvals ? dv * tkb : 0, A(0));
  for (int64_t r0 = 0; r0 < c.n; r0 += kTileQ) {
    const int64_t nr = std::min(kTileQ, c.n - r0);
    const A* q = c.q + r0 * c.d;
    scores<A, D>(c, q, nr, j0, len, S.data(), tkb);
    for (int64_t j = 0; j < len; j += W) {
      V kj[D > 0 ? D : 1], vj[DV > 0 ? DV : 1], dk_acc[D > 0 ? D : 1], dv_acc[DV > 0 ? DV : 1];
      if (D > 0) {
        for (int64_t e = 0; e < D; ++e) {
          kj[e] = vload<V>(c.kt + e * c.ld + j0 + j);
          dk_acc[e] = V{};
        }
      }
      if (DV > 0) {
        for (int64_t e = 0; e < DV; ++e) {
          vj[e] = vload<V>(c.vt + e * c.ld + j0 + j);
          dv_acc[e] = V{};
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const A* g = c.g + (r0 + r) * dv;
        const A* qr = q + r * d;
        const V w = vexp(vload<V>(S.data() + r * tkb + j) - c.lse_in[r0 + r]);
        V gv = V{};
        if (DV > 0) {
          for (int64_t e = 0; e < DV; ++e) gv += g[e] * vj[e];
        } else {  // four partial sums, so the fmas do not wait on each other
          const A* vt = c.vt + j0 + j;
          V g1 = V{}, g2 = V{}, g3 = V{};
          int64_t e = 0;
          for (; e + 3 < dv; e += 4) {
            gv += g[e] * vload<V>(vt + e * c.ld);
            g1 += g[e + 1] * vload<V>(vt + (e + 1) * c.ld);
            g2 += g[e + 2] * vload<V>(vt + (e + 2) * c.ld);
            g3 += g[e + 3] * vload<V>(vt + (e + 3) * c.ld);
          }
          for (; e < dv; ++e) gv += g[e] * vload<V>(vt + e * c.ld);
          gv = (gv + g1) + (g2 + g3);
        }
        const V a = w * (gv - c.go[r0 + r]);
        if (c.dvals) {
          for (int64_t e = 0; e < dv; ++e) {
            if (DV > 0) {
              dv_acc[e] += w * g[e];
            } else {
              A* t = dvt.data() + e * tkb + j;
              vstore(t, vload<V>(t) + w * g[e]);
            }
          }
        }
        if (c.dk) {
          for (int64_t e = 0; e < d; ++e) {
            if (D > 0) {
              dk_acc[e] += a * (qr[e] - kj[e]);
            } else {
              A* t = dkt.data() + e * tkb + j;
              vstore(t, vload<V>(t) + a * (qr[e] - vload<V>(c.kt + e * c.ld + j0 + j)));
            }
          }
        }
      }
      if (D > 0 && c.dk) {
        for (int64_t e = 0; e < D; ++e) {
          A* t = dkt.data() + e * tkb + j;
          vstore(t, vload<V>(t) + dk_acc[e]);
        }
      }
      if (DV > 0 && c.dvals) {
        for (int64_t e = 0; e < DV; ++e) {
          A* t = dvt.data() + e * tkb + j;
          vstore(t, vload<V>(t) + dv_acc[e]);
        }
      }
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    if (c.dk)
      for (int64_t e = 0; e < d; ++e) c.dk[(j0 + j) * d + e] = A(2) * c.scale * dkt[e * tkb + j];
    if (c.dvals)
      for (int64_t e = 0; e < dv; ++e) c.dvals[(j0 + j) * dv + e] = dvt[e * tkb + j];
  }
}

template <typename A> GF_INLINE void dkdv_tile_impl(const Ctx<A>& c, int64_t j0) {
  if (c.d == c.dv && c.d == 1) return dkdv_tile<A, 1, 1>(c, j0);
  if (c.d == c.dv && c.d == 2) return dkdv_tile<A, 2, 2>(c, j0);
  if (c.d == c.dv && c.d == 3) return dkdv_tile<A, 3, 3>(c, j0);
  return dkdv_tile<A, 0, 0>(c, j0);
}

#define GF_TILE_FNS(SUFFIX, A)                                                  \
  GF_CLONES void forward_tile_##SUFFIX(const Ctx<A>& c, int64_t r0, int64_t nr) { \
    forward_tile_impl(c, r0, nr);                                                 \
  }                                                                               \
  GF_CLONES void dq_tile_##SUFFIX(const Ctx<A>& c, int64_t r0, int64_t nr) {      \
    dq_tile_impl(c, r0, nr);                                                      \
  }                                                                               \
  GF_CLONES void dkdv_tile_##SUFFIX(const Ctx<A>& c, int64_t j0) { dkdv_tile_impl(c, j0); }
GF_TILE_FNS(f32, float)
GF_TILE_FNS(f64, double)
#undef GF_TILE_FNS

GF_INLINE void forward_tile(const Ctx<float>& c, int64_t r0, int64_t nr) { forward_tile_f32(c, r0, nr); }
GF_INLINE void forward_tile(const Ctx<double>& c, int64_t r0, int64_t nr) { forward_tile_f64(c, r0, nr); }
GF_INLINE void dq_tile(const Ctx<float>& c, int64_t r0, int64_t nr) { dq_tile_f32(c, r0, nr); }
GF_INLINE void dq_tile(const Ctx<double>& c, int64_t r0, int64_t nr) { dq_tile_f64(c, r0, nr); }
GF_INLINE void dkdv_tile(const Ctx<float>& c, int64_t j0) { dkdv_tile_f32(c, j0); }
GF_INLINE void dkdv_tile(const Ctx<double>& c, int64_t j0) { dkdv_tile_f64(c, j0); }

// The d-major padded copies (kt, vt when wanted, lw) of a call; owns their storage.
template <typename A> struct Layout {
  std::vector<A> kt, vt, lw;
  void fill(Ctx<A>& c, const void* log_weights, bool want_vt) {
    // an odd number of cache lines per row, so the rows of a key tile do not share L1 sets
    c.ld = (c.m + Vec<A>::W - 1) / Vec<A>::W * Vec<A>::W;
    if ((c.ld / Vec<A>::W) % 2 == 0) c.ld += Vec<A>::W;
    kt.assign(c.d * c.ld, A(0));
    lw.assign(c.ld, -std::numeric_limits<A>::infinity());
    const A* lwp = static_cast<const A*>(log_weights);
    for (int64_t j = 0; j < c.m; ++j) {
      lw[j] = lwp ? lwp[j] : A(0);
      for (int64_t e = 0; e < c.d; ++e) kt[e * c.ld + j] = c.k[j * c.d + e];
    }
    if (want_vt) {
      vt.assign(c.dv * c.ld, A(0));
      for (int64_t j = 0; j < c.m; ++j)
        for (int64_t e = 0; e < c.dv; ++e) vt[e * c.ld + j] = c.v[j * c.dv + e];
    }
    c.kt = kt.data();
    c.vt = want_vt ? vt.data() : nullptr;
    c.lw = lw.data();
  }
};

template <typename A> Ctx<A> base_ctx(const void* q, const void* k, const void* v, int64_t n, int64_t m,
                                      int64_t d, int64_t dv, double scale) {
  Ctx<A> c{};
  c.q = static_cast<const A*>(q);
  c.k = static_cast<const A*>(k);
  c.v = static_cast<const A*>(v);
  c.n = n;
  c.m = m;
  c.d = d;
  c.dv = dv;
  c.scale = static_cast<A>(scale);
  return c;
}

// Tiles per parallel task so that a task has at least kGrainPairs pairs.
int64_t grain(int64_t rows_per_tile, int64_t other) {
  return std::max<int64_t>(1, kGrainPairs / std::max<int64_t>(1, rows_per_tile * other));
}

template <typename A> void forward(const KernelMeanParams& p) {
  Ctx<A> c = base_ctx<A>(p.queries, p.keys, p.values, p.n, p.m, p.d, p.dv, p.scale);
  c.out = static_cast<A*>(p.out);
  c.lse = static_cast<A*>(p.lse);
  Layout<A> layout;
  layout.fill(c, p.log_weights, c.dv <= kMaxLaneWidth);
  const int64_t tiles = (c.n + kTileQ - 1) / kTileQ;
  at::parallel_for(0, tiles, grain(kTileQ, c.m), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) forward_tile(c, t * kTileQ, std::min(kTileQ, c.n - t * kTileQ));
  });
}

template <typename A> void backward(const KernelMeanBackwardParams& p) {
  Ctx<A> c = base_ctx<A>(p.queries, p.keys, p.values, p.n, p.m, p.d, p.dv, p.scale);
  c.lse_in = static_cast<const A*>(p.lse);
  c.g = static_cast<const A*>(p.grad_out);
  c.dq = static_cast<A*>(p.grad_queries);
  c.dk = static_cast<A*>(p.grad_keys);
  c.dvals = static_cast<A*>(p.grad_values);
  Layout<A> layout;
  layout.fill(c, p.log_weights, true);
  std::vector<A> go(c.n);
  const A* out = static_cast<const A*>(p.out);
  for (int64_t i = 0; i < c.n; ++i) {
    A s = A(0);
    for (int64_t e = 0; e < c.dv; ++e) s += c.g[i * c.dv + e] * out[i * c.dv + e];
    go[i] = s;
  }
  c.go = go.data();
  if (c.dq) {
    const int64_t tiles = (c.n + kTileQ - 1) / kTileQ;
    at::parallel_for(0, tiles, grain(kTileQ, c.m), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) dq_tile(c, t * kTileQ, std::min(kTileQ, c.n - t * kTileQ));
    });
  }
  if (c.dk || c.dvals) {
    const int64_t per = kBackwardAcc / std::max<int64_t>(1, c.d + c.dv);
    c.tkb = std::clamp<int64_t>(per / Vec<A>::W * Vec<A>::W, Vec<A>::W, kTileK);
    const int64_t tiles = (c.ld + c.tkb - 1) / c.tkb;
    at::parallel_for(0, tiles, grain(c.tkb, c.n), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) dkdv_tile(c, t * c.tkb);
    });
  }
}

}  // namespace

void kernel_weighted_mean_cpu(const KernelMeanParams& p, Dtype dtype) {
  if (p.n == 0) return;
  if (dtype == Dtype::Float64) return forward<double>(p);
  return forward<float>(p);
}

void kernel_weighted_mean_backward_cpu(const KernelMeanBackwardParams& p, Dtype dtype) {
  if (dtype == Dtype::Float64) return backward<double>(p);
  return backward<float>(p);
}

}  // namespace genflow
