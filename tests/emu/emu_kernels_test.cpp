// Every CUDA kernel of csrc/cuda/ executed on the CPU by the emulation (csrc/emu) and compared
// with its CPU twin in csrc/cpu/: bitwise (NaN matches NaN) for the fused update, the Langevin
// step, the Hutchinson probes and probe_dot, whose CPU kernels promise the CUDA kernels' bits;
// within a stated tolerance for the kernel weighted mean and its backward pass (different
// summation orders). Built under ASan+UBSan and under TSan (CMake option GENFLOW_EMU).
//
//   emu_kernels_test [quick | long] [SEED]
//
// Cases are drawn from std::mt19937_64(SEED): every dtype an op supports, odd sizes and block
// boundaries, arrays shifted by one element (the unaligned, non-vector paths) inside exactly
// sized allocations (a read or write one past an array trips ASan), in-place updates,
// per-sample coefficients, scales and seeds, NaN/Inf/subnormal inputs, 1 to 3 emulated SMs
// (grid-stride loops with several iterations per thread). The kernels take contiguous arrays only
// (csrc/ops/ makes strided inputs contiguous), so there are no strided cases; 64-bit indexing is
// tested by huge_index_cases (emu_special_cases.cpp).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/fused_update.h"
#include "common/hutchinson.h"
#include "common/kernel_mean.h"
#include "common/langevin.h"
#include "emu_launchers.h"
#include "emu_test_util.h"

namespace {

using genflow::Dtype;
using namespace emu_test;

const Dtype kStateDtypes[] = {Dtype::Float32, Dtype::Float64, Dtype::BFloat16, Dtype::Float16};
const int64_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 13, 63, 64, 255, 256, 1023, 1025, 4099};

// ---- fused update ----

template <typename T>
void fused_case(Rng& r, Dtype dtype, Failures& fails, bool normal_only) {
  const int K = static_cast<int>(r.uniform(0, 4));
  const int mode = static_cast<int>(r.uniform(0, 2));
  const int64_t B = r.uniform(1, 4), P = r.pick(kSizes), n = B * P;
  const double special = normal_only ? 0.0 : r.pick<double>({0.0, 0.0, 0.02});
  Buf<T> x = random_buf<T>(r, n, special), noise = random_buf<T>(r, n, special);
  std::vector<Buf<T>> terms;
  for (int k = 0; k < K; ++k) terms.push_back(random_buf<T>(r, n, special));
  genflow::FusedUpdateParams p{};
  p.num_terms = K;
  p.noise_mode = mode;
  p.numel = n;
  p.batch = B;
  p.per_sample = P;
  std::vector<double> coef = random_doubles(r, (K + 2) * B, -2.0, 2.0, normal_only ? 0.0 : 0.02);
  const int coef_kind = static_cast<int>(r.uniform(0, 2));  // value | shared pointer | per sample
  p.coef = coef_kind == 0 ? nullptr : coef.data();
  p.coef_per_sample = coef_kind == 2;
  for (int k = 0; k < K + 2; ++k) p.coef_value[k] = coef[k];
  std::vector<int64_t> seeds = random_seeds(r, B);
  p.seed_per_sample = r.coin();
  p.seeds = p.seed_per_sample || r.coin() ? seeds.data() : nullptr;
  p.seed_value = r.gen();
  p.offset = r.coin() ? 0 : r.gen();
  p.noise = mode == genflow::kSuppliedNoise ? noise.ptr : nullptr;
  for (int k = 0; k < K; ++k) p.terms[k] = terms[k].ptr;
  const bool in_place = r.coin(0.3);
  int32_t flag_cpu = 1 << 30, flag_emu = 1 << 30;
  p.step = static_cast<int32_t>(r.uniform(0, 100));
  const bool check_flag = r.coin();
  // the CPU run: out may be x itself
  Buf<T> x_cpu = x, out_cpu(n, r.coin(0.3) ? 1 : 0);
  p.x = x_cpu.ptr;
  p.out = in_place ? x_cpu.ptr : out_cpu.ptr;
  p.nonfinite = check_flag ? &flag_cpu : nullptr;
  genflow::fused_update_cpu(p, dtype);
  Buf<T> x_emu = x, out_emu(n, out_cpu.shift);
  p.x = x_emu.ptr;
  p.out = in_place ? x_emu.ptr : out_emu.ptr;
  p.nonfinite = check_flag ? &flag_emu : nullptr;
  fails.check(emu_launchers::fused_update(&p, sizeof p, static_cast<int>(dtype)) == 0, "fused_update launch");
  const T* a = in_place ? x_cpu.ptr : out_cpu.ptr;
  const T* b = in_place ? x_emu.ptr : out_emu.ptr;
  char what[160];
  std::snprintf(what, sizeof what, "fused_update %s K=%d mode=%d B=%lld P=%lld coef=%d seed_per_sample=%d",
                dtype_name(dtype), K, mode, (long long)B, (long long)P, coef_kind, p.seed_per_sample);
  fails.bitwise(a, b, n, what);
  fails.check(flag_cpu == flag_emu, what, "nonfinite flag");
}

