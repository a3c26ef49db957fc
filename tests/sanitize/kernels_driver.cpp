// Random-shape driver of the CPU kernels (csrc/cpu/*.cpp) for the AddressSanitizer and
// UndefinedBehaviorSanitizer build (CMake option GENFLOW_SANITIZE; no Python).
//
//   sanitize_kernels [quick | long | ITERATIONS] [SEED]
//
// quick: 2,000 iterations (about 10 s on one quiet core; CI), long: 20,000 (about 2 minutes).
//
// Each iteration calls the kernels of one op family (fused update, Langevin step, Hutchinson
// probes, probe_dot, kernel weighted mean forward + backward) on shapes and parameters drawn from
// std::mt19937_64(SEED), with the preconditions the op layer (csrc/ops/*.cpp) guarantees and
// nothing more. Sizes include 0, 1, odd sizes, block boundaries +- 1 and large primes (up to
// 100003 elements per sample; d = 0 and dv = 0 for the kernel mean). The kernels take contiguous
// arrays only (the ops make strided inputs contiguous), so there are no strided cases. Every
// array is its own exactly-sized heap allocation, sometimes shifted by one element inside an
// allocation of numel + 1 (to take the unaligned paths) so that its last element is still the
// allocation's last: a read or write one past any array trips ASan. Inputs
// contain NaN, +-Inf, huge, tiny and denormal values. Invariants checked (exit 1 on a mismatch):
// the plain and grouped (CUDA-order) variants agree bitwise (NaN matches NaN) for the fused
// update, the Langevin step, the probes and probe_dot; the fused update's divergence flag is set
// exactly when its output holds a NaN/Inf; the kernel weighted mean and its gradients
// are finite for finite inputs, and a backward with no queries leaves zero key/value gradients.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/fused_update.h"
#include "common/hutchinson.h"
#include "common/kernel_mean.h"
#include "common/langevin.h"

namespace {

using genflow::Dtype;

// ---- random draws ----

struct Rng {
  std::mt19937_64 gen;
  int64_t uniform(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen);
  }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen); }
  bool coin(double p = 0.5) { return real(0.0, 1.0) < p; }
  template <typename T> T pick(const std::vector<T>& v) {
    return v[static_cast<size_t>(uniform(0, static_cast<int64_t>(v.size()) - 1))];
  }
};

// NaN, infinities, huge, tiny and denormal (float32 and float64) values, zeros of both signs.
double special_value(Rng& r) {
  static const std::vector<double> specials = {
      std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
      -std::numeric_limits<double>::infinity(), 1e300, -1e300, 3e38, -3e38, 1e-310, 1e-40,
      -1e-45, 0.0, -0.0, 65504.0, 1e5};
  return r.pick(specials);
}

// An element value: mostly N(0, 1); with probability special_rate a special value.
double draw_value(Rng& r, double special_rate) {
  return r.coin(special_rate) ? special_value(r) : r.normal();
}

// ---- exactly sized buffers ----

// numel elements at ptr: the tail of a heap allocation of numel + shift elements (shift 0 or 1),
// so one past the last element is one past the allocation.
template <typename T> struct Buf {
  std::vector<T> store;
  int64_t shift = 0;
  T* ptr = nullptr;
  Buf() = default;
  Buf(int64_t numel, int64_t shift_) : store(static_cast<size_t>(numel + shift_)), shift(shift_) {
    ptr = store.empty() ? nullptr : store.data() + shift;
  }
  Buf(const Buf& o) : store(o.store), shift(o.shift) {
    ptr = store.empty() ? nullptr : store.data() + shift;
  }
  Buf& operator=(const Buf& o) {
    store = o.store;
    shift = o.shift;
    ptr = store.empty() ? nullptr : store.data() + shift;
    return *this;
  }
  int64_t numel() const { return static_cast<int64_t>(store.size()) - shift; }
};

