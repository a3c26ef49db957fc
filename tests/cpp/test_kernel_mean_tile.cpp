// C++ tests of the online log-sum-exp header csrc/common/kernel_mean_tile.h (run by ctest): the
// two ways csrc/cuda/kernel_mean.cu streams a row's keys, replayed on the host with the kernel's
// tiling, against a dense double-precision computation of
//   lse_i = log sum_j exp(s_ij),  out_i = sum_j exp(s_ij - lse_i) v_j,
//   s_ij = -|q_i - k_j|^2 / (2 sigma^2) + lw_j
// over random inputs, sigma = 1e-3, 1 and 1e3, tail tiles and zero weights (lw = -inf).
//   small-d: keys in tiles of 256, lane `part` of `splits` takes every splits-th key of a tile
//            (lse_accumulate), lanes merged by the xor butterfly (lse_merge);
//   general: tiles of 32 keys, each of 4 lanes takes 8 keys, the tile max raises m
//            (lse_rescale), lanes keep partial sums l added at the end.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/kernel_mean_tile.h"

using namespace genflow;

static int failures = 0;

static void check(bool ok, const char* what, double err, double tol) {
  if (!ok) {
    std::printf("FAILED: %s (error %.3g, tolerance %.3g)\n", what, err, tol);
    ++failures;
  }
}

constexpr int kDv = 3;

struct Problem {
  int d = 0;
  int64_t n = 0, m = 0;
  double sigma = 1;
  std::vector<double> q, k, v, lw;  // [n, d], [m, d], [m, kDv], [m]
};

Problem make_problem(int64_t n, int64_t m, int d, double sigma, uint32_t seed) {
  Problem pr;
  pr.d = d;
  pr.n = n;
  pr.m = m;
  pr.sigma = sigma;
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  // Inputs are float32 values, so that the float32 paths and the reference see the same data.
  auto draw = [&] { return static_cast<double>(static_cast<float>(normal(gen))); };
  for (int64_t e = 0; e < n * d; ++e) pr.q.push_back(draw());
  for (int64_t e = 0; e < m * d; ++e) pr.k.push_back(draw());
  for (int64_t e = 0; e < m * kDv; ++e) pr.v.push_back(draw());
  for (int64_t j = 0; j < m; ++j) pr.lw.push_back(uniform(gen) < 0.1 ? -INFINITY : 2 * draw());
  return pr;
}

// Base-2 score of (i, j) in the accumulation type, as the kernel forms it.
template <typename A> A score2(const Problem& pr, int64_t i, int64_t j) {
  const A scale2 = static_cast<A>(kLog2e / (2 * pr.sigma * pr.sigma));
  A dist = 0;
  for (int x = 0; x < pr.d; ++x) {
    const A diff = static_cast<A>(pr.q[i * pr.d + x]) - static_cast<A>(pr.k[j * pr.d + x]);
    dist = std::fma(diff, diff, dist);
  }
  return std::fma(-scale2, dist, static_cast<A>(pr.lw[j]) * static_cast<A>(kLog2e));
}

// Dense double reference for row i.
void dense(const Problem& pr, int64_t i, double (&out)[kDv], double& lse) {
  std::vector<double> s(pr.m);
  double mx = -INFINITY;
  for (int64_t j = 0; j < pr.m; ++j) {
    double dist = 0;
    for (int x = 0; x < pr.d; ++x) dist += std::pow(pr.q[i * pr.d + x] - pr.k[j * pr.d + x], 2);
    s[j] = -dist / (2 * pr.sigma * pr.sigma) + pr.lw[j];
    mx = std::fmax(mx, s[j]);
  }
  double l = 0;
  for (double& o : out) o = 0;
  for (int64_t j = 0; j < pr.m; ++j) {
    const double w = std::exp(s[j] - mx);
    l += w;
    for (int x = 0; x < kDv; ++x) out[x] += w * pr.v[j * kDv + x];
  }
  for (double& o : out) o /= l;
  lse = mx + std::log(l);
}

// The small-d kernel's order of operations for row i.
template <typename A> void small_path(const Problem& pr, int64_t i, int splits, A (&out)[kDv], A& lse) {
  constexpr int kTile = 256;
  std::vector<A> m(splits, lse_init<A>()), l(splits, A(0));
  std::vector<std::array<A, kDv>> acc(splits);
  for (auto& a : acc) a.fill(A(0));
  for (int64_t k0 = 0; k0 < pr.m; k0 += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, pr.m - k0));
    for (int part = 0; part < splits; ++part)
      for (int j = part; j < count; j += splits) {
        A v[kDv], a[kDv];
        for (int x = 0; x < kDv; ++x) {
          v[x] = static_cast<A>(pr.v[(k0 + j) * kDv + x]);
          a[x] = acc[part][x];
        }
        lse_accumulate<kDv>(score2<A>(pr, i, k0 + j), v, 1, m[part], l[part], a);
        for (int x = 0; x < kDv; ++x) acc[part][x] = a[x];
      }
  }
  for (int off = 1; off < splits; off <<= 1) {  // xor butterfly: every lane ends with the total
    std::vector<A> m2 = m, l2 = l;
    std::vector<std::array<A, kDv>> acc2 = acc;
    for (int part = 0; part < splits; ++part) {
      A a[kDv], b[kDv];
      for (int x = 0; x < kDv; ++x) {
        a[x] = acc2[part][x];
        b[x] = acc2[part ^ off][x];
      }
      lse_merge<kDv>(m2[part], l2[part], a, m[part ^ off], l[part ^ off], b);
      for (int x = 0; x < kDv; ++x) acc[part][x] = a[x];
      m[part] = m2[part];
      l[part] = l2[part];
    }
  }
  for (int x = 0; x < kDv; ++x) out[x] = acc[0][x] / l[0];
  lse = lse_finish(m[0], l[0]);
}