// ---- Langevin step ----

template <typename T>
void langevin_case(Rng& r, Dtype dtype, Failures& fails, bool normal_only) {
  const int mode = r.coin() ? genflow::kGeneratedNoise : genflow::kSuppliedNoise;
  const int64_t B = r.uniform(1, 3);
  const int64_t P = r.coin(0.3) ? r.pick<int64_t>({4096, 4097, 8191, 9001}) : r.pick(kSizes), n = B * P;
  const double special = normal_only ? 0.0 : r.pick<double>({0.0, 0.0, 0.01});
  Buf<T> x = random_buf<T>(r, n, special), mo = random_buf<T>(r, n, special), noise = random_buf<T>(r, n, special);
  std::vector<double> coef = random_doubles(r, 3 * B, 0.0, 2.0, 0.0);
  genflow::LangevinParams p{};
  genflow::FusedUpdateParams& u = p.update;
  u.num_terms = 1;
  u.noise_mode = mode;
  u.numel = n;
  u.batch = B;
  u.per_sample = P;
  u.coef_per_sample = true;
  std::vector<int64_t> seeds = random_seeds(r, B);
  u.seed_per_sample = r.coin();
  u.seeds = u.seed_per_sample || r.coin() ? seeds.data() : nullptr;
  u.seed_value = r.gen();
  u.offset = r.gen();
  const int coef_kind = static_cast<int>(r.uniform(0, 2));
  p.coef = coef_kind == 0 ? nullptr : coef.data();
  p.coef_per_sample = coef_kind == 2;
  for (int k = 0; k < 3; ++k) p.coef_value[k] = coef[k];
  p.batch_mean = r.coin();
  p.chunks = genflow::langevin_chunks(P);
  const bool in_place = r.coin(0.3);
  auto run = [&](Buf<T>& xs, Buf<T>& out, std::vector<double>& scratch, bool emulated) {
    const int64_t parts = 2 * B * p.chunks;
    scratch.assign(static_cast<size_t>(parts + 2 * B + 3 * B), -1.0);
    p.partial = scratch.data();
    p.norms = p.partial + parts;
    p.step = p.norms + 2 * B;
    u.coef = p.step;
    u.x = xs.ptr;
    u.terms[0] = mo.ptr;
    u.noise = mode == genflow::kSuppliedNoise ? noise.ptr : nullptr;
    u.out = in_place ? xs.ptr : out.ptr;
    if (emulated)
      fails.check(emu_launchers::langevin_update(&p, sizeof p, static_cast<int>(dtype)) == 0, "langevin launch");
    else
      genflow::langevin_update_cpu(p, dtype);
  };
  Buf<T> x_cpu = x, x_emu = x, out_cpu(n, 0), out_emu(n, 0);
  std::vector<double> s_cpu, s_emu;
  run(x_cpu, out_cpu, s_cpu, false);
  run(x_emu, out_emu, s_emu, true);
  char what[160];
  std::snprintf(what, sizeof what, "langevin %s mode=%d B=%lld P=%lld coef=%d batch_mean=%d", dtype_name(dtype),
                mode, (long long)B, (long long)P, coef_kind, p.batch_mean);
  fails.bitwise(in_place ? x_cpu.ptr : out_cpu.ptr, in_place ? x_emu.ptr : out_emu.ptr, n, what);
  const size_t tail = static_cast<size_t>(2 * B + 3 * B);  // norms and step coefficients
  fails.bitwise(s_cpu.data() + s_cpu.size() - tail, s_emu.data() + s_emu.size() - tail, static_cast<int64_t>(tail),
                what);
}

