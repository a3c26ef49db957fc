// The CUDA-execution emulation's runtime (csrc/emu/cuda_emu.h): launches, fibers, barriers, warp
// collectives, device attributes. Compiled without TSan instrumentation in the TSan build (its
// bookkeeping is shared by the fibers by design); the fibers' ordering is told to TSan with
// __tsan_release / __tsan_acquire at exactly the points where CUDA orders threads.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(GENFLOW_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(GENFLOW_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

// The static __shared__ variables of the emulated kernels (cuda_emu.h puts them in this section).
extern "C" __attribute__((weak)) char __start_genflow_emu_shared[];
extern "C" __attribute__((weak)) char __stop_genflow_emu_shared[];

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync

enum State { kReady, kAtBarrier, kAtWarp, kDone };
enum WarpOp { kOpShuffle = 0, kOpVote = 1, kOpSyncWarp = 2 };
const char* const kOpNames[] = {"__shfl*_sync / wmma", "__ballot/__any/__all_sync", "__syncwarp"};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  State state = kDone;
  uint64_t wait_gen = 0;
  void* fake_stack = nullptr;  // ASan
  void* tsan = nullptr;
};

struct Warp {
  unsigned arrived = 0, mask = 0, exited = 0;
  int op = -1;
  uint64_t gen = 0;
  uint64_t slot[2][32];
  int pred[2][32];
  char token[2];  // TSan sync addresses of __syncwarp, by generation parity
};

struct Emulator {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  unsigned threads = 0, live = 0, arrived = 0;
  uint64_t barrier_gen = 0;
  const void* barrier_site = nullptr;
  char barrier_token[2];  // TSan sync addresses of __syncthreads, by generation parity
  char start_token;       // host -> the block's threads (launch arguments, previous blocks)
  char done_token;        // the block's threads -> host (never back to a thread of the block)
  ucontext_t main_ctx;
  void* main_fake_stack = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* main_tsan = nullptr;
  uint3 block{0, 0, 0};
  dim3 grid, block_dim;
  char* dynamic_shared = nullptr;
  size_t dynamic_bytes = 0;
  void (*entry)(void*) = nullptr;
  void* entry_ctx = nullptr;
  int sm_count = 2, cc_major = 9;
  bool (*keep)(uint64_t, void*) = nullptr;
  void* keep_ctx = nullptr;
  uint64_t blocks_run = 0;
};

Emulator g;
thread_local cudaError_t last_error = cudaSuccess;

[[noreturn]] void fail(const char* fmt, ...) {
  std::fprintf(stderr, "genflow CUDA emulation: ");
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  if (g.current != nullptr)
    std::fprintf(stderr, " [block (%u,%u,%u), thread (%u,%u,%u)]", g.block.x, g.block.y, g.block.z,
                 g.current->tid.x, g.current->tid.y, g.current->tid.z);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(86);  // an exit status, not a signal: ctest matches the message (PASS_REGULAR_EXPRESSION)
}

