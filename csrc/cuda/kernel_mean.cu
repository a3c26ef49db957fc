// CUDA kernels of the Gaussian-kernel weighted mean and its backward pass (math in
// csrc/common/kernel_mean.h, the online log-sum-exp in csrc/common/kernel_mean_tile.h). Pure CUDA
// C++ (no torch): the op layer (csrc/ops/kernel_mean.cpp) calls launch_kernel_weighted_mean /
// launch_kernel_weighted_mean_backward with ATen's current stream. No scratch memory, no atomics:
// every output element is written by one thread, so results are deterministic for a given device.
//
// Scores are in base 2 (s2 = lw2 - scale2 |q - k|^2, scale2 = log2(e) scale), so each weight is
// one exp2; in float32 that is the MUFU.EX2 instruction, whose throughput (about 4.2e12/s on an
// H100, DESIGN.md §6) is the floor of the small-d forward pass.
//
// Small-d kernels (d == dv in {1, 2, 3, 4, 8}; D, DV template constants): a thread owns one row
// (a query for forward and dq, a key for dk/dv) in registers; `splits` consecutive lanes
// (a power of two <= 32, chosen so that about 2048 threads per SM are busy when n is small)
// share the row and take every splits-th element of each tile of 256 keys (queries) staged in
// shared memory component-major ([x][j]: lanes read consecutive words, no bank conflicts). The
// lanes' partial states are merged with xor shuffles (lse_merge for the forward, sums for the
// backward). The forward adds one key per exp2 with lse_accumulate.
//
// General kernels (any d, dv; 128 threads): a block owns a tile of 32 rows and a chunk of 64
// output columns (a grid-stride "task"); thread (r = tid / 4, cg = tid % 4) owns row r, the 8
// tile columns cg + 4c of the 32 x 32 score tile and the 16 output columns 4 cg + 16 (c / 4) +
// c % 4. Per 32-key tile: pairwise squared distances (and, in the backward pass, dot products
// g_i . v_j) are accumulated over 32-wide feature chunks staged in shared memory (pair_tile), the
// tile's probabilities go through shared memory, and the thread accumulates its 16 output
// columns. Output widths above 64 are separate tasks that recompute the scores.
//
// Tensor-core forward (float32, d >= 32, precision TF32 or BF16, compute capability >= 8):
// the same general kernel with |q - k|^2 = |q|^2 + |k|^2 - 2 q.k, where q.k comes from WMMA
// (m16n16k8 TF32 or m16n16k16 BF16 fragments from the rounded chunks in shared memory, float32
// accumulation; warp w computes the 16 x 16 block (w / 2, w % 2) of the 32 x 32 tile), and the
// norms from the same rounded values, clamped at 0. The exponentials and the P V product stay
// on the CUDA cores in float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/kernel_mean.h"
#include "common/kernel_mean_tile.h"
#include "cuda/device.cuh"
#include "cuda/dtype.cuh"

// TF32 / BF16 WMMA exist on sm_80+ (and in the host pass, which only parses device code).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GF_KM_WMMA 1
#else
#define GF_KM_WMMA 0
#endif

