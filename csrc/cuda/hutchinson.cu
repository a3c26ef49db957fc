// CUDA kernels of the Hutchinson trace estimator's ops (math and summation order in
// csrc/common/hutchinson.h). Pure CUDA C++ (no torch): the op layer (csrc/ops/hutchinson.cpp)
// calls launch_hutchinson_probes / launch_probe_dot with ATen's current stream and device
// scratch.
//
//   probes:    each thread makes groups of four consecutive elements of one stream (one Philox
//              call; probe_group) in a grid-stride loop with 64-bit indices.
//   probe_dot: 1. block kernel: one CUDA block of 256 threads per (sample, summation block)
//                 (grid-stride); thread l forms products 4l..4l+3 (probe_dot_thread_sum), then
//                 the adjacent-pairs tree over the threads (warp shuffles, then the 8 warp sums);
//              2. finish kernel: one thread per sample adds its block sums in order and writes
//                 accumulate + scale * sum (probe_dot_finish).
// Nothing is read back to the host, so both are asynchronous and CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/hutchinson.h"
#include "cuda/device.cuh"
#include "cuda/dtype.cuh"

namespace genflow {
namespace {

constexpr int kWarps = kProbeDotThreads / 32;
constexpr int kProbeThreads = 256;

// ---- probes ----

template <typename T>
__global__ void probes_kernel(const ProbeParams p) {
  const int64_t groups = probe_group_count(p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride)
    probe_group<T, typename Acc<T>::type, Conv<T>>(p, g);
}

template <typename T>
cudaError_t launch_probes_typed(const ProbeParams& p, cudaStream_t stream) {
  const int64_t groups = probe_group_count(p);
  const int64_t max_blocks = sm_count() * 16;
  int64_t blocks = (groups + kProbeThreads - 1) / kProbeThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  probes_kernel<T><<<static_cast<unsigned>(blocks), kProbeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- probe_dot ----

// The adjacent-pairs tree over the block's 256 values v; the result is valid in thread 0. Warp
// shuffles with offsets 1, 2, .., 16 give lane 0 the tree over its warp; thread 0 then adds the
// 8 warp sums as ((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7)).
__device__ __forceinline__ double block_tree(double v, double* shared) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) v = add_rn(v, __shfl_down_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double w[kWarps];
#pragma unroll
    for (int j = 0; j < kWarps; ++j) w[j] = shared[j];
    v = add_rn(add_rn(add_rn(w[0], w[1]), add_rn(w[2], w[3])),
               add_rn(add_rn(w[4], w[5]), add_rn(w[6], w[7])));
  }
  __syncthreads();  // shared may be reused by the next grid-stride iteration
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kProbeDotThreads) probe_dot_block_kernel(const ProbeDotParams p) {
  __shared__ double shared[kWarps];
  const int64_t tasks = p.batch * p.blocks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t b = task / p.blocks, k = task - b * p.blocks;
    double s = probe_dot_thread_sum<T, Conv<T>>(p, b, k, threadIdx.x);
    s = block_tree(s, shared);
    if (threadIdx.x == 0) p.partial[task] = s;
  }
}

__global__ void probe_dot_finish_kernel(const ProbeDotParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < p.batch;
       b += stride)
    probe_dot_finish(p, b);
}

template <typename T>
cudaError_t launch_dot_typed(const ProbeDotParams& p, cudaStream_t stream) {
  const int64_t sms = sm_count();
  if (p.blocks > 0) {
    const int64_t work = p.batch * p.blocks, max_blocks = sms * 32;
    const unsigned grid = static_cast<unsigned>(work > max_blocks ? max_blocks : work);
    probe_dot_block_kernel<T><<<grid, kProbeDotThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  constexpr int kFinishThreads = 128;
  int64_t grid = (p.batch + kFinishThreads - 1) / kFinishThreads;
  if (grid > sms * 16) grid = sms * 16;
  probe_dot_finish_kernel<<<static_cast<unsigned>(grid), kFinishThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_hutchinson_probes(const ProbeParams& p, Dtype dtype, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  if (p.kind != kRademacher && p.kind != kGaussian) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::Float32: return launch_probes_typed<float>(p, stream);
    case Dtype::Float64: return launch_probes_typed<double>(p, stream);
    case Dtype::BFloat16: return launch_probes_typed<__nv_bfloat16>(p, stream);
    case Dtype::Float16: return launch_probes_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_probe_dot(const ProbeDotParams& p, Dtype dtype, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::Float32: return launch_dot_typed<float>(p, stream);
    case Dtype::Float64: return launch_dot_typed<double>(p, stream);
    case Dtype::BFloat16: return launch_dot_typed<__nv_bfloat16>(p, stream);
    case Dtype::Float16: return launch_dot_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genflow