template <typename T> Buf<T> random_buf(Rng& r, int64_t numel, double special_rate) {
  Buf<T> b(numel, r.coin(0.25) ? 1 : 0);
  for (int64_t i = 0; i < numel; ++i)
    b.ptr[i] = static_cast<T>(static_cast<float>(draw_value(r, special_rate)));
  return b;
}
template <> Buf<double> random_buf<double>(Rng& r, int64_t numel, double special_rate) {
  Buf<double> b(numel, r.coin(0.25) ? 1 : 0);
  for (int64_t i = 0; i < numel; ++i) b.ptr[i] = draw_value(r, special_rate);
  return b;
}

// Exactly n float64 values (coefficients, scales, accumulators): finite, sometimes special.
std::vector<double> random_doubles(Rng& r, int64_t n, double lo, double hi, double special_rate) {
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& e : v) e = r.coin(special_rate) ? special_value(r) : r.real(lo, hi);
  return v;
}

std::vector<int64_t> random_seeds(Rng& r, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& e : v) e = static_cast<int64_t>(r.gen());
  return v;
}

// Seeds of a generated-noise update: seed_value, seeds[1], or seeds[B] per sample (the array
// lives in `store`).
void random_update_seeds(Rng& r, int64_t B, genflow::FusedUpdateParams& p, std::vector<int64_t>& store) {
  const int seed_kind = B >= 1 ? static_cast<int>(r.uniform(0, 2)) : 0;
  p.seed_value = r.gen();
  if (seed_kind > 0) {
    p.seed_per_sample = seed_kind == 2;
    store = random_seeds(r, p.seed_per_sample ? B : 1);
    p.seeds = store.data();
  }
}

// ---- checks ----

const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::Float32: return "float32";
    case Dtype::Float64: return "float64";
    case Dtype::BFloat16: return "bfloat16";
    case Dtype::Float16: return "float16";
  }
  return "?";
}

[[noreturn]] void fail(const std::string& what, int64_t iteration) {
  std::fprintf(stderr, "sanitize_kernels: MISMATCH at iteration %lld: %s\n",
               static_cast<long long>(iteration), what.c_str());
  std::exit(1);
}

template <typename T> bool is_nan(T v) { return std::isnan(static_cast<double>(v)); }

// Bitwise equal, or both NaN.
template <typename T> bool same_bits(const T* a, const T* b, int64_t n, int64_t* where) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) == 0 || (is_nan(a[i]) && is_nan(b[i]))) continue;
    *where = i;
    return false;
  }
  return true;
}

// " (a vs b)" for element i of two arrays, as float64 with all digits.
template <typename T> std::string values_at(const T* a, const T* b, int64_t i) {
  char text[96];
  std::snprintf(text, sizeof(text), " (%.17g vs %.17g)", static_cast<double>(a[i]),
                static_cast<double>(b[i]));
  return text;
}

template <typename T> bool all_finite(const T* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(a[i]))) return false;
  return true;
}

// ---- shapes ----

int64_t draw_batch(Rng& r) { return r.pick<int64_t>({0, 1, 1, 2, 3, 5, 7, 16, 33}); }

// per_sample: small, odd, multiples of 4, 1024-block / 4096-chunk boundaries +- 1, large primes.
int64_t draw_per_sample(Rng& r) {
  switch (r.uniform(0, 4)) {
    case 0: return r.pick<int64_t>({0, 1, 2, 3, 4, 5, 7, 8, 12, 13});
    case 1: return r.pick<int64_t>({1023, 1024, 1025, 2047, 2048, 2049, 3071, 3072, 3073});
    case 2: return r.pick<int64_t>({4095, 4096, 4097, 8191, 8192, 8193});
    case 3: return r.pick<int64_t>({1021, 4093, 12289, 65521, 100003});
    default: return r.coin() ? 4 * r.uniform(1, 300) : r.uniform(1, 1200);
  }
}

// (B, P) with B * P bounded (the sanitizers slow the kernels ~10x).
void draw_shape(Rng& r, int64_t* B, int64_t* P) {
  *B = draw_batch(r);
  *P = draw_per_sample(r);
  while (*B * *P > 120000) *B /= 2;
}