namespace genflow {
namespace {

constexpr int kThreads = 128;
constexpr int kResidentThreads = 2048;  // per SM (sm_80, sm_90)
constexpr int kBlocksPerSm = 16;        // kResidentThreads / kThreads
constexpr unsigned kFullMask = 0xffffffffu;

// Small-d kernels.
constexpr int kSmallTile = 256;  // keys (queries) per shared-memory tile

// General kernels.
constexpr int kTile = 32;      // rows and columns of the score tile
constexpr int kChunk = 32;     // feature columns per staged chunk
constexpr int kLd = kChunk + 4;   // leading dimension of chunks and scores: rows r*kLd fall in
                                  // distinct banks; 16-byte multiple for WMMA TF32 loads
constexpr int kLdHalf = kChunk + 8;  // bf16 chunks: 16-byte multiple for WMMA BF16 loads
constexpr int kOutCols = 64;   // output columns per task (16 per thread)

enum Mode : int { kExact = 0, kTF32 = 1, kBF16 = 2 };

bool has_tensor_cores() {  // TF32 / BF16 WMMA: compute capability >= 8.0
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 8;
}

// Lanes per row of the small-d kernels: a power of two <= 32, doubled while rows * splits * 2
// threads still fit the device's resident threads.
int split_count(int64_t rows, int64_t sms) {
  int splits = 1;
  while (splits < 32 && rows * splits * 2 <= sms * kResidentThreads) splits *= 2;
  return splits;
}

unsigned grid_size(int64_t tasks_or_tiles, int64_t sms) {
  const int64_t max_blocks = sms * kBlocksPerSm;
  return static_cast<unsigned>(tasks_or_tiles < max_blocks ? tasks_or_tiles : max_blocks);
}

template <typename T> __device__ __forceinline__ typename Acc<T>::type ld(const T* ptr, int64_t i) {
  return Conv<T>::load(ptr[i]);
}

// Base-2 log weight of key j (0 without log weights).
template <typename T, typename A>
__device__ __forceinline__ A log_weight2(const void* log_weights, int64_t j) {
  return log_weights == nullptr ? A(0)
                                : ld(static_cast<const T*>(log_weights), j) * static_cast<A>(kLog2e);
}

// ---- small d ----

// Stages rows [r0, r0 + count) of a [rows, W] array component-major: dst[x * kSmallTile + j].
template <int W, typename T, typename A>
__device__ __forceinline__ void stage_components(const T* src, int64_t r0, int count, A* dst) {
  for (int e = threadIdx.x; e < count * W; e += blockDim.x) {
    const int j = e / W, x = e - j * W;
    dst[x * kSmallTile + j] = ld(src, (r0 + j) * W + x);
  }
}

template <typename A> __device__ __forceinline__ A sum_lanes(A v, int splits) {
  for (int off = 1; off < splits; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads)
    forward_small_kernel(const KernelMeanParams p, const typename Acc<T>::type scale2, const int splits) {
  using A = typename Acc<T>::type;
  __shared__ A ks[D * kSmallTile];
  __shared__ A vs[DV * kSmallTile];
  __shared__ A lws[kSmallTile];
  const T* queries = static_cast<const T*>(p.queries);
  const int rows = kThreads / splits, row = threadIdx.x / splits, part = threadIdx.x % splits;
  const int64_t tiles = (p.n + rows - 1) / rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform in the block
    const int64_t i = tile * rows + row;
    const bool valid = i < p.n;
    A q[D];
#pragma unroll
    for (int x = 0; x < D; ++x) q[x] = valid ? ld(queries, i * D + x) : A(0);
    A m = lse_init<A>(), l = 0, acc[DV];
#pragma unroll
    for (int x = 0; x < DV; ++x) acc[x] = 0;
    for (int64_t k0 = 0; k0 < p.m; k0 += kSmallTile) {
      const int count = static_cast<int>(p.m - k0 < kSmallTile ? p.m - k0 : kSmallTile);
      __syncthreads();  // the previous tile is consumed
      stage_components<D>(static_cast<const T*>(p.keys), k0, count, ks);
      stage_components<DV>(static_cast<const T*>(p.values), k0, count, vs);
      for (int j = threadIdx.x; j < count; j += blockDim.x) lws[j] = log_weight2<T, A>(p.log_weights, k0 + j);
      __syncthreads();
#pragma unroll 4
      for (int j = part; j < count; j += splits) {
        A dist = 0;
#pragma unroll
        for (int x = 0; x < D; ++x) {
          const A diff = q[x] - ks[x * kSmallTile + j];
          dist = fma(diff, diff, dist);
        }
        lse_accumulate<DV>(fma(-scale2, dist, lws[j]), vs + j, kSmallTile, m, l, acc);
      }
    }
    for (int off = 1; off < splits; off <<= 1) {  // uniform: every lane takes part
      const A m2 = __shfl_xor_sync(kFullMask, m, off), l2 = __shfl_xor_sync(kFullMask, l, off);
      A acc2[DV];
#pragma unroll
      for (int x = 0; x < DV; ++x) acc2[x] = __shfl_xor_sync(kFullMask, acc[x], off);
      lse_merge<DV>(m, l, acc, m2, l2, acc2);
    }
    if (valid && part == 0) {
      T* out = static_cast<T*>(p.out);
      const A inv = A(1) / l;
#pragma unroll
      for (int x = 0; x < DV; ++x) out[i * DV + x] = Conv<T>::store(acc[x] * inv);
      if (p.lse != nullptr) static_cast<T*>(p.lse)[i] = Conv<T>::store(lse_finish(m, l));
    }
  }
}

// dq_i = 2 scale sum_j w_ij (g_i . v_j - g_i . out_i) (k_j - q_i); one query row per `splits` lanes.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads)
    dq_small_kernel(const KernelMeanBackwardParams p, const typename Acc<T>::type scale2, const int splits) {
  using A = typename Acc<T>::type;
  __shared__ A ks[D * kSmallTile];
  __shared__ A vs[DV * kSmallTile];
  __shared__ A lws[kSmallTile];
  const T* queries = static_cast<const T*>(p.queries);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  const int rows = kThreads / splits, row = threadIdx.x / splits, part = threadIdx.x % splits;
  const int64_t tiles = (p.n + rows - 1) / rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * rows + row;
    const bool valid = i < p.n;
    A q[D], g[DV], acc[D], g_out = 0;
#pragma unroll
    for (int x = 0; x < D; ++x) {
      q[x] = valid ? ld(queries, i * D + x) : A(0);
      acc[x] = 0;
    }
#pragma unroll
    for (int x = 0; x < DV; ++x) {
      g[x] = valid ? ld(grad_out, i * DV + x) : A(0);
      if (valid) g_out = fma(g[x], ld(out, i * DV + x), g_out);
    }
    const A lse2 = valid ? ld(static_cast<const T*>(p.lse), i) * static_cast<A>(kLog2e) : A(0);
    for (int64_t k0 = 0; k0 < p.m; k0 += kSmallTile) {
      const int count = static_cast<int>(p.m - k0 < kSmallTile ? p.m - k0 : kSmallTile);
      __syncthreads();
      stage_components<D>(static_cast<const T*>(p.keys), k0, count, ks);
      stage_components<DV>(static_cast<const T*>(p.values), k0, count, vs);
      for (int j = threadIdx.x; j < count; j += blockDim.x) lws[j] = log_weight2<T, A>(p.log_weights, k0 + j);
      __syncthreads();
#pragma unroll 2
      for (int j = part; j < count; j += splits) {
        A diff[D], dist = 0, gv = 0;
#pragma unroll
        for (int x = 0; x < D; ++x) {
          diff[x] = ks[x * kSmallTile + j] - q[x];
          dist = fma(diff[x], diff[x], dist);
        }
#pragma unroll
        for (int x = 0; x < DV; ++x) gv = fma(g[x], vs[x * kSmallTile + j], gv);
        const A coef = exp2_acc(fma(-scale2, dist, lws[j]) - lse2) * (gv - g_out);
#pragma unroll
        for (int x = 0; x < D; ++x) acc[x] = fma(coef, diff[x], acc[x]);
      }
    }
#pragma unroll
    for (int x = 0; x < D; ++x) acc[x] = sum_lanes(acc[x], splits);
    if (valid && part == 0) {
      T* grad_queries = static_cast<T*>(p.grad_queries);
      const A two_scale = static_cast<A>(2 * p.scale);
#pragma unroll
      for (int x = 0; x < D; ++x) grad_queries[i * D + x] = Conv<T>::store(two_scale * acc[x]);
    }
  }
}

// dv_j = sum_i w_ij g_i, dk_j = 2 scale sum_i w_ij (g_i . v_j - g_i . out_i) (q_i - k_j); one key
// row per `splits` lanes, query tiles staged in shared memory with their lse and g . out.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads)
    dkdv_small_kernel(const KernelMeanBackwardParams p, const typename Acc<T>::type scale2, const int splits) {
  using A = typename Acc<T>::type;
  __shared__ A qs[D * kSmallTile];
  __shared__ A gs[DV * kSmallTile];
  __shared__ A lse2s[kSmallTile];
  __shared__ A g_outs[kSmallTile];
  const T* keys = static_cast<const T*>(p.keys);
  const T* values = static_cast<const T*>(p.values);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  const T* lse = static_cast<const T*>(p.lse);
  const int rows = kThreads / splits, row = threadIdx.x / splits, part = threadIdx.x % splits;
  const int64_t tiles = (p.m + rows - 1) / rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j = tile * rows + row;
    const bool valid = j < p.m;
    A k[D], v[DV], acc_k[D], acc_v[DV];
#pragma unroll
    for (int x = 0; x < D; ++x) {
      k[x] = valid ? ld(keys, j * D + x) : A(0);
      acc_k[x] = 0;
    }
#pragma unroll
    for (int x = 0; x < DV; ++x) {
      v[x] = valid ? ld(values, j * DV + x) : A(0);
      acc_v[x] = 0;
    }
    const A lw2 = valid ? log_weight2<T, A>(p.log_weights, j) : A(0);
    for (int64_t i0 = 0; i0 < p.n; i0 += kSmallTile) {
      const int count = static_cast<int>(p.n - i0 < kSmallTile ? p.n - i0 : kSmallTile);
      __syncthreads();
      stage_components<D>(static_cast<const T*>(p.queries), i0, count, qs);
      stage_components<DV>(grad_out, i0, count, gs);
      for (int e = threadIdx.x; e < count; e += blockDim.x) {
        A g_out = 0;
#pragma unroll
        for (int x = 0; x < DV; ++x) g_out = fma(ld(grad_out, (i0 + e) * DV + x), ld(out, (i0 + e) * DV + x), g_out);
        g_outs[e] = g_out;
        lse2s[e] = ld(lse, i0 + e) * static_cast<A>(kLog2e);
      }
      __syncthreads();
#pragma unroll 2
      for (int e = part; e < count; e += splits) {
        A diff[D], dist = 0, gv = 0;
#pragma unroll
        for (int x = 0; x < D; ++x) {
          diff[x] = qs[x * kSmallTile + e] - k[x];
          dist = fma(diff[x], diff[x], dist);
        }
#pragma unroll
        for (int x = 0; x < DV; ++x) gv = fma(gs[x * kSmallTile + e], v[x], gv);
        const A w = exp2_acc(fma(-scale2, dist, lw2) - lse2s[e]);
        const A coef = w * (gv - g_outs[e]);
#pragma unroll
        for (int x = 0; x < D; ++x) acc_k[x] = fma(coef, diff[x], acc_k[x]);
#pragma unroll
        for (int x = 0; x < DV; ++x) acc_v[x] = fma(w, gs[x * kSmallTile + e], acc_v[x]);
      }
    }
#pragma unroll
    for (int x = 0; x < D; ++x) acc_k[x] = sum_lanes(acc_k[x], splits);
#pragma unroll
    for (int x = 0; x < DV; ++x) acc_v[x] = sum_lanes(acc_v[x], splits);
    if (valid && part == 0) {
      if (p.grad_keys != nullptr) {
        T* grad_keys = static_cast<T*>(p.grad_keys);
        const A two_scale = static_cast<A>(2 * p.scale);
#pragma unroll
        for (int x = 0; x < D; ++x) grad_keys[j * D + x] = Conv<T>::store(two_scale * acc_k[x]);
      }
      if (p.grad_values != nullptr) {
        T* grad_values = static_cast<T*>(p.grad_values);
#pragma unroll
        for (int x = 0; x < DV; ++x) grad_values[j * DV + x] = Conv<T>::store(acc_v[x]);
      }
    }
  }
}