// ---- Hutchinson probes and probe_dot ----

template <typename T>
void probes_case(Rng& r, Dtype dtype, Failures& fails) {
  const int64_t B = r.uniform(1, 4), P = r.pick(kSizes), n = B * P;
  genflow::ProbeParams p{};
  p.numel = n;
  p.batch = B;
  p.per_sample = P;
  p.kind = r.coin() ? genflow::kGaussian : genflow::kRademacher;
  std::vector<int64_t> seeds = random_seeds(r, B);
  p.seed_per_sample = r.coin();
  p.seeds = p.seed_per_sample || r.coin() ? seeds.data() : nullptr;
  p.seed_value = r.gen();
  p.offset = r.gen();
  Buf<T> out_cpu(n, r.coin() ? 1 : 0), out_emu(n, out_cpu.shift);
  p.out = out_cpu.ptr;
  genflow::hutchinson_probes_cpu(p, dtype);
  p.out = out_emu.ptr;
  fails.check(emu_launchers::hutchinson_probes(&p, sizeof p, static_cast<int>(dtype)) == 0, "probes launch");
  char what[128];
  std::snprintf(what, sizeof what, "probes %s kind=%d B=%lld P=%lld", dtype_name(dtype), p.kind, (long long)B,
                (long long)P);
  fails.bitwise(out_cpu.ptr, out_emu.ptr, n, what);
}

template <typename T>
void probe_dot_case(Rng& r, Dtype dtype, Failures& fails, bool normal_only) {
  const int64_t B = r.uniform(1, 4);
  // mostly several summation blocks of 1024 (all eight warp sums of a block in the tree)
  const int64_t P = r.coin(0.1) ? 0 : (r.coin(0.7) ? r.pick<int64_t>({1024, 1025, 2047, 3000, 5121}) : r.pick(kSizes));
  const double special = normal_only ? 0.0 : r.pick<double>({0.0, 0.0, 0.01});
  Buf<T> probe = random_buf<T>(r, B * P, special), v = random_buf<T>(r, B * P, special);
  genflow::ProbeDotParams p{};
  p.probe = probe.ptr;
  p.v = v.ptr;
  p.batch = B;
  p.per_sample = P;
  p.blocks = genflow::probe_dot_blocks(P);
  std::vector<double> scale = random_doubles(r, B, -3.0, 3.0, 0.0), acc = random_doubles(r, B, -5.0, 5.0, 0.0);
  const int scale_kind = static_cast<int>(r.uniform(0, 2));
  p.scale = scale_kind == 0 ? nullptr : scale.data();
  p.scale_per_sample = scale_kind == 2;
  p.scale_value = scale[0];
  p.accumulate = r.coin() ? acc.data() : nullptr;
  std::vector<double> part_cpu(static_cast<size_t>(B * p.blocks + 1)), part_emu(part_cpu.size());
  std::vector<double> out_cpu(static_cast<size_t>(B), -7.0), out_emu(out_cpu);
  p.partial = part_cpu.data();
  p.out = out_cpu.data();
  genflow::probe_dot_cpu(p, dtype);
  p.partial = part_emu.data();
  p.out = out_emu.data();
  fails.check(emu_launchers::probe_dot(&p, sizeof p, static_cast<int>(dtype)) == 0, "probe_dot launch");
  char what[128];
  std::snprintf(what, sizeof what, "probe_dot %s B=%lld P=%lld scale=%d", dtype_name(dtype), (long long)B,
                (long long)P, scale_kind);
  fails.bitwise(out_cpu.data(), out_emu.data(), B, what);
}

// ---- kernel weighted mean, forward and backward ----

