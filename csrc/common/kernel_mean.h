// The Gaussian-kernel weighted mean (the engine of the kernel SD flow, MMD flow and SVGD), shared
// by the C++ kernel (csrc/cpu/kernel_mean.cpp) and the CUDA kernel (csrc/cuda/kernel_mean.cu);
// no torch includes.
//
//   s_ij    = -scale * |q_i - k_j|^2 + lw_j              scale = 1 / (2 sigma^2), lw = log_weights (0 if none)
//   lse_i   = log sum_j exp(s_ij)                          (the log of the kernel sum)
//   out_i   = sum_j exp(s_ij - lse_i) v_j                  i < n, j < m
//
// computed with a streaming (online) log-sum-exp over key tiles: a running max, a running sum of
// exp(s - max) and a running weighted sum, rescaled when the max grows, so memory is O((n + m) d)
// and no n x m matrix exists. Inputs are contiguous row-major arrays of one dtype (float32 or
// float64); accumulation is in float32 for float32 (float64 for float64), distances are formed
// as sums of squared differences (no |q|^2 + |k|^2 - 2 q.k cancellation) except on the opt-in
// tensor-core paths (precision kTF32 / kBF16, CUDA, d >= 32).
//
// Backward, given g = dL/dout [n, dv] and the saved out and lse (w_ij = exp(s_ij - lse_i)):
//   dL/dq_i = 2 scale * sum_j w_ij (g_i . (v_j - out_i)) (k_j - q_i)
//           = 2 scale * (sum_j w_ij (g_i . v_j) k_j - (g_i . out_i) sum_j w_ij k_j)
//   dL/dv_j = sum_i w_ij g_i
//   dL/dk_j = 2 scale * sum_i w_ij (g_i . (v_j - out_i)) (q_i - k_j)
// (query-major loop over key tiles for dq; key-major loop over query tiles for dv and dk).
#pragma once

#include <cstdint>

#include "common/fused_update.h"  // Dtype (and <cuda_runtime.h> under CUDA)

namespace genflow {

enum KernelPrecision : int32_t {
  kPrecisionHighest = 0,  // exact sums of squared differences in the accumulation type
  kPrecisionTF32 = 1,     // CUDA, float32, d >= 32: q.k on tensor cores in TF32
  kPrecisionBF16 = 2,     // CUDA, float32, d >= 32: q.k on tensor cores in BF16
};

struct KernelMeanParams {
  const void* queries;      // [n, d]
  const void* keys;         // [m, d]
  const void* values;       // [m, dv] (equal to keys, dv = d, when the caller passed values=None)
  const void* log_weights;  // [m] or nullptr (all zero)
  void* out;                // [n, dv]
  void* lse;                // [n], the input dtype
  int64_t n, m, d, dv;
  double scale;             // 1 / (2 sigma^2) > 0
  int32_t precision;        // KernelPrecision
};

struct KernelMeanBackwardParams {
  const void* queries;      // [n, d]
  const void* keys;         // [m, d]
  const void* values;       // [m, dv]
  const void* log_weights;  // [m] or nullptr
  const void* out;          // [n, dv]  saved forward output
  const void* lse;          // [n]      saved forward lse
  const void* grad_out;     // [n, dv]
  void* grad_queries;       // [n, d]  or nullptr (not needed)
  void* grad_keys;          // [m, d]  or nullptr
  void* grad_values;        // [m, dv] or nullptr
  int64_t n, m, d, dv;
  double scale;
};

// CPU: csrc/cpu/kernel_mean.cpp (OpenMP over query tiles / key tiles).
void kernel_weighted_mean_cpu(const KernelMeanParams& p, Dtype dtype);
void kernel_weighted_mean_backward_cpu(const KernelMeanBackwardParams& p, Dtype dtype);
// CUDA: csrc/cuda/kernel_mean.cu; all pointers on the current device, asynchronous on stream.
#if defined(__CUDACC__) || defined(GENFLOW_WITH_CUDA)
cudaError_t launch_kernel_weighted_mean(const KernelMeanParams& p, Dtype dtype, cudaStream_t stream);
cudaError_t launch_kernel_weighted_mean_backward(const KernelMeanBackwardParams& p, Dtype dtype,
                                                 cudaStream_t stream);
#endif

}  // namespace genflow