struct Counts {
  int64_t fused = 0, fused_grouped = 0, langevin = 0, langevin_grouped = 0, probes = 0,
          probes_grouped = 0, dot = 0, dot_grouped = 0, kmean = 0, kmean_backward = 0;
  int64_t total() const {
    return fused + fused_grouped + langevin + langevin_grouped + probes + probes_grouped + dot +
           dot_grouped + kmean + kmean_backward;
  }
};

// ---- fused update ----

// The arrays of one fused-update call; out_alias: -1 its own array, 0 x, 1..K term k-1,
// K + 1 the noise.
template <typename T> struct FusedArrays {
  Buf<T> x, terms[genflow::kMaxTerms], noise, out;
  std::vector<double> coef;
  std::vector<int64_t> seeds;
};

template <typename T>
genflow::FusedUpdateParams fused_params(const genflow::FusedUpdateParams& base, FusedArrays<T>& a,
                                        bool philox_only, int out_alias) {
  genflow::FusedUpdateParams p = base;
  p.x = philox_only ? nullptr : a.x.ptr;
  for (int k = 0; k < p.num_terms; ++k) p.terms[k] = a.terms[k].ptr;
  p.noise = p.noise_mode == genflow::kSuppliedNoise ? a.noise.ptr : nullptr;
  if (base.coef != nullptr) p.coef = a.coef.data();
  if (base.seeds != nullptr) p.seeds = a.seeds.data();
  if (out_alias < 0) p.out = a.out.ptr;
  else if (out_alias == 0) p.out = a.x.ptr;
  else if (out_alias <= p.num_terms) p.out = a.terms[out_alias - 1].ptr;
  else p.out = a.noise.ptr;
  return p;
}

template <typename T> T* fused_out(FusedArrays<T>& a, int out_alias, int K) {
  if (out_alias < 0) return a.out.ptr;
  if (out_alias == 0) return a.x.ptr;
  if (out_alias <= K) return a.terms[out_alias - 1].ptr;
  return a.noise.ptr;
}