// ---- general d ----

template <typename A> struct TileShared {
  __align__(32) A a[kTile * kLd];         // chunk of the row operand     [32][kLd]
  __align__(32) A b[kTile * kLd];         // chunk of the column operand  [32][kLd]
  __align__(32) A scores[kTile * kLd];    // scores / weights [row][column]
  __align__(16) A cols[kTile * kOutCols]; // output columns of the tile's 32 columns [column][64]
  A col_bias[kTile];                      // base-2 log weights (forward, dq) or lse (dk/dv)
  A col_dot[kTile];                       // g_i . out_i of the query columns (dk)
  A row_norm[kTile], col_norm[kTile];     // squared norms (tensor-core path)
};

// Output-column chunks of the forward pass: at least one, which also writes lse when dv == 0.
__host__ __device__ __forceinline__ int64_t forward_chunks(int64_t dv) {
  return dv > kOutCols ? (dv + kOutCols - 1) / kOutCols : 1;
}

// Thread's tile column c (of 8) and output column c (of 16).
__device__ __forceinline__ int tile_col(int c) { return (threadIdx.x & 3) + 4 * c; }
__device__ __forceinline__ int out_col(int c) { return 4 * (threadIdx.x & 3) + 16 * (c >> 2) + (c & 3); }

// dst[rr * Ld + x] = src[r0 + rr, x0 + x] (zero outside [rows, width]), rr < kTile, x < Cols.
template <int Cols, int Ld, typename T, typename A>
__device__ __forceinline__ void stage_tile(const T* src, int64_t rows, int64_t r0, int64_t width, int64_t x0, A* dst) {
  for (int e = threadIdx.x; e < kTile * Cols; e += kThreads) {
    const int rr = e / Cols, x = e % Cols;
    const int64_t row = r0 + rr, col = x0 + x;
    dst[rr * Ld + x] = row < rows && col < width ? ld(src, row * width + col) : A(0);
  }
}

