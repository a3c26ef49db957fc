// Two targeted checks of the emulated CUDA kernels (tests/emu/emu_kernels_test.cpp):
//
// huge_index_cases: 64-bit indexing. Arrays of 2^34 + 6 elements (64 GiB each) are mapped with
// MAP_NORESERVE, so only touched pages cost memory; the emulated device reports 2^20 + 1 SMs so
// the launchers' grids hold one block per 256 groups (2^24 + 1 blocks, gridDim.x > 2^24), and the
// emulation runs only the blocks around element 2^31, 2^32, the per-sample boundary and the end
// (set_block_filter). Those elements are compared with the host Philox stream and the fused
// update's arithmetic written out here (the CPU kernels cannot run 2^34 elements on CI): element
// indices past 2^31 and Philox counters past 2^32 (the counter's high word) are exercised.
//
// subnormal_cases: float32 and bfloat16 states with subnormal values. The exact build must match
// the CPU kernel bitwise; the fast-math model (nvcc --use_fast_math, -ftz=true) flushes them to
// zero, which this case demonstrates (docs/design/cuda_emulation.md: why setup.py dropped it).
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <set>

#include "common/fused_update.h"
#include "common/hutchinson.h"
#include "common/philox.h"
#include "emu_launchers.h"
#include "emu_test_util.h"