template <typename T>
void fused_case(Rng& r, Dtype dtype, int64_t it, Counts& n) {
  int64_t B, P;
  draw_shape(r, &B, &P);
  const int64_t numel = B * P;
  const double sp = r.coin(0.3) ? 0.02 : 0.0;
  const bool philox_only = r.coin(0.1);  // philox_normal: x = nullptr, no terms, generated noise
  genflow::FusedUpdateParams base{};
  base.num_terms = philox_only ? 0 : static_cast<int32_t>(r.uniform(0, genflow::kMaxTerms));
  base.noise_mode = philox_only ? genflow::kGeneratedNoise : static_cast<int32_t>(r.uniform(0, 2));
  base.numel = numel;
  base.batch = B;
  base.per_sample = P;
  base.offset = r.coin() ? 0u : static_cast<uint64_t>(r.uniform(0, int64_t(1) << 40));
  const int K = base.num_terms;

  FusedArrays<T> a;
  a.x = random_buf<T>(r, numel, sp);
  for (int k = 0; k < K; ++k) a.terms[k] = random_buf<T>(r, numel, sp);
  if (base.noise_mode == genflow::kSuppliedNoise) a.noise = random_buf<T>(r, numel, sp);
  // coefficients: coef_value, a [K+2] array, or a [K+2, B] array
  const int coef_kind = philox_only ? 0 : static_cast<int>(r.uniform(0, 2));
  if (philox_only) {
    base.coef_value[0] = 0.0;
    base.coef_value[1] = 1.0;
  } else if (coef_kind == 0) {
    for (int k = 0; k < K + 2; ++k) base.coef_value[k] = r.coin(sp) ? special_value(r) : r.normal();
  } else {
    base.coef_per_sample = coef_kind == 2;
    a.coef = random_doubles(r, (K + 2) * (base.coef_per_sample ? B : 1), -2.0, 2.0, sp);
    base.coef = a.coef.data();
  }
  if (base.noise_mode == genflow::kGeneratedNoise) random_update_seeds(r, B, base, a.seeds);
  int out_alias = -1;
  if (!philox_only && r.coin(0.4)) {
    out_alias = static_cast<int>(r.uniform(0, K + (base.noise_mode == genflow::kSuppliedNoise)));
  }
  if (out_alias < 0) a.out = Buf<T>(numel, r.coin(0.25) ? 1 : 0);

  FusedArrays<T> g = a;  // the grouped variant's own copy (in-place calls overwrite inputs)
  genflow::FusedUpdateParams pa = fused_params(base, a, philox_only, out_alias);
  genflow::FusedUpdateParams pg = fused_params(base, g, philox_only, out_alias);
  // the divergence flag (fused_update_out's nonfinite): lowered to step when a NaN/Inf is written
  int32_t flag = std::numeric_limits<int32_t>::max(), flag_g = flag;
  if (r.coin(0.3)) {
    pa.step = pg.step = static_cast<int32_t>(r.uniform(0, 1000));
    pa.nonfinite = &flag;
    pg.nonfinite = &flag_g;
  }
  if (numel > 0) {  // the op skips empty calls (csrc/ops/fused_update.cpp, run)
    genflow::fused_update_cpu(pa, dtype);
    ++n.fused;
  }
  genflow::fused_update_cpu_grouped(pg, dtype);  // the test hook is called for any numel
  ++n.fused_grouped;
  const std::string shape = std::string(dtype_name(dtype)) + " B=" + std::to_string(B) + " P=" +
                            std::to_string(P) + " K=" + std::to_string(K) +
                            " noise_mode=" + std::to_string(base.noise_mode);
  T* out = fused_out(a, out_alias, K);
  int64_t where = 0;
  if (numel > 0 && !same_bits(out, fused_out(g, out_alias, K), numel, &where))
    fail("fused_update_cpu vs fused_update_cpu_grouped, dtype " + shape + " element " +
             std::to_string(where) + values_at(out, fused_out(g, out_alias, K), where),
         it);
  const bool diverged = numel > 0 && !all_finite(out, numel);
  if (pa.nonfinite != nullptr && ((flag == pa.step) != diverged || flag_g != flag))
    fail("fused_update nonfinite flag " + std::to_string(flag) + " (grouped " +
             std::to_string(flag_g) + "), step " + std::to_string(pa.step) + ", output " +
             (diverged ? "not " : "") + "finite, dtype " + shape,
         it);
}

// ---- Langevin step ----

template <typename T> struct LangevinArrays {
  Buf<T> x, model_out, noise, out;
  std::vector<double> coef, partial, norms, step;
  std::vector<int64_t> seeds;
};

// out_alias: -1 its own array, 0 x, 1 model_out, 2 the noise.
template <typename T>
genflow::LangevinParams langevin_params(const genflow::LangevinParams& base, LangevinArrays<T>& a,
                                        int out_alias) {
  genflow::LangevinParams p = base;
  p.update.x = a.x.ptr;
  p.update.terms[0] = a.model_out.ptr;
  p.update.noise = p.update.noise_mode == genflow::kSuppliedNoise ? a.noise.ptr : nullptr;
  if (base.update.seeds != nullptr) p.update.seeds = a.seeds.data();
  if (base.coef != nullptr) p.coef = a.coef.data();
  T* outs[3] = {a.x.ptr, a.model_out.ptr, a.noise.ptr};
  p.update.out = out_alias < 0 ? a.out.ptr : outs[out_alias];
  p.partial = a.partial.data();
  p.norms = a.norms.data();
  p.step = a.step.data();
  p.update.coef = p.step;
  return p;
}