// The general kernel's order of operations for row i.
template <typename A> void general_path(const Problem& pr, int64_t i, A (&out)[kDv], A& lse) {
  constexpr int kTile = 32, kLanes = 4;
  A m = lse_init<A>(), l[kLanes] = {}, acc[kDv] = {};
  for (int64_t k0 = 0; k0 < pr.m; k0 += kTile) {
    A s[kTile], tile_max = -INFINITY;
    for (int jj = 0; jj < kTile; ++jj) {
      s[jj] = k0 + jj < pr.m ? score2<A>(pr, i, k0 + jj) : A(-INFINITY);
      tile_max = std::fmax(tile_max, s[jj]);
    }
    const A alpha = lse_rescale(m, tile_max);
    for (int lane = 0; lane < kLanes; ++lane) {
      A tile_sum = 0;
      for (int c = 0; c < kTile / kLanes; ++c) tile_sum += exp2_acc(s[lane + kLanes * c] - m);
      l[lane] = std::fma(l[lane], alpha, tile_sum);
    }
    for (A& a : acc) a *= alpha;
    for (int jj = 0; jj < kTile; ++jj) {
      const A w = exp2_acc(s[jj] - m);
      for (int x = 0; x < kDv; ++x)
        if (k0 + jj < pr.m) acc[x] = std::fma(w, static_cast<A>(pr.v[(k0 + jj) * kDv + x]), acc[x]);
    }
  }
  const A l_total = (l[0] + l[1]) + (l[2] + l[3]);
  for (int x = 0; x < kDv; ++x) out[x] = acc[x] / l_total;
  lse = lse_finish(m, l_total);
}

// Worst errors over all rows of a problem: |out - ref| / max|v| and |lse - ref| / max(1, |ref|).
template <typename A> void run(const Problem& pr, int splits, bool general, double& out_err, double& lse_err) {
  double vmax = 0;
  for (double v : pr.v) vmax = std::fmax(vmax, std::fabs(v));
  out_err = lse_err = 0;
  for (int64_t i = 0; i < pr.n; ++i) {
    double ref[kDv], ref_lse;
    dense(pr, i, ref, ref_lse);
    A out[kDv], lse;
    if (general) {
      general_path<A>(pr, i, out, lse);
    } else {
      small_path<A>(pr, i, splits, out, lse);
    }
    for (int x = 0; x < kDv; ++x) out_err = std::fmax(out_err, std::fabs(out[x] - ref[x]) / vmax);
    lse_err = std::fmax(lse_err, std::fabs(lse - ref_lse) / std::fmax(1.0, std::fabs(ref_lse)));
    if (!std::isfinite(static_cast<double>(lse))) out_err = INFINITY;
  }
}

template <typename A> void test_type(double tol, const char* type_name) {
  const double sigmas[] = {1e-3, 1.0, 1e3};
  const int64_t key_counts[] = {1, 45, 300, 777};  // tails of both tile sizes
  const int dims[] = {1, 3, 8};
  uint32_t seed = 1;
  for (double sigma : sigmas)
    for (int64_t m : key_counts)
      for (int d : dims) {
        const Problem pr = make_problem(7, m, d, sigma, seed++);
        if (!std::isfinite(pr.lw[0]) && m == 1) continue;  // no key with weight: out is undefined
        for (int variant = 0; variant < 4; ++variant) {
          const bool general = variant == 3;
          const int splits = general ? 1 : (variant == 0 ? 1 : variant == 1 ? 4 : 32);
          double out_err, lse_err;
          run<A>(pr, splits, general, out_err, lse_err);
          char what[160];
          std::snprintf(what, sizeof what, "%s %s path (splits %d), sigma %g, m %lld, d %d: out", type_name,
                        general ? "general" : "small", splits, sigma, static_cast<long long>(m), d);
          check(out_err <= tol, what, out_err, tol);
          std::snprintf(what, sizeof what, "%s %s path (splits %d), sigma %g, m %lld, d %d: lse", type_name,
                        general ? "general" : "small", splits, sigma, static_cast<long long>(m), d);
          check(lse_err <= tol, what, lse_err, tol);
        }
      }
}

int main() {
  test_type<float>(4e-6, "float");
  test_type<double>(1e-12, "double");

  // Merging with an empty state (a lane that saw no key, or only zero weights) changes nothing.
  {
    float m = 1.5f, l = 2.0f, acc[1] = {3.0f};
    const float empty_acc[1] = {0.0f};
    lse_merge<1>(m, l, acc, lse_init<float>(), 0.0f, empty_acc);
    check(m == 1.5f && l == 2.0f && acc[0] == 3.0f, "merge with an empty state", std::fabs(l - 2.0f), 0);
    float me = lse_init<float>(), le = 0.0f, acce[1] = {0.0f};
    lse_merge<1>(me, le, acce, lse_init<float>(), 0.0f, empty_acc);
    check(le == 0.0f && acce[0] == 0.0f, "merge of two empty states stays empty (no NaN)", le, 0);
  }
  // A zero weight (s = -inf) before any other key leaves the state empty.
  {
    double m = lse_init<double>(), l = 0, acc[1] = {0};
    const double v[1] = {5.0};
    lse_accumulate<1>(-static_cast<double>(INFINITY), v, 1, m, l, acc);
    check(l == 0 && acc[0] == 0, "a zero weight adds nothing", l, 0);
    lse_accumulate<1>(-3.0, v, 1, m, l, acc);
    check(std::fabs(lse_finish(m, l) - (-3.0 * kLn2)) < 1e-15 && acc[0] / l == 5.0, "one key", l, 0);
  }

  if (failures == 0) std::printf("test_kernel_mean_tile: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