// Max |a - b| <= tol * (1 + max |a|) over finite entries, and the same NaN/Inf pattern.
template <typename A>
void close(Failures& fails, const A* a, const A* b, int64_t n, double tol, const char* what, const char* part) {
  double scale = 1.0, err = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(a[i])) scale = std::fmax(scale, std::fabs(static_cast<double>(a[i])));
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(a[i]) != std::isfinite(b[i])) {
      fails.fail(what, part, "finite/non-finite mismatch", i);
      return;
    }
    if (std::isfinite(a[i])) err = std::fmax(err, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  }
  if (err > tol * scale) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "max error %.3g > %.3g", err, tol * scale);
    fails.fail(what, part, msg, -1);
  }
}

template <typename A>
void kernel_mean_case(Rng& r, Dtype dtype, Failures& fails) {
  const bool small = r.coin();
  const int64_t d = small ? r.pick<int64_t>({1, 2, 3, 4, 8}) : r.pick<int64_t>({0, 5, 33, 40, 70});
  const int64_t dv = small ? d : r.pick<int64_t>({0, 1, 7, 65, 70});
  const int64_t n = r.pick<int64_t>({1, 5, 31, 33, 97, 300}), m = r.pick<int64_t>({1, 2, 33, 64, 257});
  const int32_t precision = std::is_same_v<A, float> && d >= 32 && r.coin() ? static_cast<int32_t>(r.uniform(1, 2)) : 0;
  const int cc = r.coin(0.25) ? 7 : 9;  // 7: no tensor cores, the exact path whatever the precision
  emu_launchers::set_compute_capability(cc);
  Buf<A> q = random_buf<A>(r, n * d, 0.0), k = random_buf<A>(r, m * d, 0.0), v = random_buf<A>(r, m * dv, 0.0);
  Buf<A> lw = random_buf<A>(r, m, 0.0), g = random_buf<A>(r, n * dv, 0.0);
  const bool weights = r.coin();
  genflow::KernelMeanParams p{q.ptr, k.ptr, v.ptr, weights ? lw.ptr : nullptr, nullptr, nullptr, n, m, d, dv,
                              1.0 / (2.0 * r.pick<double>({0.5, 1.0, 3.0}) * (d + 1)), precision};
  Buf<A> out_cpu(n * dv, 0), out_emu(n * dv, 0), lse_cpu(n, 0), lse_emu(n, 0);
  p.out = out_cpu.ptr;
  p.lse = lse_cpu.ptr;
  genflow::kernel_weighted_mean_cpu(p, dtype);
  p.out = out_emu.ptr;
  p.lse = lse_emu.ptr;
  fails.check(emu_launchers::kernel_weighted_mean(&p, sizeof p, static_cast<int>(dtype)) == 0, "kernel_mean launch");
  const bool tensor_cores = precision != 0 && cc >= 8;
  const double fast = emu_launchers::fast_math_model() && std::is_same_v<A, float> ? 4.0 : 1.0;
  const double tol = tensor_cores ? (precision == 1 ? 2e-2 : 6e-2) : (std::is_same_v<A, float> ? 2e-5 * fast : 1e-12);
  char what[160];
  std::snprintf(what, sizeof what, "kernel_mean %s n=%lld m=%lld d=%lld dv=%lld precision=%d cc=%d weights=%d",
                dtype_name(dtype), (long long)n, (long long)m, (long long)d, (long long)dv, precision, cc, weights);
  close(fails, out_cpu.ptr, out_emu.ptr, n * dv, tol, what, "out");
  close(fails, lse_cpu.ptr, lse_emu.ptr, n, tol, what, "lse");
  // backward from the CPU forward's out and lse (both runs see the same saved tensors)
  genflow::KernelMeanBackwardParams b{q.ptr, k.ptr, v.ptr, p.log_weights, out_cpu.ptr, lse_cpu.ptr, g.ptr,
                                      nullptr, nullptr, nullptr, n, m, d, dv, p.scale};
  const bool want_q = r.coin(0.8), want_k = r.coin(0.8), want_v = r.coin(0.8);
  Buf<A> gq[2] = {Buf<A>(n * d, 0), Buf<A>(n * d, 0)}, gk[2] = {Buf<A>(m * d, 0), Buf<A>(m * d, 0)};
  Buf<A> gv[2] = {Buf<A>(m * dv, 0), Buf<A>(m * dv, 0)};
  for (int run = 0; run < 2; ++run) {
    b.grad_queries = want_q ? gq[run].ptr : nullptr;
    b.grad_keys = want_k ? gk[run].ptr : nullptr;
    b.grad_values = want_v ? gv[run].ptr : nullptr;
    if (run == 0)
      genflow::kernel_weighted_mean_backward_cpu(b, dtype);
    else
      fails.check(emu_launchers::kernel_weighted_mean_backward(&b, sizeof b, static_cast<int>(dtype)) == 0,
                  "kernel_mean backward launch");
  }
  const double btol = std::is_same_v<A, float> ? 1e-4 * fast : 1e-11;
  if (want_q) close(fails, gq[0].ptr, gq[1].ptr, n * d, btol, what, "grad_queries");
  if (want_k) close(fails, gk[0].ptr, gk[1].ptr, m * d, btol, what, "grad_keys");
  if (want_v) close(fails, gv[0].ptr, gv[1].ptr, m * dv, btol, what, "grad_values");
  emu_launchers::set_compute_capability(9);
}