template <typename T>
void langevin_case(Rng& r, Dtype dtype, int64_t it, Counts& n) {
  int64_t B, P;
  draw_shape(r, &B, &P);
  const int64_t numel = B * P;
  const double sp = r.coin(0.3) ? 0.02 : 0.0;
  genflow::LangevinParams base{};
  auto& u = base.update;
  u.num_terms = 1;
  u.noise_mode = r.coin() ? genflow::kSuppliedNoise : genflow::kGeneratedNoise;
  u.numel = numel;
  u.batch = B;
  u.per_sample = P;
  u.offset = static_cast<uint64_t>(r.uniform(0, 1000));
  u.coef_per_sample = true;
  base.batch_mean = r.coin();
  base.chunks = genflow::langevin_chunks(P);

  LangevinArrays<T> a;
  a.x = random_buf<T>(r, numel, sp);
  a.model_out = random_buf<T>(r, numel, sp);
  if (u.noise_mode == genflow::kSuppliedNoise) a.noise = random_buf<T>(r, numel, sp);
  const int coef_kind = static_cast<int>(r.uniform(0, 2));
  if (coef_kind == 0) {
    base.coef_value[0] = r.real(-2.0, 0.0);
    base.coef_value[1] = r.real(-2.0, 2.0);
    base.coef_value[2] = r.coin(sp) ? special_value(r) : r.real(0.0, 1.0);
  } else {
    base.coef_per_sample = coef_kind == 2;
    a.coef = random_doubles(r, 3 * (base.coef_per_sample ? B : 1), -2.0, 1.0, sp);
    base.coef = a.coef.data();
  }
  if (u.noise_mode == genflow::kGeneratedNoise) random_update_seeds(r, B, u, a.seeds);
  // scratch sizes as csrc/ops/langevin.cpp allocates them
  a.partial.assign(static_cast<size_t>(std::max<int64_t>(B * base.chunks * 2, 1)), 0.0);
  a.norms.assign(static_cast<size_t>(std::max<int64_t>(B * 2, 1)), 0.0);
  a.step.assign(static_cast<size_t>(std::max<int64_t>(B * 3, 1)), 0.0);
  int out_alias = -1;
  if (r.coin(0.4)) out_alias = static_cast<int>(r.uniform(0, u.noise_mode == genflow::kSuppliedNoise ? 2 : 1));
  if (out_alias < 0) a.out = Buf<T>(numel, r.coin(0.25) ? 1 : 0);

  LangevinArrays<T> g = a;
  const genflow::LangevinParams pa = langevin_params(base, a, out_alias);
  const genflow::LangevinParams pg = langevin_params(base, g, out_alias);
  if (numel > 0) {  // the op skips empty calls (csrc/ops/langevin.cpp, run)
    genflow::langevin_update_cpu(pa, dtype);
    ++n.langevin;
  }
  genflow::langevin_update_cpu_grouped(pg, dtype);
  ++n.langevin_grouped;
  int64_t where = 0;
  if (numel > 0 && !same_bits(static_cast<T*>(pa.update.out), static_cast<T*>(pg.update.out),
                              numel, &where))
    fail("langevin_update_cpu vs langevin_update_cpu_grouped, dtype " +
             std::string(dtype_name(dtype)) + " B=" + std::to_string(B) + " P=" +
             std::to_string(P) + " batch_mean=" + std::to_string(base.batch_mean) + " element " +
             std::to_string(where) +
             values_at(static_cast<T*>(pa.update.out), static_cast<T*>(pg.update.out), where),
         it);
}

// ---- Hutchinson probes and probe_dot ----

