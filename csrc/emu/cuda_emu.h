// CUDA-execution emulation for tests: what <cuda_runtime.h>, <cuda_bf16.h> and <cuda_fp16.h>
// give the kernels in csrc/cuda/, for compiling those sources UNMODIFIED as host C++ and running
// every thread of every block on the CPU (docs/design/cuda_emulation.md). Not a general CUDA
// implementation: only what genflow's kernels and the tests in tests/emu/ use.
//
// Build (CMakeLists.txt, GENFLOW_EMU): csrc/emu/rewrite_launches.py copies each .cu into the
// build tree with `k<<<g, b, s, st>>>(args)` turned into `k + ::emu::LaunchConfig(g, b, s,
// st)(args)` (and `extern __shared__ T a[];` into `T* a = ::emu::dynamic_shared<T>();`), same
// lines; the copy is compiled with -x c++ -I csrc/emu/include (these shadow headers),
// -D__CUDACC__ -D__CUDA_ARCH__=900 (the device branches of csrc/common/ are the ones tested) and
// -Dgenflow=genflow_emu (the device versions of csrc/common/'s inline functions must not be
// merged with the host versions that the CPU kernels in the same test binary use).
//
// Execution model (csrc/emu/cuda_emu_runtime.cpp): a launch runs its blocks one after another;
// a block's threads are fibers (ucontext) scheduled cooperatively, switched only at
// __syncthreads, __syncwarp, warp shuffles / votes and wmma collectives. Static __shared__
// variables are function-local statics in one linker section, filled with 0xff bytes (NaN) before
// every block; ASan checks them (-fsanitize-sections), TSan sees the fibers as threads that
// synchronise only at __syncthreads / __syncwarp (annotations), so a missing barrier is a
// reported race. Divergent __syncthreads, warp collectives with missing lanes and deadlocks abort
// with a message.
#pragma once

#include <math.h>  // libstdc++'s wrapper: float overloads (fma, fmax, ...) in the global namespace

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#if defined(GENFLOW_EMU_FAST_MATH)
#include <xmmintrin.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("genflow_emu_shared")))

// ---- runtime types ----

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace emu {

// ---- the runtime (csrc/emu/cuda_emu_runtime.cpp) ----

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_shared_ptr();

enum ShuffleKind : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
enum VoteKind : int { kBallot = 0, kAny = 1, kAll = 2 };
uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int arg, int width);
unsigned vote(unsigned mask, int predicate, int kind);
void sync_threads();  // the call site (its return address) identifies the barrier
void sync_warp(unsigned mask);
int lane_id();

// Runs entry(ctx) on every thread of every block (a kernel launch); sets the last error and
// returns it for an invalid configuration.
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*entry)(void*),
                   void* ctx);

// ---- test controls ----

void set_sm_count(int sms);              // cudaDevAttrMultiProcessorCount (default 2)
void set_compute_capability(int major);  // cudaDevAttrComputeCapabilityMajor (default 9)
// Run only the blocks b (linear block index) with keep(b, ctx) true; nullptr: all blocks.
void set_block_filter(bool (*keep)(uint64_t, void*), void* ctx);
uint64_t blocks_run();  // blocks executed since the start of the process

// ---- kernel launches: k + LaunchConfig(grid, block, shmem, stream)(args...) ----

struct LaunchConfig {
  dim3 grid, block;
  size_t shmem;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shmem(s) {}
  template <typename... A> auto operator()(A&&... args) const;
};

template <typename... A> struct BoundLaunch {
  LaunchConfig cfg;
  std::tuple<A...> args;
};

template <typename... A> auto LaunchConfig::operator()(A&&... args) const {
  return BoundLaunch<std::decay_t<A>...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
}

template <typename... P> struct KernelCall {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;  // converted to the parameter types, as cudaLaunchKernel does
  static void run(void* self) {
#if defined(GENFLOW_EMU_FAST_MATH)
    _mm_setcsr(_mm_getcsr() | 0x8040u);  // FTZ | DAZ for this thread's plain float arithmetic
#endif
    auto* c = static_cast<KernelCall*>(self);
    std::apply(c->kernel, c->args);
  }
};

template <typename... P, typename... A, size_t... I>
void launch_bound(void (*kernel)(P...), BoundLaunch<A...>& b, std::index_sequence<I...>) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  KernelCall<P...> call{kernel, std::tuple<std::decay_t<P>...>(std::get<I>(b.args)...)};
  launch(b.cfg.grid, b.cfg.block, b.cfg.shmem, &KernelCall<P...>::run, &call);
}

template <typename... P, typename... A>
void operator+(void (*kernel)(P...), BoundLaunch<A...>&& b) {
  launch_bound(kernel, b, std::index_sequence_for<A...>{});
}

template <typename T> T* dynamic_shared() { return static_cast<T*>(dynamic_shared_ptr()); }

template <typename T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ---- float bit helpers and the fast-math model ----

inline uint32_t fbits(float v) { uint32_t b; std::memcpy(&b, &v, 4); return b; }
inline float bitsf(uint32_t b) { float v; std::memcpy(&v, &b, 4); return v; }
inline uint64_t dbits(double v) { uint64_t b; std::memcpy(&b, &v, 8); return b; }
inline double bitsd(uint64_t b) { double v; std::memcpy(&v, &b, 8); return v; }