// res[c] = sum_x (a[a0 + r, x] - b[b0 + tile_col(c), x])^2 (kDistance) or sum_x a[.] b[.]
// over x < width, in 32-wide chunks through shared memory. Called by every thread of the block;
// ends with a barrier, so consecutive calls may reuse the buffers.
template <bool kDistance, typename T, typename A>
__device__ void pair_tile(const T* a, int64_t a_rows, int64_t a0, const T* b, int64_t b_rows, int64_t b0,
                          int64_t width, TileShared<A>& sh, A (&res)[8]) {
  const int r = threadIdx.x >> 2;
#pragma unroll
  for (int c = 0; c < 8; ++c) res[c] = 0;
  for (int64_t x0 = 0; x0 < width; x0 += kChunk) {
    stage_tile<kChunk, kLd>(a, a_rows, a0, width, x0, sh.a);
    stage_tile<kChunk, kLd>(b, b_rows, b0, width, x0, sh.b);
    __syncthreads();
#pragma unroll 8
    for (int x = 0; x < kChunk; ++x) {
      const A av = sh.a[r * kLd + x];
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const A bv = sh.b[tile_col(c) * kLd + x];
        if constexpr (kDistance) {
          const A diff = av - bv;
          res[c] = fma(diff, diff, res[c]);
        } else {
          res[c] = fma(av, bv, res[c]);
        }
      }
    }
    __syncthreads();
  }
}