template <typename T>
void probes_case(Rng& r, Dtype dtype, int64_t it, Counts& n) {
  int64_t B, P;
  draw_shape(r, &B, &P);
  const int64_t numel = B * P;
  genflow::ProbeParams base{};
  base.numel = numel;
  base.batch = B;
  base.per_sample = P;
  base.kind = static_cast<int32_t>(r.uniform(0, 1));
  base.offset = static_cast<uint64_t>(r.uniform(0, 1000));
  // seeds as csrc/ops/hutchinson.cpp passes them: [1] -> seed_value, [B] with B != 1 -> seeds
  std::vector<int64_t> seeds;
  base.seed_value = r.gen();
  if (B != 1 && r.coin()) {
    base.seed_per_sample = true;
    seeds = random_seeds(r, B);
    base.seeds = B > 0 ? seeds.data() : nullptr;
  }
  Buf<T> out(numel, r.coin(0.25) ? 1 : 0), out_g(numel, r.coin(0.25) ? 1 : 0);
  genflow::ProbeParams pg = base;
  pg.out = out_g.ptr;
  genflow::hutchinson_probes_cpu_grouped(pg, dtype);  // the test hook is called for any numel
  ++n.probes_grouped;
  if (numel == 0) return;  // the op skips empty calls
  genflow::ProbeParams pa = base;
  pa.out = out.ptr;
  genflow::hutchinson_probes_cpu(pa, dtype);
  ++n.probes;
  int64_t where = 0;
  if (!same_bits(out.ptr, out_g.ptr, numel, &where))
    fail("hutchinson_probes_cpu vs _grouped, dtype " + std::string(dtype_name(dtype)) + " B=" +
             std::to_string(B) + " P=" + std::to_string(P) + " element " + std::to_string(where) +
             values_at(out.ptr, out_g.ptr, where),
         it);
}

template <typename T>
void probe_dot_case(Rng& r, Dtype dtype, int64_t it, Counts& n) {
  int64_t B, P;
  draw_shape(r, &B, &P);
  const double sp = r.coin(0.3) ? 0.02 : 0.0;
  Buf<T> probe = random_buf<T>(r, B * P, sp), v = random_buf<T>(r, B * P, sp);
  genflow::ProbeDotParams base{};
  base.probe = probe.ptr;
  base.v = v.ptr;
  base.batch = B;
  base.per_sample = P;
  base.blocks = genflow::probe_dot_blocks(P);
  // scale as csrc/ops/hutchinson.cpp passes it: [1] -> scale_value, [B] with B != 1 -> scale
  std::vector<double> scale;
  base.scale_value = r.coin(sp) ? special_value(r) : r.real(-2.0, 2.0);
  if (B > 1 && r.coin()) {
    base.scale_per_sample = true;
    scale = random_doubles(r, B, -2.0, 2.0, sp);
    base.scale = scale.data();
  }
  std::vector<double> accumulate;
  if (r.coin()) {
    accumulate = random_doubles(r, B, -10.0, 10.0, sp);
    base.accumulate = B > 0 ? accumulate.data() : nullptr;
  }
  const size_t partial_size = static_cast<size_t>(std::max<int64_t>(B * base.blocks, 1));
  std::vector<double> partial(partial_size), partial_g(partial_size);
  std::vector<double> out(static_cast<size_t>(B)), out_g(static_cast<size_t>(B));
  genflow::ProbeDotParams pg = base;
  pg.partial = partial_g.data();
  pg.out = out_g.data();
  genflow::probe_dot_cpu_grouped(pg, dtype);  // the test hook is called for any batch
  ++n.dot_grouped;
  if (B == 0) return;  // the op returns before the kernel
  genflow::ProbeDotParams pa = base;
  pa.partial = partial.data();
  pa.out = out.data();
  genflow::probe_dot_cpu(pa, dtype);
  ++n.dot;
  int64_t where = 0;
  if (!same_bits(out.data(), out_g.data(), B, &where))
    fail("probe_dot_cpu vs probe_dot_cpu_grouped, dtype " + std::string(dtype_name(dtype)) +
             " B=" + std::to_string(B) + " P=" + std::to_string(P) + " sample " +
             std::to_string(where) + values_at(out.data(), out_g.data(), where),
         it);
}

// ---- kernel weighted mean ----

