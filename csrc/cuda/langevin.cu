// CUDA kernels of the Langevin corrector step (math and reduction order in
// csrc/common/langevin.h). Pure CUDA C++ (no torch): the op layer (csrc/ops/langevin.cpp)
// calls launch_langevin_update with ATen's current stream and device scratch buffers.
//
//   1. chunk kernel: one block of 256 threads per (sample, chunk) (grid-stride); thread l
//      forms s and z for lanes 4l..4l+3 (langevin_thread_sums: one Philox call per group of
//      four), then the block's adjacent-pairs tree (warp shuffles, then the 8 warp sums).
//   2. sample kernel: one block per sample reduces its chunk sums the same way and, unless
//      batch_mean, writes the pass-2 coefficients.
//   3. batch kernel (batch_mean only): one block reduces the per-sample norms and writes every
//      sample's coefficients.
//   4. the fused update (launch_fused_update) with those per-sample coefficients, z regenerated.
// Nothing is read back to the host, so the step is asynchronous and CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/langevin.h"
#include "cuda/device.cuh"
#include "cuda/dtype.cuh"

namespace genflow {
namespace {

constexpr int kWarps = kLangevinThreads / 32;

// The adjacent-pairs tree over the block's 256 values v (two at once); the result is valid in
// thread 0. Warp shuffles with offsets 1, 2, .., 16 give lane 0 the tree over its warp; thread 0
// then adds the 8 warp sums as ((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7)).
__device__ __forceinline__ void block_tree(double& v0, double& v1, double* shared) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    v0 = add_rn(v0, __shfl_down_sync(0xffffffffu, v0, off));
    v1 = add_rn(v1, __shfl_down_sync(0xffffffffu, v1, off));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    shared[warp] = v0;
    shared[kWarps + warp] = v1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double w[2][kWarps];
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
      for (int j = 0; j < kWarps; ++j) w[k][j] = shared[k * kWarps + j];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const double s = add_rn(add_rn(add_rn(w[k][0], w[k][1]), add_rn(w[k][2], w[k][3])),
                              add_rn(add_rn(w[k][4], w[k][5]), add_rn(w[k][6], w[k][7])));
      if (k == 0) v0 = s; else v1 = s;
    }
  }
  __syncthreads();  // shared may be reused by the next grid-stride iteration
}

template <typename T, int Mode>
__global__ void __launch_bounds__(kLangevinThreads) langevin_chunk_kernel(const LangevinParams p) {
  __shared__ double shared[2 * kWarps];
  const int64_t tasks = p.update.batch * p.chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t b = task / p.chunks, c = task - b * p.chunks;
    double sums[2];
    langevin_thread_sums<T, typename Acc<T>::type, Mode, Conv<T>>(p, b, c, threadIdx.x, sums);
    block_tree(sums[0], sums[1], shared);
    if (threadIdx.x == 0) {
      p.partial[2 * task] = sums[0];
      p.partial[2 * task + 1] = sums[1];
    }
  }
}

struct ChunkSum {
  const double* part;
  __device__ double operator()(int64_t j) const { return part[2 * j]; }
};

struct NormRoot {
  const double* norms;
  __device__ double operator()(int64_t j) const { return sqrt_rn(norms[2 * j]); }
};

__global__ void __launch_bounds__(kLangevinThreads) langevin_sample_kernel(const LangevinParams p) {
  __shared__ double shared[2 * kWarps];
  const int l = threadIdx.x;
  for (int64_t b = blockIdx.x; b < p.update.batch; b += gridDim.x) {
    const double* part = p.partial + 2 * b * p.chunks;
    double ss = lane_thread_sum(p.chunks, l, ChunkSum{part});
    double zz = lane_thread_sum(p.chunks, l, ChunkSum{part + 1});
    block_tree(ss, zz, shared);
    if (l == 0) {
      p.norms[2 * b] = ss;
      p.norms[2 * b + 1] = zz;
      if (!p.batch_mean) langevin_finalize(p, b, ss, zz, 0.0, 0.0);
    }
  }
}

__global__ void __launch_bounds__(kLangevinThreads) langevin_batch_kernel(const LangevinParams p) {
  __shared__ double shared[2 * kWarps];
  __shared__ double total[2];
  const int l = threadIdx.x;
  double s = lane_thread_sum(p.update.batch, l, NormRoot{p.norms});
  double z = lane_thread_sum(p.update.batch, l, NormRoot{p.norms + 1});
  block_tree(s, z, shared);
  if (l == 0) {
    total[0] = s;
    total[1] = z;
  }
  __syncthreads();
  for (int64_t b = l; b < p.update.batch; b += blockDim.x)
    langevin_finalize(p, b, p.norms[2 * b], p.norms[2 * b + 1], total[0], total[1]);
}

int64_t grid_for(int64_t work) {
  const int64_t max_blocks = sm_count() * 32;
  return work < 1 ? 1 : (work > max_blocks ? max_blocks : work);
}

template <typename T>
cudaError_t launch_typed(const LangevinParams& p, Dtype dtype, cudaStream_t stream) {
  const unsigned chunk_blocks = static_cast<unsigned>(grid_for(p.update.batch * p.chunks));
  if (p.update.noise_mode == kGeneratedNoise)
    langevin_chunk_kernel<T, kGeneratedNoise><<<chunk_blocks, kLangevinThreads, 0, stream>>>(p);
  else if (p.update.noise_mode == kSuppliedNoise)
    langevin_chunk_kernel<T, kSuppliedNoise><<<chunk_blocks, kLangevinThreads, 0, stream>>>(p);
  else
    return cudaErrorInvalidValue;
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned sample_blocks = static_cast<unsigned>(grid_for(p.update.batch));
  langevin_sample_kernel<<<sample_blocks, kLangevinThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.batch_mean) {
    langevin_batch_kernel<<<1, kLangevinThreads, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_fused_update(p.update, dtype, stream);
}

}  // namespace

cudaError_t launch_langevin_update(const LangevinParams& p, Dtype dtype, cudaStream_t stream) {
  if (p.update.numel <= 0) return cudaSuccess;
  if (p.update.num_terms != 1 || !p.update.coef_per_sample || p.update.coef != p.step)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::Float32: return launch_typed<float>(p, dtype, stream);
    case Dtype::Float64: return launch_typed<double>(p, dtype, stream);
    case Dtype::BFloat16: return launch_typed<__nv_bfloat16>(p, dtype, stream);
    case Dtype::Float16: return launch_typed<__half>(p, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genflow