void tsan_release(void* addr) {
#if defined(GENFLOW_EMU_TSAN)
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
void tsan_acquire(void* addr) {
#if defined(GENFLOW_EMU_TSAN)
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

// Fills the static __shared__ variables with 0xff bytes (NaN / -1), as if left by another block.
// Byte stores through a volatile pointer: no memset, whose ASan interceptor would see redzones.
__attribute__((no_sanitize_address)) void poison_shared() {
  volatile char* p = __start_genflow_emu_shared;
  for (; p != nullptr && p < __stop_genflow_emu_shared; ++p) *p = static_cast<char>(0xff);
  for (size_t i = 0; i < g.dynamic_bytes; ++i) g.dynamic_shared[i] = static_cast<char>(0xff);
}

void switch_out(Fiber* f, bool exiting) {
#if defined(GENFLOW_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, g.main_bottom, g.main_size);
#endif
#if defined(GENFLOW_EMU_TSAN)
  __tsan_switch_to_fiber(g.main_tsan, kNoSync);
#endif
  (void)exiting;
  swapcontext(&f->ctx, &g.main_ctx);
#if defined(GENFLOW_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f->fake_stack, &g.main_bottom, &g.main_size);
#endif
}

void switch_in(Fiber* f) {
  g.current = f;
#if defined(GENFLOW_EMU_ASAN)
  __sanitizer_start_switch_fiber(&g.main_fake_stack, f->stack, kStackBytes);
#endif
#if defined(GENFLOW_EMU_TSAN)
  __tsan_switch_to_fiber(f->tsan, kNoSync);
#endif
  swapcontext(&g.main_ctx, &f->ctx);
#if defined(GENFLOW_EMU_ASAN)
  __sanitizer_finish_switch_fiber(g.main_fake_stack, nullptr, nullptr);
#endif
  g.current = nullptr;
}

void complete_barrier_if_all_arrived() {
  if (g.arrived > 0 && g.arrived == g.live) {
    ++g.barrier_gen;
    g.arrived = 0;
  }
}

void fiber_exit(Fiber* f) {
  Warp& w = g.warps[f->linear / 32];
  const unsigned bit = 1u << (f->linear % 32);
  if (w.arrived != 0 && (w.mask & bit) != 0)
    fail("thread exited while its warp waits for it in %s (mask 0x%08x)", kOpNames[w.op], w.mask);
  w.exited |= bit;
  f->state = kDone;
  --g.live;
  complete_barrier_if_all_arrived();
}

void fiber_main() {
  Fiber* f = g.current;
#if defined(GENFLOW_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g.main_bottom, &g.main_size);
#endif
  tsan_acquire(&g.start_token);
  g.entry(g.entry_ctx);
  tsan_release(&g.done_token);
  fiber_exit(f);
  switch_out(f, true);
  fail("a finished thread was resumed");
}

bool runnable(const Fiber& f) {
  switch (f.state) {
    case kReady: return true;
    case kAtBarrier: return g.barrier_gen != f.wait_gen;
    case kAtWarp: return g.warps[f.linear / 32].gen != f.wait_gen;
    default: return false;
  }
}

[[noreturn]] void deadlock() {
  unsigned at_barrier = 0, at_warp = 0;
  for (unsigned i = 0; i < g.threads; ++i) {
    at_barrier += g.fibers[i].state == kAtBarrier;
    at_warp += g.fibers[i].state == kAtWarp;
  }
  fail("deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u in warp collectives, "
       "%u exited (a barrier or collective that not every thread reaches)",
       g.block.x, g.block.y, g.block.z, at_barrier, at_warp, g.threads - g.live);
}

void run_block() {
  for (unsigned i = 0; i < g.threads; ++i) {
    Fiber& f = g.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = kReady;
    f.fake_stack = nullptr;
  }
  for (Warp& w : g.warps) {
    w.arrived = w.exited = 0;
    w.op = -1;
  }
  g.live = g.threads;
  g.arrived = 0;
  poison_shared();
  tsan_release(&g.start_token);
  while (g.live > 0) {
    bool ran = false;
    for (unsigned i = 0; i < g.threads; ++i) {
      if (!runnable(g.fibers[i])) continue;
      switch_in(&g.fibers[i]);
      ran = true;
    }
    if (!ran) deadlock();
  }
  tsan_acquire(&g.done_token);
  ++g.blocks_run;
}

void prepare_fibers(unsigned threads) {
  if (g.main_tsan == nullptr) {
#if defined(GENFLOW_EMU_TSAN)
    g.main_tsan = __tsan_get_current_fiber();
#endif
  }
  while (g.fibers.size() < threads) {
    g.fibers.emplace_back();
    Fiber& f = g.fibers.back();
    // a guard page below each stack turns an overflow into a fault
    void* m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("cannot map a thread stack");
    mprotect(m, 4096, PROT_NONE);
    f.stack = static_cast<char*>(m) + 4096;
#if defined(GENFLOW_EMU_TSAN)
    f.tsan = __tsan_create_fiber(0);
#endif
  }
  g.threads = threads;
  g.warps.assign((threads + 31) / 32, Warp{});
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = g.fibers[i];
    f.linear = i;
    f.tid = {i % g.block_dim.x, (i / g.block_dim.x) % g.block_dim.y, i / (g.block_dim.x * g.block_dim.y)};
  }
}

// The warp collective every lane of `mask` calls; returns the generation parity whose slots hold
// the lanes' values.
int warp_collective(int op, unsigned mask, uint64_t bits, int pred) {
  Fiber* f = g.current;
  if (f == nullptr) fail("%s called outside a kernel", kOpNames[op]);
  Warp& w = g.warps[f->linear / 32];
  const unsigned lane = f->linear % 32, bit = 1u << lane;
  const unsigned lanes = g.threads - (f->linear / 32) * 32;
  const unsigned existing = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
  if ((mask & bit) == 0) fail("%s: the calling lane %u is not in mask 0x%08x", kOpNames[op], lane, mask);
  if ((mask & ~existing) != 0)
    fail("%s: mask 0x%08x names lanes past the block's %u threads", kOpNames[op], mask, g.threads);
  if ((mask & w.exited) != 0)
    fail("%s: mask 0x%08x names lanes that have exited (0x%08x)", kOpNames[op], mask, w.exited);
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
  } else if (w.mask != mask || w.op != op) {
    fail("divergent warp collectives: lane %u calls %s (mask 0x%08x) while lanes 0x%08x wait in %s "
         "(mask 0x%08x)", lane, kOpNames[op], mask, w.arrived, kOpNames[w.op], w.mask);
  }
  const int buf = static_cast<int>(w.gen & 1u);
  w.slot[buf][lane] = bits;
  w.pred[buf][lane] = pred;
  if (op == kOpSyncWarp) tsan_release(&w.token[buf]);
  w.arrived |= bit;
  if (w.arrived == w.mask) {
    ++w.gen;
    w.arrived = 0;
  } else {
    f->state = kAtWarp;
    f->wait_gen = w.gen;
    switch_out(f, false);
    f->state = kReady;
  }
  if (op == kOpSyncWarp) tsan_acquire(&w.token[buf]);
  return buf;
}

}  // namespace