template <typename T>
void kernel_mean_case(Rng& r, Dtype dtype, int64_t it, Counts& n) {
  const int64_t qn = r.pick<int64_t>({0, 1, 2, 3, 7, 15, 16, 17, 33, 50, 127, 300});
  const int64_t m = r.pick<int64_t>({1, 2, 3, 5, 17, 64, 255, 256, 257, 300, 509});
  // d = 0 and dv = 0 are valid (empty feature dimensions; the op passes them on)
  const int64_t d = r.pick<int64_t>({0, 1, 2, 3, 4, 5, 17, 64, 127, 130});
  const bool values_are_keys = r.coin(0.3);
  const int64_t dv = values_are_keys ? d : r.pick<int64_t>({0, 1, 2, 3, 4, 5, 17, 64, 127, 130});
  const bool tame = r.coin(0.6);  // finite inputs: the outputs must be finite
  const double sp = tame ? 0.0 : 0.02;
  const double sigma = r.pick<double>({0.05, 0.3, 1.0, 3.0, 50.0}) * std::sqrt(double(std::max<int64_t>(d, 1)));
  Buf<T> q = random_buf<T>(r, qn * d, sp), k = random_buf<T>(r, m * d, sp);
  Buf<T> v = values_are_keys ? Buf<T>() : random_buf<T>(r, m * dv, sp);
  Buf<T> lw;
  const bool with_lw = r.coin();
  if (with_lw) {
    lw = random_buf<T>(r, m, sp);
    if (!tame && r.coin(0.3)) lw.ptr[r.uniform(0, m - 1)] = -std::numeric_limits<T>::infinity();
  }
  Buf<T> out(qn * dv, r.coin(0.25) ? 1 : 0), lse(qn, r.coin(0.25) ? 1 : 0);
  const void* values = values_are_keys ? static_cast<const void*>(k.ptr) : v.ptr;
  const double scale = 1.0 / (2.0 * sigma * sigma);
  if (qn > 0) {  // the op returns before the kernel when N = 0
    genflow::KernelMeanParams p{};
    p.queries = q.ptr;
    p.keys = k.ptr;
    p.values = values;
    p.log_weights = with_lw ? lw.ptr : nullptr;
    p.out = out.ptr;
    p.lse = lse.ptr;
    p.n = qn;
    p.m = m;
    p.d = d;
    p.dv = dv;
    p.scale = scale;
    p.precision = static_cast<int32_t>(r.uniform(0, 2));  // tf32 / bf16 are CUDA-only hints
    genflow::kernel_weighted_mean_cpu(p, dtype);
    ++n.kmean;
    if (tame && !(all_finite(out.ptr, qn * dv) && all_finite(lse.ptr, qn)))
      fail("kernel_weighted_mean_cpu: non-finite output for finite inputs, dtype " +
               std::string(dtype_name(dtype)) + " n=" + std::to_string(qn) + " m=" +
               std::to_string(m) + " d=" + std::to_string(d) + " dv=" + std::to_string(dv),
           it);
  }
  // backward: each non-empty subset of the gradients (the op skips the empty one)
  const int mask = static_cast<int>(r.uniform(1, 7));
  Buf<T> grad_out = random_buf<T>(r, qn * dv, sp);
  Buf<T> dq, dk, dval;
  if (mask & 1) dq = Buf<T>(qn * d, r.coin(0.25) ? 1 : 0);
  if (mask & 2) dk = Buf<T>(m * d, r.coin(0.25) ? 1 : 0);
  if (mask & 4) dval = Buf<T>(m * dv, r.coin(0.25) ? 1 : 0);
  genflow::KernelMeanBackwardParams b{};
  b.queries = q.ptr;
  b.keys = k.ptr;
  b.values = values;
  b.log_weights = with_lw ? lw.ptr : nullptr;
  b.out = out.ptr;
  b.lse = lse.ptr;
  b.grad_out = grad_out.ptr;
  b.grad_queries = (mask & 1) ? dq.ptr : nullptr;
  b.grad_keys = (mask & 2) ? dk.ptr : nullptr;
  b.grad_values = (mask & 4) ? dval.ptr : nullptr;
  b.n = qn;
  b.m = m;
  b.d = d;
  b.dv = dv;
  b.scale = scale;
  genflow::kernel_weighted_mean_backward_cpu(b, dtype);
  ++n.kmean_backward;
  const std::string shape = std::string(dtype_name(dtype)) + " n=" + std::to_string(qn) +
                            " m=" + std::to_string(m) + " d=" + std::to_string(d) +
                            " dv=" + std::to_string(dv) + " mask=" + std::to_string(mask);
  if (tame && !(all_finite(dq.ptr, (mask & 1) ? qn * d : 0) &&
                all_finite(dk.ptr, (mask & 2) ? m * d : 0) &&
                all_finite(dval.ptr, (mask & 4) ? m * dv : 0)))
    fail("kernel_weighted_mean_backward_cpu: non-finite gradient for finite inputs, " + shape, it);
  if (qn == 0) {
    for (int64_t i = 0; (mask & 2) && i < m * d; ++i)
      if (dk.ptr[i] != T(0)) fail("kernel_weighted_mean_backward_cpu: N = 0 but dk != 0, " + shape, it);
    for (int64_t i = 0; (mask & 4) && i < m * dv; ++i)
      if (dval.ptr[i] != T(0)) fail("kernel_weighted_mean_backward_cpu: N = 0 but dv != 0, " + shape, it);
  }
}

