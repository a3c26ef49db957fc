// Shared pieces of the emulated-kernel tests (tests/emu/): random draws, exactly sized buffers,
// bitwise and tolerance checks that count failures.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/fused_update.h"

namespace emu_test {

struct Rng {
  std::mt19937_64 gen;
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
  bool coin(double p = 0.5) { return real(0.0, 1.0) < p; }
  template <typename T> T pick(std::initializer_list<T> v) { return v.begin()[uniform(0, static_cast<int64_t>(v.size()) - 1)]; }
  template <typename T, size_t N> T pick(const T (&v)[N]) { return v[uniform(0, static_cast<int64_t>(N) - 1)]; }
};

// numel elements at ptr, the tail of a heap allocation of numel + shift elements (shift 0 or 1):
// one past the last element is one past the allocation, and shift 1 breaks 16-byte alignment.
template <typename T> struct Buf {
  std::vector<T> store;
  int64_t shift = 0;
  T* ptr = nullptr;
  Buf(int64_t numel, int64_t s) : store(static_cast<size_t>(numel + s)), shift(s) { reset(); }
  Buf(const Buf& o) : store(o.store), shift(o.shift) { reset(); }
  Buf& operator=(const Buf& o) {
    store = o.store;
    shift = o.shift;
    reset();
    return *this;
  }
  void reset() { ptr = store.empty() ? nullptr : store.data() + shift; }
};

// N(0, 1) values; with probability special_rate NaN, +-Inf, huge, float32-subnormal or signed zero.
inline double draw_value(Rng& r, double special_rate) {
  static const double specials[] = {std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY, 3e38, -1e300,
                                    1e-40, -3e-39, 1e-310, 0.0, -0.0};
  if (r.coin(special_rate)) return r.pick(specials);
  return std::normal_distribution<double>(0.0, 1.0)(r.gen);
}

template <typename T> Buf<T> random_buf(Rng& r, int64_t numel, double special_rate) {
  Buf<T> b(numel, r.coin(0.3) ? 1 : 0);
  for (int64_t i = 0; i < numel; ++i) {
    const double v = draw_value(r, special_rate);
    b.ptr[i] = std::is_same_v<T, double> ? static_cast<T>(v) : static_cast<T>(static_cast<float>(v));
  }
  return b;
}

inline std::vector<double> random_doubles(Rng& r, int64_t n, double lo, double hi, double special_rate) {
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& e : v) e = r.coin(special_rate) ? draw_value(r, 1.0) : r.real(lo, hi);
  return v;
}

inline std::vector<int64_t> random_seeds(Rng& r, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& e : v) e = static_cast<int64_t>(r.gen());
  return v;
}

inline const char* dtype_name(genflow::Dtype d) {
  switch (d) {
    case genflow::Dtype::Float32: return "float32";
    case genflow::Dtype::Float64: return "float64";
    case genflow::Dtype::BFloat16: return "bfloat16";
    case genflow::Dtype::Float16: return "float16";
  }
  return "?";
}

template <typename T> bool is_nan(T v) { return std::isnan(static_cast<double>(static_cast<float>(v))); }
inline bool is_nan(double v) { return std::isnan(v); }

struct Failures {
  int count = 0;
  void fail(const char* what, const char* part, const char* msg, int64_t index) {
    if (++count <= 20) std::printf("FAIL %s: %s: %s (index %lld)\n", what, part, msg, static_cast<long long>(index));
  }
  void check(bool ok, const char* what, const char* part = "") {
    if (!ok) fail(what, part, "check failed", -1);
  }
  // Same bits, except that any NaN matches any NaN (CUDA's and c10's NaN encodings differ).
  template <typename T> void bitwise(const T* a, const T* b, int64_t n, const char* what) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::memcmp(&a[i], &b[i], sizeof(T)) == 0 || (is_nan(a[i]) && is_nan(b[i]))) continue;
      char msg[96];
      std::snprintf(msg, sizeof msg, "CPU %.9g, emulated CUDA %.9g", static_cast<double>(static_cast<float>(a[i])),
                    static_cast<double>(static_cast<float>(b[i])));
      if constexpr (std::is_same_v<T, double>) std::snprintf(msg, sizeof msg, "CPU %.17g, emulated CUDA %.17g", a[i], b[i]);
      fail(what, "bitwise", msg, i);
      return;
    }
  }
};

// 64-bit indexing and subnormal inputs (emu_special_cases.cpp); each returns its case count.
int huge_index_cases(Failures& fails);
int subnormal_cases(Failures& fails);

}  // namespace emu_test