#if defined(GENFLOW_EMU_FAST_MATH)
// nvcc --use_fast_math (-ftz=true): float32 subnormal inputs and results of the .f32 instructions,
// the _rn intrinsics included (libdevice picks their .ftz forms), become zeros of the same sign.
// (Plain float arithmetic gets the same from MXCSR FTZ|DAZ, set in every emulated thread.)
inline float ftz(float v) { return (fbits(v) & 0x7f800000u) == 0 ? bitsf(fbits(v) & 0x80000000u) : v; }
// MUFU ex2.approx / lg2.approx: relative error about 2^-22; modelled by clearing the two lowest
// mantissa bits of the correctly rounded value (deterministic, of the documented size).
inline float approx22(float v) { return std::isfinite(v) ? ftz(bitsf(fbits(v) & ~3u)) : v; }
#else
inline float ftz(float v) { return v; }
inline float approx22(float v) { return v; }
#endif

}  // namespace emu

inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
constexpr int warpSize = 32;

__attribute__((always_inline)) inline void __syncthreads() { ::emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::sync_warp(mask); }

template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), ::emu::kShflIdx, src, width));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), ::emu::kShflUp, static_cast<int>(delta), width));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), ::emu::kShflDown, static_cast<int>(delta), width));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::from_bits<T>(::emu::shuffle(mask, ::emu::to_bits(v), ::emu::kShflXor, lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::vote(mask, pred, ::emu::kBallot); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred, ::emu::kAny)); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred, ::emu::kAll)); }

// ---- atomics (real atomics: TSan sees them as such) ----

template <typename T> T atomicAdd(T* a, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
  } else {
    T old;
    __atomic_load(a, &old, __ATOMIC_RELAXED);
    T sum = old + v;
    while (!__atomic_compare_exchange(a, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) sum = old + v;
    return old;
  }
}
template <typename T> T atomicMin(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T> T atomicMax(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T> T atomicCAS(T* a, T compare, T v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
template <typename T> T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }

// ---- intrinsics: correctly rounded ones exact (flushed under the fast-math model) ----

inline float __fmaf_rn(float a, float b, float c) {
  return emu::ftz(__builtin_fmaf(emu::ftz(a), emu::ftz(b), emu::ftz(c)));
}
inline float __fmul_rn(float a, float b) { return emu::ftz(emu::ftz(a) * emu::ftz(b)); }
inline float __fadd_rn(float a, float b) { return emu::ftz(emu::ftz(a) + emu::ftz(b)); }
inline float __fsub_rn(float a, float b) { return emu::ftz(emu::ftz(a) - emu::ftz(b)); }
inline float __fdiv_rn(float a, float b) { return emu::ftz(emu::ftz(a) / emu::ftz(b)); }
inline float __fsqrt_rn(float a) { return emu::ftz(std::sqrt(emu::ftz(a))); }
inline float __frcp_rn(float a) { return emu::ftz(1.0f / emu::ftz(a)); }
inline double __fma_rn(double a, double b, double c) { return __builtin_fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return __builtin_sqrt(a); }
inline uint32_t __float_as_uint(float v) { return emu::fbits(v); }
inline float __uint_as_float(uint32_t b) { return emu::bitsf(b); }
inline int __float_as_int(float v) { return static_cast<int>(emu::fbits(v)); }
inline float __int_as_float(int b) { return emu::bitsf(static_cast<uint32_t>(b)); }
inline long long __double_as_longlong(double v) { return static_cast<long long>(emu::dbits(v)); }
inline double __longlong_as_double(long long b) { return emu::bitsd(static_cast<uint64_t>(b)); }
inline int __float2int_rn(float v) { return static_cast<int>(std::nearbyint(v)); }
template <typename T> T __ldg(const T* p) { return *p; }
// The fast-math intrinsics (approximate on the GPU; here: the exact value rounded to ~22 bits).
inline float __expf(float x) { return emu::approx22(std::exp(emu::ftz(x))); }
inline float __logf(float x) { return emu::approx22(std::log(emu::ftz(x))); }
inline float __sinf(float x) { return emu::approx22(std::sin(emu::ftz(x))); }
inline float __cosf(float x) { return emu::approx22(std::cos(emu::ftz(x))); }
inline float __fdividef(float a, float b) { return emu::approx22(emu::ftz(a) / emu::ftz(b)); }
inline float rsqrtf(float x) { return emu::approx22(1.0f / std::sqrt(emu::ftz(x))); }
#if defined(GENFLOW_EMU_FAST_MATH)
// exp2f / log2f become MUFU.EX2 / MUFU.LG2 with .ftz under --use_fast_math.
#define exp2f(x) ::emu::approx22(std::exp2(::emu::ftz(static_cast<float>(x))))
#define log2f(x) ::emu::approx22(std::log2(::emu::ftz(static_cast<float>(x))))
#endif

// ---- bfloat16 / float16 (round to nearest even; NaN becomes 0x7fff as cvt.rn does) ----

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
};
struct __half {
  uint16_t __x;
  __half() = default;
};
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 h) { return emu::bitsf(static_cast<uint32_t>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const uint32_t u = emu::fbits(v);
  __nv_bfloat16 h;
  h.__x = std::isnan(v) ? 0x7fffu : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return h;
}
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0x1f) return emu::bitsf(sign | 0x7f800000u | (m << 13));
  if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(m), -24);
  return emu::bitsf(sign | ((e + 112u) << 23) | (m << 13));
}
inline __half __float2half_rn(float v) {
  const uint32_t u = emu::fbits(v), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7fffu;
  } else if (a >= 0x47800000u) {  // >= 65536 (and inf): inf
    h = sign | 0x7c00u;
  } else if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to nearest even
    h = sign | static_cast<uint32_t>(std::nearbyint(std::ldexp(static_cast<double>(emu::bitsf(a)), 24)));
  } else {
    h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    h |= sign;
  }
  __half r;
  r.__x = static_cast<uint16_t>(h);
  return r;
}