#if GF_KM_WMMA
// Squared distances of the tile from q.k on tensor cores: dist[c] = max(|q_r|^2 + |k_c|^2 -
// 2 q_r.k_c, 0), with the operands rounded to TF32 (or BF16) once, in shared memory, and the
// norms summed in float32 from the same rounded values.
template <int M>
__device__ void tensor_core_dist(const float* a, int64_t a_rows, int64_t a0, const float* b, int64_t b_rows,
                                 int64_t b0, int64_t width, TileShared<float>& sh, __nv_bfloat16* ha,
                                 __nv_bfloat16* hb, float (&dist)[8]) {
  namespace wmma = nvcuda::wmma;
  constexpr int kK = M == kTF32 ? 8 : 16;
  using In = std::conditional_t<M == kTF32, wmma::precision::tf32, __nv_bfloat16>;
  const int warp = threadIdx.x >> 5, wr = (warp >> 1) * 16, wc = (warp & 1) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> dot;
  wmma::fill_fragment(dot, 0.f);
  float norm = 0.f;  // threads < 32: row operand row tid; threads 32..63: column operand row tid - 32
  for (int64_t x0 = 0; x0 < width; x0 += kChunk) {
    for (int e = threadIdx.x; e < 2 * kTile * kChunk; e += kThreads) {
      const bool is_a = e < kTile * kChunk;
      const int f = is_a ? e : e - kTile * kChunk, rr = f / kChunk, x = f % kChunk;
      const int64_t row = (is_a ? a0 : b0) + rr, col = x0 + x;
      const float v = row < (is_a ? a_rows : b_rows) && col < width ? (is_a ? a : b)[row * width + col] : 0.f;
      if constexpr (M == kTF32) {
        (is_a ? sh.a : sh.b)[rr * kLd + x] = wmma::__float_to_tf32(v);
      } else {
        (is_a ? ha : hb)[rr * kLdHalf + x] = __float2bfloat16_rn(v);
      }
    }
    __syncthreads();
    if (threadIdx.x < 2 * kTile) {
      const int rr = threadIdx.x % kTile;
      const bool is_a = threadIdx.x < kTile;
      for (int x = 0; x < kChunk; ++x) {
        float v;
        if constexpr (M == kTF32) {
          v = (is_a ? sh.a : sh.b)[rr * kLd + x];
        } else {
          v = __bfloat162float((is_a ? ha : hb)[rr * kLdHalf + x]);
        }
        norm = fmaf(v, v, norm);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, In, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, kK, In, wmma::col_major> fb;  // B = K^T
      if constexpr (M == kTF32) {
        wmma::load_matrix_sync(fa, sh.a + wr * kLd + kk, kLd);
        wmma::load_matrix_sync(fb, sh.b + wc * kLd + kk, kLd);
      } else {
        wmma::load_matrix_sync(fa, ha + wr * kLdHalf + kk, kLdHalf);
        wmma::load_matrix_sync(fb, hb + wc * kLdHalf + kk, kLdHalf);
      }
      wmma::mma_sync(dot, fa, fb, dot);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(sh.scores + wr * kLd + wc, dot, kLd, wmma::mem_row_major);
  if (threadIdx.x < kTile) {
    sh.row_norm[threadIdx.x] = norm;
  } else if (threadIdx.x < 2 * kTile) {
    sh.col_norm[threadIdx.x - kTile] = norm;
  }
  __syncthreads();
  const int r = threadIdx.x >> 2;
#pragma unroll
  for (int c = 0; c < 8; ++c)
    dist[c] = fmaxf(sh.row_norm[r] + sh.col_norm[tile_col(c)] - 2.f * sh.scores[r * kLd + tile_col(c)], 0.f);
}
#endif

// acc[c] += sum_jj scores[r, jj] (cols[jj, out_col(c)] - center[c]) over the tile's 32 columns.
template <typename A>
__device__ __forceinline__ void accumulate_tile(const TileShared<A>& sh, const A (&center)[16], A (&acc)[16]) {
  const int r = threadIdx.x >> 2;
#pragma unroll 4
  for (int jj = 0; jj < kTile; ++jj) {
    const A s = sh.scores[r * kLd + jj];
#pragma unroll
    for (int c = 0; c < 16; ++c) acc[c] = fma(s, sh.cols[jj * kOutCols + out_col(c)] - center[c], acc[c]);
  }
}

// Forward, any d and dv: task = (32-query tile, 64-column chunk of out).
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    forward_general_kernel(const KernelMeanParams p, const typename Acc<T>::type scale2) {
  using A = typename Acc<T>::type;
  __shared__ TileShared<A> sh;
  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  const int r = threadIdx.x >> 2;
  const int64_t chunks = forward_chunks(p.dv);
  const int64_t tasks = (p.n + kTile - 1) / kTile * chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {  // uniform in the block
    const int64_t i0 = task / chunks * kTile, c0 = task % chunks * kOutCols, i = i0 + r;
    A m = lse_init<A>(), l = 0, acc[16], zero[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) acc[c] = zero[c] = 0;
    for (int64_t k0 = 0; k0 < p.m; k0 += kTile) {
      __syncthreads();  // the previous tile's scores and columns are consumed
      if (threadIdx.x < kTile)
        sh.col_bias[threadIdx.x] = k0 + threadIdx.x < p.m ? log_weight2<T, A>(p.log_weights, k0 + threadIdx.x) : A(0);
      stage_tile<kOutCols, kOutCols>(static_cast<const T*>(p.values), p.m, k0, p.dv, c0, sh.cols);
      __syncthreads();
      A s[8];
      if constexpr (M == kExact) {
        pair_tile<true>(queries, p.n, i0, keys, p.m, k0, p.d, sh, s);
      } else {
#if GF_KM_WMMA
        __shared__ __align__(32) __nv_bfloat16 ha[M == kBF16 ? kTile * kLdHalf : 1];  // BF16 chunks
        __shared__ __align__(32) __nv_bfloat16 hb[M == kBF16 ? kTile * kLdHalf : 1];
        tensor_core_dist<M>(queries, p.n, i0, keys, p.m, k0, p.d, sh, ha, hb, s);
#else
        pair_tile<true>(queries, p.n, i0, keys, p.m, k0, p.d, sh, s);
#endif
      }
      A tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        s[c] = k0 + tile_col(c) < p.m ? fma(-scale2, s[c], sh.col_bias[tile_col(c)]) : -INFINITY;
        tile_max = fmax(tile_max, s[c]);
      }
      tile_max = fmax(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
      tile_max = fmax(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
      const A alpha = lse_rescale(m, tile_max);  // the row's four lanes keep equal m
      A tile_sum = 0;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const A w = exp2_acc(s[c] - m);
        sh.scores[r * kLd + tile_col(c)] = w;  // the entries this thread alone read or wrote
        tile_sum += w;
      }
      l = fma(l, alpha, tile_sum);  // this lane's part of the row sum
#pragma unroll
      for (int c = 0; c < 16; ++c) acc[c] *= alpha;
      __syncthreads();
      accumulate_tile(sh, zero, acc);
    }
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    if (i < p.n) {
      T* out = static_cast<T*>(p.out);
      const A inv = A(1) / l;
#pragma unroll
      for (int c = 0; c < 16; ++c)
        if (c0 + out_col(c) < p.dv) out[i * p.dv + c0 + out_col(c)] = Conv<T>::store(acc[c] * inv);
      if (c0 == 0 && (threadIdx.x & 3) == 0 && p.lse != nullptr)
        static_cast<T*>(p.lse)[i] = Conv<T>::store(lse_finish(m, l));
    }
  }
}

// dq, any d and dv: task = (32-query tile, 64-column chunk of dq).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dq_general_kernel(const KernelMeanBackwardParams p, const typename Acc<T>::type scale2) {
  using A = typename Acc<T>::type;
  __shared__ TileShared<A> sh;
  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  const int r = threadIdx.x >> 2, cg = threadIdx.x & 3;
  const int64_t chunks = (p.d + kOutCols - 1) / kOutCols;
  const int64_t tasks = (p.n + kTile - 1) / kTile * chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i0 = task / chunks * kTile, c0 = task % chunks * kOutCols, i = i0 + r;
    const bool valid = i < p.n;
    A g_out = 0;  // g_i . out_i: the row's four lanes split the columns
    if (valid)
      for (int64_t x = cg; x < p.dv; x += 4) g_out = fma(ld(grad_out, i * p.dv + x), ld(out, i * p.dv + x), g_out);
    g_out += __shfl_xor_sync(kFullMask, g_out, 1);
    g_out += __shfl_xor_sync(kFullMask, g_out, 2);
    const A lse2 = valid ? ld(static_cast<const T*>(p.lse), i) * static_cast<A>(kLog2e) : A(0);
    A q[16], acc[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      q[c] = valid && c0 + out_col(c) < p.d ? ld(queries, i * p.d + c0 + out_col(c)) : A(0);
      acc[c] = 0;
    }
    for (int64_t k0 = 0; k0 < p.m; k0 += kTile) {
      __syncthreads();
      if (threadIdx.x < kTile)
        sh.col_bias[threadIdx.x] = k0 + threadIdx.x < p.m ? log_weight2<T, A>(p.log_weights, k0 + threadIdx.x) : A(0);
      stage_tile<kOutCols, kOutCols>(keys, p.m, k0, p.d, c0, sh.cols);
      __syncthreads();
      A w[8], gv[8];
      pair_tile<true>(queries, p.n, i0, keys, p.m, k0, p.d, sh, w);
#pragma unroll
      for (int c = 0; c < 8; ++c)
        w[c] = k0 + tile_col(c) < p.m ? exp2_acc(fma(-scale2, w[c], sh.col_bias[tile_col(c)]) - lse2) : A(0);
      pair_tile<false>(grad_out, p.n, i0, static_cast<const T*>(p.values), p.m, k0, p.dv, sh, gv);
#pragma unroll
      for (int c = 0; c < 8; ++c) sh.scores[r * kLd + tile_col(c)] = w[c] * (gv[c] - g_out);
      __syncthreads();
      accumulate_tile(sh, q, acc);
    }
    if (valid) {
      T* grad_queries = static_cast<T*>(p.grad_queries);
      const A two_scale = static_cast<A>(2 * p.scale);
#pragma unroll
      for (int c = 0; c < 16; ++c)
        if (c0 + out_col(c) < p.d) grad_queries[i * p.d + c0 + out_col(c)] = Conv<T>::store(two_scale * acc[c]);
    }
  }
}

// dk and dv, any d and dv: task = (32-key tile, 64-column chunk of dk or of dv); the block's
// task kind is uniform, so the barriers inside its branches are reached by every thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dkdv_general_kernel(const KernelMeanBackwardParams p, const typename Acc<T>::type scale2) {
  using A = typename Acc<T>::type;
  __shared__ TileShared<A> sh;
  const T* queries = static_cast<const T*>(p.queries);
  const T* keys = static_cast<const T*>(p.keys);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  const int r = threadIdx.x >> 2, cg = threadIdx.x & 3;
  const int64_t dk_chunks = p.grad_keys != nullptr ? (p.d + kOutCols - 1) / kOutCols : 0;
  const int64_t dv_chunks = p.grad_values != nullptr ? (p.dv + kOutCols - 1) / kOutCols : 0;
  const int64_t chunks = dk_chunks + dv_chunks;
  const int64_t tasks = (p.m + kTile - 1) / kTile * chunks;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t j0 = task / chunks * kTile, chunk = task % chunks, j = j0 + r;
    const bool is_dk = chunk < dk_chunks, valid = j < p.m;
    const int64_t c0 = (is_dk ? chunk : chunk - dk_chunks) * kOutCols, width = is_dk ? p.d : p.dv;
    const A lw2 = valid ? log_weight2<T, A>(p.log_weights, j) : A(0);
    A k[16], acc[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      k[c] = is_dk && valid && c0 + out_col(c) < p.d ? ld(keys, j * p.d + c0 + out_col(c)) : A(0);
      acc[c] = 0;
    }
    for (int64_t i0 = 0; i0 < p.n; i0 += kTile) {
      __syncthreads();
      {  // lse and g . out of the tile's queries: four lanes per query
        const int64_t i = i0 + r;
        A g_out = 0;
        if (is_dk && i < p.n)
          for (int64_t x = cg; x < p.dv; x += 4) g_out = fma(ld(grad_out, i * p.dv + x), ld(out, i * p.dv + x), g_out);
        g_out += __shfl_xor_sync(kFullMask, g_out, 1);
        g_out += __shfl_xor_sync(kFullMask, g_out, 2);
        if (cg == 0) {
          sh.col_dot[r] = g_out;
          sh.col_bias[r] = i < p.n ? ld(static_cast<const T*>(p.lse), i) * static_cast<A>(kLog2e) : A(0);
        }
      }
      stage_tile<kOutCols, kOutCols>(is_dk ? queries : grad_out, p.n, i0, width, c0, sh.cols);
      __syncthreads();
      A w[8];
      pair_tile<true>(keys, p.m, j0, queries, p.n, i0, p.d, sh, w);
#pragma unroll
      for (int c = 0; c < 8; ++c)
        w[c] = i0 + tile_col(c) < p.n ? exp2_acc(fma(-scale2, w[c], lw2) - sh.col_bias[tile_col(c)]) : A(0);
      if (is_dk) {
        A gv[8];
        pair_tile<false>(static_cast<const T*>(p.values), p.m, j0, grad_out, p.n, i0, p.dv, sh, gv);
#pragma unroll
        for (int c = 0; c < 8; ++c) w[c] *= gv[c] - sh.col_dot[tile_col(c)];
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) sh.scores[r * kLd + tile_col(c)] = w[c];
      __syncthreads();
      accumulate_tile(sh, k, acc);
    }
    if (valid) {
      const A factor = is_dk ? static_cast<A>(2 * p.scale) : A(1);
      T* dst = static_cast<T*>(is_dk ? p.grad_keys : p.grad_values);
#pragma unroll
      for (int c = 0; c < 16; ++c)
        if (c0 + out_col(c) < width) dst[j * width + c0 + out_col(c)] = Conv<T>::store(factor * acc[c]);
    }
  }
}

