// Small kernels for tests/emu/faulty_driver.cpp: two correct ones (block reversal through static
// and through dynamic shared memory) and deliberately faulty variants, each with one bug the
// emulation must catch (ctest: emu_faulty_*). Never part of genflow's extension.
#include <cuda_runtime.h>

#include <cstring>

namespace faulty {
namespace {

constexpr int kBlock = 64;

__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float s[kBlock];
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * kBlock + t];
  __syncthreads();
  out[blockIdx.x * kBlock + t] = s[kBlock - 1 - t];
}

__global__ void reverse_dynamic_kernel(const float* in, float* out) {
  extern __shared__ float buf[];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * kBlock + t];
  __syncthreads();
  out[blockIdx.x * kBlock + t] = buf[kBlock - 1 - t];
}

// BUG: no __syncthreads between the shared-memory write and the read of another thread's entry.
__global__ void missing_sync_kernel(const float* in, float* out) {
  __shared__ float s[kBlock];
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * kBlock + t];
  out[blockIdx.x * kBlock + t] = s[kBlock - 1 - t];
}

// BUG: `<=` writes one element past out.
__global__ void oob_global_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 2.0f * in[i < n ? i : 0];
}

// BUG: thread kBlock - 1 writes s[kBlock], one past the shared array (through a pointer, which
// UBSan's bounds check does not see: ASan must).
__global__ void oob_shared_kernel(const float* in, float* out) {
  __shared__ float s[kBlock];
  const int t = threadIdx.x;
  float* next = s + 1;
  next[t] = in[blockIdx.x * kBlock + t];
  __syncthreads();
  out[blockIdx.x * kBlock + t] = s[t];
}

// BUG: the two halves of the block wait at different __syncthreads.
__global__ void divergent_barrier_kernel(const float* in, float* out) {
  const int t = threadIdx.x;
  if (t < kBlock / 2) {
    __syncthreads();
    out[t] = in[t];
  } else {
    out[t] = -in[t];
    __syncthreads();
  }
}

// BUG: lane 5 returns before a full-warp shuffle.
__global__ void exited_lane_kernel(const float* in, float* out) {
  const int t = threadIdx.x;
  if (t == 5) return;
  out[t] = __shfl_down_sync(0xffffffffu, in[t], 1);
}

}  // namespace

// Runs `name` on n = blocks * 64 elements; returns 0 when out is the block-reversed input.
int run(const char* name, const float* in, float* out, int blocks) {
  const int n = blocks * kBlock;
  if (std::strcmp(name, "correct") == 0) {
    reverse_kernel<<<blocks, kBlock>>>(in, out);
  } else if (std::strcmp(name, "correct_dynamic") == 0) {
    reverse_dynamic_kernel<<<blocks, kBlock, kBlock * sizeof(float)>>>(in, out);
  } else if (std::strcmp(name, "missing_sync") == 0) {
    missing_sync_kernel<<<blocks, kBlock>>>(in, out);
  } else if (std::strcmp(name, "oob_global") == 0) {
    oob_global_kernel<<<blocks + 1, kBlock>>>(in, out, n);
    return cudaGetLastError() == cudaSuccess ? 1 : 2;  // (a result check would be moot)
  } else if (std::strcmp(name, "oob_shared") == 0) {
    oob_shared_kernel<<<blocks, kBlock>>>(in, out);
  } else if (std::strcmp(name, "divergent_barrier") == 0) {
    divergent_barrier_kernel<<<1, kBlock>>>(in, out);
  } else if (std::strcmp(name, "exited_lane") == 0) {
    exited_lane_kernel<<<1, kBlock>>>(in, out);
  } else {
    return 3;
  }
  if (cudaGetLastError() != cudaSuccess) return 2;
  for (int i = 0; i < n; ++i) {
    const int b = i / kBlock, t = i % kBlock;
    if (!(out[i] == in[b * kBlock + kBlock - 1 - t])) return 1;
  }
  return 0;
}

}  // namespace faulty