namespace emu_test {
namespace {

constexpr int64_t kHuge = (int64_t{1} << 34) + 6;
constexpr int kThreads = 256;  // threads per block of the fused-update and probe launchers

template <typename T> T* huge_map(int64_t n) {
  void* m = mmap(nullptr, static_cast<size_t>(n) * sizeof(T), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return m == MAP_FAILED ? nullptr : static_cast<T*>(m);
}
template <typename T> void huge_unmap(T* p, int64_t n) { munmap(p, static_cast<size_t>(n) * sizeof(T)); }

bool keep_block(uint64_t b, void* ctx) { return static_cast<std::set<uint64_t>*>(ctx)->count(b) != 0; }

// The blocks that hold elements i (one group of 4 per thread, 256 threads per block).
std::set<uint64_t> blocks_of(const std::vector<int64_t>& groups) {
  std::set<uint64_t> s;
  for (int64_t g : groups) s.insert(static_cast<uint64_t>(g / kThreads));
  return s;
}

float input_value(int64_t i) { return static_cast<float>(i % 1999) * 0.001f - 1.0f; }

// out = c0 x + c1 t + s z over the huge arrays, one seed (per_sample = numel) or two per-sample
// seeds; checks every element of the blocks that ran.
void huge_fused(Failures& fails, bool per_sample_seeds) {
  float* x = huge_map<float>(kHuge);
  float* t = huge_map<float>(kHuge);
  float* out = huge_map<float>(kHuge);
  if (x == nullptr || t == nullptr || out == nullptr) {
    fails.fail("huge_fused", "mmap", "cannot map 3 x 64 GiB with MAP_NORESERVE", -1);
    return;
  }
  genflow::FusedUpdateParams p{};
  p.x = x;
  p.terms[0] = t;
  p.out = out;
  p.num_terms = 1;
  p.noise_mode = genflow::kGeneratedNoise;
  p.numel = kHuge;
  p.batch = per_sample_seeds ? 2 : 1;
  p.per_sample = kHuge / p.batch;  // 2^33 + 3 per sample: partial last groups, scalar path
  const int64_t seeds[2] = {0x1234567890abcdefll, -77};
  p.seeds = seeds;
  p.seed_per_sample = per_sample_seeds;
  p.offset = 0x0000000500000003ull;
  p.coef_value[0] = 0.75;
  p.coef_value[1] = -1.25;
  p.coef_value[2] = 0.5;
  const int64_t gps = (p.per_sample + 3) / 4;  // groups per sample
  const int64_t groups = genflow::group_count(p);
  const std::vector<int64_t> wanted = {0, (int64_t{1} << 29) - 1, int64_t{1} << 29, int64_t{1} << 30,
                                       gps - 1, gps, groups - 1};
  std::set<uint64_t> blocks = blocks_of(wanted);
  // the elements of those blocks, and the inputs there
  std::vector<std::pair<int64_t, int64_t>> ranges;  // element ranges [first, last)
  for (uint64_t b : blocks) {
    const int64_t g0 = static_cast<int64_t>(b) * kThreads, g1 = std::min(groups, g0 + kThreads);
    auto first_of = [&](int64_t g) {
      return per_sample_seeds ? (g / gps) * p.per_sample + 4 * (g % gps) : 4 * g;
    };
    const int64_t e0 = first_of(g0), e1 = std::min(kHuge, g1 == groups ? kHuge : first_of(g1));
    ranges.emplace_back(e0, e1);
    for (int64_t i = e0; i < e1; ++i) {
      x[i] = input_value(i);
      t[i] = input_value(i + 7);
    }
  }
  emu_launchers::set_sm_count((1 << 20) + 1);
  emu_launchers::set_block_filter(keep_block, &blocks);
  const uint64_t before = emu_launchers::blocks_run();
  fails.check(emu_launchers::fused_update(&p, sizeof p, 0) == 0, "huge_fused", "launch");
  emu_launchers::set_block_filter(nullptr, nullptr);
  emu_launchers::set_sm_count(2);
  fails.check(emu_launchers::blocks_run() - before == blocks.size(), "huge_fused", "blocks run");
  const float c0 = 0.75f, c1 = -1.25f, s = 0.5f;
  for (const auto& [e0, e1] : ranges) {
    for (int64_t i = e0; i < e1; ++i) {
      const int64_t b = per_sample_seeds ? i / p.per_sample : 0;
      const uint64_t n = static_cast<uint64_t>(i - b * (per_sample_seeds ? p.per_sample : 0));
      const float z = genflow::philox::normal_at(static_cast<uint64_t>(seeds[b]), p.offset, n);
      const float want = __builtin_fmaf(s, z, __builtin_fmaf(c1, t[i], c0 * x[i]));
      if (std::memcmp(&want, &out[i], sizeof want) != 0) {
        fails.fail(per_sample_seeds ? "huge_fused per-sample seeds" : "huge_fused", "element", "mismatch", i);
        break;
      }
    }
  }
  huge_unmap(x, kHuge);
  huge_unmap(t, kHuge);
  huge_unmap(out, kHuge);
}

// Gaussian probes in float16 over the huge array (one seed).
void huge_probes(Failures& fails) {
  c10::Half* out = huge_map<c10::Half>(kHuge);
  if (out == nullptr) {
    fails.fail("huge_probes", "mmap", "cannot map 32 GiB with MAP_NORESERVE", -1);
    return;
  }
  genflow::ProbeParams p{};
  p.out = out;
  p.numel = kHuge;
  p.batch = 1;
  p.per_sample = kHuge;
  p.kind = genflow::kGaussian;
  p.seed_value = 99;
  p.offset = 1;
  const int64_t groups = genflow::probe_group_count(p);
  std::set<uint64_t> blocks = blocks_of({(int64_t{1} << 29) + 3, (int64_t{1} << 32) - 1, groups - 1});
  emu_launchers::set_sm_count((1 << 20) + 1);
  emu_launchers::set_block_filter(keep_block, &blocks);
  fails.check(emu_launchers::hutchinson_probes(&p, sizeof p, 3) == 0, "huge_probes", "launch");
  emu_launchers::set_block_filter(nullptr, nullptr);
  emu_launchers::set_sm_count(2);
  for (uint64_t b : blocks) {
    const int64_t e0 = static_cast<int64_t>(b) * kThreads * 4, e1 = std::min(kHuge, e0 + kThreads * 4);
    for (int64_t i = e0; i < e1; ++i) {
      const c10::Half want(genflow::philox::normal_at(99, 1, static_cast<uint64_t>(i)));
      if (want.x != out[i].x) {
        fails.fail("huge_probes", "element", "mismatch", i);
        break;
      }
    }
  }
  huge_unmap(out, kHuge);
}

// out = 1 * x (K = 0, no noise) of subnormal x: the CPU keeps them; -ftz=true would not.
template <typename T> void subnormal_state(Failures& fails, int dtype, const char* name) {
  const int64_t n = 64;
  std::vector<T> x(n), out_cpu(n), out_emu(n);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>((i % 2 ? -1.0f : 1.0f) * 1e-39f * static_cast<float>(i + 1) / 8);
  genflow::FusedUpdateParams p{};
  p.x = x.data();
  p.numel = n;
  p.batch = 1;
  p.per_sample = n;
  p.coef_value[0] = 1.0;
  p.out = out_cpu.data();
  genflow::fused_update_cpu(p, static_cast<genflow::Dtype>(dtype));
  p.out = out_emu.data();
  fails.check(emu_launchers::fused_update(&p, sizeof p, dtype) == 0, name, "launch");
  if (!emu_launchers::fast_math_model()) {
    fails.bitwise(out_cpu.data(), out_emu.data(), n, name);
    return;
  }
  int flushed = 0;
  for (int64_t i = 0; i < n; ++i) flushed += static_cast<float>(out_emu[i]) == 0.0f && static_cast<float>(out_cpu[i]) != 0.0f;
  if (flushed != n) fails.fail(name, "fast-math model", "expected every subnormal output flushed to zero", flushed);
}

}  // namespace

int huge_index_cases(Failures& fails) {
  huge_fused(fails, false);
  huge_fused(fails, true);
  huge_probes(fails);
  return 3;
}

int subnormal_cases(Failures& fails) {
  subnormal_state<float>(fails, 0, "subnormal float32 fused_update");
  subnormal_state<c10::BFloat16>(fails, 2, "subnormal bfloat16 fused_update");
  return 2;
}

}  // namespace emu_test