template <template <typename> class Case, typename... Extra>
void for_state_dtype(Dtype dtype, Rng& r, Failures& fails, Extra... extra) {
  switch (dtype) {
    case Dtype::Float32: Case<float>::run(r, dtype, fails, extra...); break;
    case Dtype::Float64: Case<double>::run(r, dtype, fails, extra...); break;
    case Dtype::BFloat16: Case<c10::BFloat16>::run(r, dtype, fails, extra...); break;
    case Dtype::Float16: Case<c10::Half>::run(r, dtype, fails, extra...); break;
  }
}
template <typename T> struct Fused { static void run(Rng& r, Dtype d, Failures& f, bool n) { fused_case<T>(r, d, f, n); } };
template <typename T> struct Langevin { static void run(Rng& r, Dtype d, Failures& f, bool n) { langevin_case<T>(r, d, f, n); } };
template <typename T> struct Probes { static void run(Rng& r, Dtype d, Failures& f, bool) { probes_case<T>(r, d, f); } };
template <typename T> struct ProbeDot { static void run(Rng& r, Dtype d, Failures& f, bool n) { probe_dot_case<T>(r, d, f, n); } };

}  // namespace

int main(int argc, char** argv) {
  const std::string preset = argc > 1 ? argv[1] : "quick";
  if (preset != "quick" && preset != "long") {
    std::fprintf(stderr, "usage: emu_kernels_test [quick | long] [SEED]\n");
    return 2;
  }
  const int rounds = preset == "quick" ? 6 : 60;
  Rng r{std::mt19937_64(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20261207u)};
  Failures fails;
  // Under the fast-math model only normal-range inputs are expected to match bitwise (subnormal
  // float32 values flush to zero there: subnormal_cases shows it).
  const bool normal_only = emu_launchers::fast_math_model();
  int cases = 0;
  for (int round = 0; round < rounds; ++round) {
    for (Dtype dtype : kStateDtypes) {
      emu_launchers::set_sm_count(static_cast<int>(r.uniform(1, 3)));
      for (int i = 0; i < 4; ++i) for_state_dtype<Fused>(dtype, r, fails, normal_only);
      for_state_dtype<Langevin>(dtype, r, fails, normal_only);
      for (int i = 0; i < 2; ++i) for_state_dtype<Probes>(dtype, r, fails, normal_only);
      for (int i = 0; i < 2; ++i) for_state_dtype<ProbeDot>(dtype, r, fails, normal_only);
      cases += 9;
    }
    for (int i = 0; i < 3; ++i) {
      kernel_mean_case<float>(r, Dtype::Float32, fails);
      kernel_mean_case<double>(r, Dtype::Float64, fails);
      cases += 2;
    }
  }
  cases += huge_index_cases(fails);
  cases += subnormal_cases(fails);
  std::printf("emu_kernels_test %s: %d cases, %llu blocks emulated, %d failures%s\n", preset.c_str(), cases,
              static_cast<unsigned long long>(emu_launchers::blocks_run()), fails.count,
              emu_launchers::fast_math_model() ? " (fast-math model)" : "");
  return fails.count == 0 ? 0 : 1;
}
