// CUDA kernel of the fused update (math in csrc/common/fused_update.h, noise in philox.h).
// Pure CUDA C++ (no torch): the op layer (csrc/ops/fused_update.cpp) calls launch_fused_update
// with ATen's current stream.
//
// Each thread handles groups of four consecutive elements of one Philox stream (one Philox call
// gives the group's four normals; fused_update_group in csrc/common/fused_update.h) in a
// grid-stride loop with 64-bit indices; full groups of aligned arrays are read and written with
// one vector access per array (fused_update_group_vec). With p.nonfinite set, a thread that wrote
// a NaN/Inf records p.step there (atomicMin, once per thread after its loop).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/fused_update.h"
#include "cuda/dtype.cuh"

namespace genflow {
namespace {

// vec (vector_groups_ok, decided once on the host): full groups use one aligned Pack4 access per
// array (16 bytes for float32); the partial last group and unaligned inputs take the scalar path.
template <typename T, int K, int Mode>
__global__ void fused_update_kernel(const FusedUpdateParams p, const bool vec) {
  using acc_t = typename Acc<T>::type;
  const int64_t groups = group_count(p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    if (vec && 4 * g + 4 <= p.numel)
      bad |= fused_update_group_vec<T, acc_t, K, Mode, Conv<T>>(p, g);
    else
      bad |= fused_update_group<T, acc_t, K, Mode, Conv<T>>(p, g);
  }
  if (bad && p.nonfinite != nullptr) atomicMin(p.nonfinite, p.step);
}

template <typename T, int K, int Mode>
cudaError_t launch_typed(const FusedUpdateParams& p, cudaStream_t stream) {
  const int64_t groups = group_count(p);
  constexpr int kThreads = 256;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t max_blocks = static_cast<int64_t>(sms) * 16;
  int64_t blocks = (groups + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  fused_update_kernel<T, K, Mode>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, vector_groups_ok<T>(p));
  return cudaGetLastError();
}

template <typename T, int Mode>
cudaError_t launch_k(const FusedUpdateParams& p, cudaStream_t stream) {
  switch (p.num_terms) {
    case 0: return launch_typed<T, 0, Mode>(p, stream);
    case 1: return launch_typed<T, 1, Mode>(p, stream);
    case 2: return launch_typed<T, 2, Mode>(p, stream);
    case 3: return launch_typed<T, 3, Mode>(p, stream);
    case 4: return launch_typed<T, 4, Mode>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_mode(const FusedUpdateParams& p, cudaStream_t stream) {
  switch (p.noise_mode) {
    case kNoNoise: return launch_k<T, kNoNoise>(p, stream);
    case kSuppliedNoise: return launch_k<T, kSuppliedNoise>(p, stream);
    case kGeneratedNoise: return launch_k<T, kGeneratedNoise>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_fused_update(const FusedUpdateParams& p, Dtype dtype, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::Float32: return launch_mode<float>(p, stream);
    case Dtype::Float64: return launch_mode<double>(p, stream);
    case Dtype::BFloat16: return launch_mode<__nv_bfloat16>(p, stream);
    case Dtype::Float16: return launch_mode<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genflow