// ---- dispatch ----

template <typename T> void one_iteration(int family, Rng& r, Dtype dtype, int64_t it, Counts& n) {
  switch (family) {
    case 0: fused_case<T>(r, dtype, it, n); break;
    case 1: langevin_case<T>(r, dtype, it, n); break;
    case 2: probes_case<T>(r, dtype, it, n); break;
    default: probe_dot_case<T>(r, dtype, it, n); break;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string preset = argc > 1 ? argv[1] : "quick";
  int64_t iterations = 0;
  if (preset == "quick") iterations = 2000;
  else if (preset == "long") iterations = 20000;
  else iterations = std::atoll(preset.c_str());
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20261123u;
  if (iterations <= 0) {
    std::fprintf(stderr, "usage: %s [quick | long | ITERATIONS] [SEED]\n", argv[0]);
    return 2;
  }
  Rng r{std::mt19937_64(seed)};
  Counts n;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it) {
    const int family = static_cast<int>(it % 5);  // fused, langevin, probes, probe_dot, kernel mean
    if (family == 4) {
      if (r.coin()) kernel_mean_case<float>(r, Dtype::Float32, it, n);
      else kernel_mean_case<double>(r, Dtype::Float64, it, n);
      continue;
    }
    switch (r.uniform(0, 3)) {
      case 0: one_iteration<float>(family, r, Dtype::Float32, it, n); break;
      case 1: one_iteration<double>(family, r, Dtype::Float64, it, n); break;
      case 2: one_iteration<c10::BFloat16>(family, r, Dtype::BFloat16, it, n); break;
      default: one_iteration<c10::Half>(family, r, Dtype::Float16, it, n); break;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "sanitize_kernels %s (seed %llu, %lld iterations): fused_update %lld + grouped %lld, "
      "langevin %lld + grouped %lld, probes %lld + grouped %lld, probe_dot %lld + grouped %lld, "
      "kernel_mean %lld + backward %lld; %lld calls in %.1f s, no mismatches\n",
      preset.c_str(), static_cast<unsigned long long>(seed), static_cast<long long>(iterations),
      static_cast<long long>(n.fused), static_cast<long long>(n.fused_grouped),
      static_cast<long long>(n.langevin), static_cast<long long>(n.langevin_grouped),
      static_cast<long long>(n.probes), static_cast<long long>(n.probes_grouped),
      static_cast<long long>(n.dot), static_cast<long long>(n.dot_grouped),
      static_cast<long long>(n.kmean), static_cast<long long>(n.kmean_backward),
      static_cast<long long>(n.total()), seconds);
  return 0;
}