uint3 thread_idx() {
  if (g.current == nullptr) fail("threadIdx read outside a kernel");
  return g.current->tid;
}
uint3 block_idx() { return g.block; }
dim3 block_dim() { return g.block_dim; }
dim3 grid_dim() { return g.grid; }
void* dynamic_shared_ptr() { return g.dynamic_shared; }
int lane_id() { return static_cast<int>(g.current->linear % 32); }

uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int arg, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width %d is not a power of two <= 32", width);
  const int buf = warp_collective(kOpShuffle, mask, bits, 0);
  const Warp& w = g.warps[g.current->linear / 32];
  const int lane = static_cast<int>(g.current->linear % 32), base = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case kShflIdx: src = base + (arg & (width - 1)); break;
    case kShflUp: src = lane - base >= arg ? lane - arg : lane; break;
    case kShflDown: src = lane - base + arg < width ? lane + arg : lane; break;
    case kShflXor: src = lane ^ arg; if (src >= base + width || src < 0) src = lane; break;
    default: fail("unknown shuffle kind %d", kind);
  }
  if (src > 31 || ((w.mask >> src) & 1u) == 0)
    fail("shuffle reads lane %d, which is not in mask 0x%08x (undefined on the GPU)", src, w.mask);
  return w.slot[buf][src];
}

unsigned vote(unsigned mask, int predicate, int kind) {
  const int buf = warp_collective(kOpVote, mask, 0, predicate != 0);
  const Warp& w = g.warps[g.current->linear / 32];
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((w.mask >> l) & 1u) != 0 && w.pred[buf][l] != 0) ballot |= 1u << l;
  if (kind == kAny) return ballot != 0;
  if (kind == kAll) return ballot == w.mask;
  return ballot;
}

void sync_warp(unsigned mask) { warp_collective(kOpSyncWarp, mask, 0, 0); }

// Out of line (this file), so that the return address identifies the __syncthreads call site.
__attribute__((noinline)) void sync_threads() {
  const void* site = __builtin_return_address(0);
  Fiber* f = g.current;
  if (f == nullptr) fail("__syncthreads called outside a kernel");
  const int buf = static_cast<int>(g.barrier_gen & 1u);
  if (g.arrived == 0) {
    g.barrier_site = site;
  } else if (site != g.barrier_site) {
    fail("divergent __syncthreads: this thread waits at %p while %u others wait at %p", site, g.arrived,
         g.barrier_site);
  }
  tsan_release(&g.barrier_token[buf]);
  ++g.arrived;
  f->state = kAtBarrier;
  f->wait_gen = g.barrier_gen;
  complete_barrier_if_all_arrived();
  if (g.barrier_gen == f->wait_gen) switch_out(f, false);
  f->state = kReady;
  tsan_acquire(&g.barrier_token[buf]);
}

cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*entry)(void*), void* ctx) {
  if (g.current != nullptr) fail("kernel launched from a kernel (dynamic parallelism is not emulated)");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || dynamic_shared_bytes > 48 * 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return last_error;
  }
  g.grid = grid;
  g.block_dim = block;
  g.entry = entry;
  g.entry_ctx = ctx;
  std::vector<char> dynamic(dynamic_shared_bytes);
  g.dynamic_shared = dynamic.empty() ? nullptr : dynamic.data();
  g.dynamic_bytes = dynamic_shared_bytes;
  prepare_fibers(static_cast<unsigned>(threads));
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t b = 0; b < blocks; ++b) {
    if (g.keep != nullptr && !g.keep(b, g.keep_ctx)) continue;
    g.block = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
               static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block();
  }
  g.dynamic_shared = nullptr;
  g.dynamic_bytes = 0;
  return cudaSuccess;
}

void set_sm_count(int sms) { g.sm_count = sms; }
void set_compute_capability(int major) { g.cc_major = major; }
void set_block_filter(bool (*keep)(uint64_t, void*), void* ctx) {
  g.keep = keep;
  g.keep_ctx = ctx;
}
uint64_t blocks_run() { return g.blocks_run; }

}  // namespace emu

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = emu::g.sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::g.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::last_error; }