// ---- launchers ----

// Calls f(std::integral_constant<int, D>) for d in {1, 2, 3, 4, 8}; false for any other d.
template <typename F> bool dispatch_small(int64_t d, F&& f) {
  switch (d) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <typename T>
cudaError_t forward_typed(const KernelMeanParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const A scale2 = static_cast<A>(p.scale * kLog2e);
  const int64_t sms = sm_count();
  if (p.d == p.dv) {
    const int splits = split_count(p.n, sms);
    const int64_t rows = kThreads / splits;
    const unsigned grid = grid_size((p.n + rows - 1) / rows, sms);
    const bool small = dispatch_small(p.d, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      forward_small_kernel<T, D, D><<<grid, kThreads, 0, stream>>>(p, scale2, splits);
    });
    if (small) return cudaGetLastError();
  }
  const unsigned grid = grid_size((p.n + kTile - 1) / kTile * forward_chunks(p.dv), sms);
  if constexpr (std::is_same_v<T, float>) {
    if (p.precision != kPrecisionHighest && p.d >= 32 && has_tensor_cores()) {
      if (p.precision == kPrecisionTF32)
        forward_general_kernel<T, kTF32><<<grid, kThreads, 0, stream>>>(p, scale2);
      else
        forward_general_kernel<T, kBF16><<<grid, kThreads, 0, stream>>>(p, scale2);
      return cudaGetLastError();
    }
  }
  forward_general_kernel<T, kExact><<<grid, kThreads, 0, stream>>>(p, scale2);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const KernelMeanBackwardParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const A scale2 = static_cast<A>(p.scale * kLog2e);
  const int64_t sms = sm_count();
  const bool small_dims = p.d == p.dv && dispatch_small(p.d, [](auto) {});
  if (p.grad_queries != nullptr && p.n > 0 && p.d > 0) {
    if (small_dims) {
      const int splits = split_count(p.n, sms);
      const int64_t rows = kThreads / splits;
      const unsigned grid = grid_size((p.n + rows - 1) / rows, sms);
      dispatch_small(p.d, [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        dq_small_kernel<T, D, D><<<grid, kThreads, 0, stream>>>(p, scale2, splits);
      });
    } else {
      const unsigned grid = grid_size((p.n + kTile - 1) / kTile * ((p.d + kOutCols - 1) / kOutCols), sms);
      dq_general_kernel<T><<<grid, kThreads, 0, stream>>>(p, scale2);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t dkdv_chunks = (p.grad_keys != nullptr ? (p.d + kOutCols - 1) / kOutCols : 0) +
                              (p.grad_values != nullptr ? (p.dv + kOutCols - 1) / kOutCols : 0);
  if (dkdv_chunks > 0) {
    if (small_dims) {
      const int splits = split_count(p.m, sms);
      const int64_t rows = kThreads / splits;
      const unsigned grid = grid_size((p.m + rows - 1) / rows, sms);
      dispatch_small(p.d, [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        dkdv_small_kernel<T, D, D><<<grid, kThreads, 0, stream>>>(p, scale2, splits);
      });
    } else {
      const unsigned grid = grid_size((p.m + kTile - 1) / kTile * dkdv_chunks, sms);
      dkdv_general_kernel<T><<<grid, kThreads, 0, stream>>>(p, scale2);
    }
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_kernel_weighted_mean(const KernelMeanParams& p, Dtype dtype, cudaStream_t stream) {
  if (p.n <= 0 || p.m <= 0) return cudaSuccess;
  if (p.d < 0 || p.dv < 0 || !(p.scale > 0) ||
      (p.precision != kPrecisionHighest && p.precision != kPrecisionTF32 && p.precision != kPrecisionBF16))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::Float32: return forward_typed<float>(p, stream);
    case Dtype::Float64: return forward_typed<double>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// n == 0 still writes dk = dv = 0 (the sums over queries are empty); m == 0 launches nothing.
cudaError_t launch_kernel_weighted_mean_backward(const KernelMeanBackwardParams& p, Dtype dtype,
                                                 cudaStream_t stream) {
  if (p.m <= 0 || p.n < 0) return cudaSuccess;
  if (p.d < 0 || p.dv < 0 || !(p.scale > 0)) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::Float32: return backward_typed<float>(p, stream);
    case Dtype::Float64: return backward_typed<double>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace genflow
