// Emulation stand-in for CUDA's <mma.h>: the WMMA subset kernel_mean.cu uses (TF32 m16n16k8 and
// BF16 m16n16k16 products with float accumulation). Every lane holds the whole fragment (the
// hardware's element-to-lane map is unspecified, and the kernels never index fragments); mma_sync
// adds the products in increasing k with fmaf, so the emulation checks the data flow and the
// operand rounding, not the tensor core's internal summation order or rounding.
#pragma once

#include "../cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = shape<Use, M, N, K>::rows, cols = shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major (r, c)
};

inline float __float_to_tf32(float v) {  // cvt.rna.tf32.f32: 10 mantissa bits, ties away from 0
  if (!std::isfinite(v)) return v;
  return emu::bitsf((emu::fbits(v) + 0x1000u) & 0xffffe000u);
}

template <typename F, typename V> void fill_fragment(F& f, V v) {
  for (auto& e : f.x) e = static_cast<typename F::element_type>(v);
}

// The warp-collective operations: every lane of the warp must arrive (as on the GPU).
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  emu::shuffle(0xffffffffu, 0, emu::kShflIdx, 0, 32);  // convergence point
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? ptr[c * ldm + r] : ptr[r * ldm + c];
}

template <typename E> float widen(E v) { return static_cast<float>(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int M, int N, int K, typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  emu::shuffle(0xffffffffu, 0, emu::kShflIdx, 0, 32);
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[r * N + j];
      for (int k = 0; k < K; ++k) acc = fmaf(widen(a.x[r * K + k]), widen(b.x[k * N + j]), acc);
      d.x[r * N + j] = acc;
    }
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  emu::shuffle(0xffffffffu, 0, emu::kShflIdx, 0, 32);
  if (emu::lane_id() == 0)  // one lane writes the tile (every lane holds all of it)
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < N; ++j)
        (layout == mem_row_major ? ptr[r * ldm + j] : ptr[j * ldm + r]) = f.x[r * N + j];
  emu::sync_warp(0xffffffffu);  // the tile is complete for the warp after the call
}

}  // namespace wmma
}  // namespace nvcuda
