// Tiled GEMM for the Linear layers, with everything around it fused:
//   C[M, N] = epilogue(A[M, K] . B[K, N])
// - operands are strided views (any strides, 64-bit index math), so x.W^T,
//   g.W and g^T.x are all the same kernel without transposed copies;
// - A may be masked by a saved ReLU output (the backward's `grad * (y > 0)`),
//   applied while the tile is loaded;
// - the row sums of (masked) A (the bias gradient, when A = g^T) come out of the
//   same pass;
// - epilogue: + bias[n], ReLU, cast to the storage type;
// - split-K for tall reductions (dW over a large batch) writes per-split
//   partials that a second kernel sums in a fixed order: deterministic, no
//   floating-point atomics.
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/math.h"
#include "cuda/launch.cuh"

namespace fastmlp::cuda {

// Element (r, c) at ptr[r * row_stride + c * col_stride].
template <typename T> struct Strided {
  const T* ptr = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  FASTMLP_HD T at(int64_t r, int64_t c) const { return ptr[r * row_stride + c * col_stride]; }
};

template <typename scalar_t> struct GemmParams {
  int64_t M = 0, N = 0, K = 0;
  Strided<scalar_t> a;       // [M, K]
  Strided<scalar_t> a_mask;  // ptr == nullptr: none; else A(r, c) = 0 where the ReLU output mask(r, c) <= 0
  Strided<scalar_t> b;       // [K, N]
  const scalar_t* bias = nullptr;  // [N] or nullptr
  bool relu = false;
  scalar_t* c = nullptr;           // [M, N], row-major contiguous
  scalar_t* a_rowsum = nullptr;    // [M] or nullptr: sum over k of (masked) A
  int splits = 1;                  // K is cut into this many chunks of k_chunk
  int64_t k_chunk = 0;
};

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
constexpr int kThreadsX = 16, kThreadsY = 16;  // each thread computes a 4 x 4 micro-tile
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kMicro = 4;

// Output tiles along M, and of the whole output: one block each (grid.x); an
// empty N still gets a column of tiles for the row sums.
FASTMLP_HD int64_t gemm_m_tiles(int64_t M) { return (M + kTileM - 1) / kTileM; }
FASTMLP_HD int64_t gemm_grid_tiles(int64_t M, int64_t N) {
  return gemm_m_tiles(M) * (((N > 0 ? N : 1) + kTileN - 1) / kTileN);
}

// Stage one operand tile into shared memory, tile[k][i] for i along M (or N).
// The walk order follows the operand's unit stride so global loads coalesce.
template <typename scalar_t, typename acc, int kTileI>
__device__ __forceinline__ void load_tile(acc (*tile)[kTileI + 1], const Strided<scalar_t>& src,
                                          const Strided<scalar_t>& mask, bool i_is_row, int64_t i0,
                                          int64_t i_end, int64_t k0, int64_t k_end, int tid) {
  // Element (i, k) of the operand: A(i, k) when i indexes rows, B(k, i) otherwise.
  const bool k_fastest = i_is_row ? src.col_stride == 1 : src.row_stride == 1;
  constexpr int kElems = kTileI * kTileK;
  for (int e = tid; e < kElems; e += kThreads) {
    const int i = k_fastest ? e / kTileK : e % kTileI;
    const int k = k_fastest ? e % kTileK : e / kTileI;
    const int64_t gi = i0 + i, gk = k0 + k;
    acc v = acc(0);
    if (gi < i_end && gk < k_end) {
      const int64_t r = i_is_row ? gi : gk, c = i_is_row ? gk : gi;
      v = static_cast<acc>(src.at(r, c));
      if (mask.ptr != nullptr && !fastmlp::relu_passes(mask.at(r, c))) v = acc(0);
    }
    tile[k][i] = v;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams<scalar_t> p, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  __shared__ acc a_tile[kTileK][kTileM + 1];
  __shared__ acc b_tile[kTileK][kTileN + 1];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  // The output tiles on grid.x (up to 2^31 - 1 of them), M-tiles fastest: grid.y
  // would cap the N-tiles at 65535 (N <= 4,194,240).
  const int64_t m_tiles = gemm_m_tiles(p.M);
  const int64_t tile = blockIdx.x;
  const int64_t m0 = (tile % m_tiles) * kTileM;
  const int64_t n0 = (tile / m_tiles) * kTileN;
  const int split = blockIdx.z;
  const int64_t k_begin = split * p.k_chunk;
  const int64_t k_end = k_begin + p.k_chunk < p.K ? k_begin + p.k_chunk : p.K;
  const bool want_rowsum = p.a_rowsum != nullptr && n0 == 0;
  const Strided<scalar_t> no_mask;

  acc sum[kMicro][kMicro];
  for (int i = 0; i < kMicro; ++i)
    for (int j = 0; j < kMicro; ++j) sum[i][j] = acc(0);
  acc rowsum = acc(0);  // thread tid < kTileM owns row m0 + tid

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    load_tile<scalar_t, acc, kTileM>(a_tile, p.a, p.a_mask, true, m0, p.M, k0, k_end, tid);
    load_tile<scalar_t, acc, kTileN>(b_tile, p.b, no_mask, false, n0, p.N, k0, k_end, tid);
    __syncthreads();
    if (want_rowsum && tid < kTileM) {
      for (int k = 0; k < kTileK; ++k) rowsum += a_tile[k][tid];
    }
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      acc a_frag[kMicro], b_frag[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a_frag[i] = a_tile[k][ty + i * kThreadsY];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b_frag[j] = b_tile[k][tx + j * kThreadsX];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) sum[i][j] += a_frag[i] * b_frag[j];
    }
    __syncthreads();
  }

  const bool direct = p.splits == 1;
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + ty + i * kThreadsY;
    if (m >= p.M) continue;
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + tx + j * kThreadsX;
      if (n >= p.N) continue;
      if (direct) {
        acc v = sum[i][j];
        if (p.bias != nullptr) v += static_cast<acc>(p.bias[n]);
        if (p.relu) v = fastmlp::relu(v);
        p.c[m * p.N + n] = static_cast<scalar_t>(v);
      } else {
        partial[(static_cast<int64_t>(split) * p.M + m) * p.N + n] = sum[i][j];
      }
    }
  }
  if (want_rowsum && tid < kTileM && m0 + tid < p.M) {
    const int64_t m = m0 + tid;
    if (direct) {
      p.a_rowsum[m] = static_cast<scalar_t>(rowsum);
    } else {
      partial[static_cast<int64_t>(p.splits) * p.M * p.N + split * p.M + m] = rowsum;
    }
  }
}

// Sums the split-K partials in split order, then the epilogue. One thread per
// output element of C, then one per row sum.
template <typename scalar_t>
__global__ void gemm_reduce_splits_kernel(GemmParams<scalar_t> p, const acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  const int64_t mn = p.M * p.N;
  const int64_t rows = p.a_rowsum != nullptr ? p.M : 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < mn + rows;
       idx += stride) {
    acc v = acc(0);
    if (idx < mn) {
      for (int s = 0; s < p.splits; ++s) v += partial[s * mn + idx];
      const int64_t n = idx % p.N;
      if (p.bias != nullptr) v += static_cast<acc>(p.bias[n]);
      if (p.relu) v = fastmlp::relu(v);
      p.c[idx] = static_cast<scalar_t>(v);
    } else {
      const int64_t m = idx - mn;
      for (int s = 0; s < p.splits; ++s) v += partial[p.splits * mn + s * p.M + m];
      p.a_rowsum[m] = static_cast<scalar_t>(v);
    }
  }
}

FASTMLP_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Which GEMMs of a layer path run on cuBLAS (through ATen, cuda/layer_backend.cuh)
// instead of gemm_kernel: every half / bf16 one (tensor cores; gemm_kernel
// would convert to float and run FFMA) and every one of at least
// kCublasMinMacs multiply-adds, where gemm_kernel's SIMT tiles (no double
// buffering, scalar shared loads: ~24 TFLOP/s fp32 on an H100/H200 by the
// estimate of issue 19, cuBLAS ~50) lose more than the launches its fused
// epilogues save (the ReLU mask and the bias gradient: two, ~2-3 us each).
// 2^26 multiply-adds take gemm_kernel ~5.6 us at that rate and cuBLAS ~2.7 us.
// Not measured on a GPU yet: a first-use timing on the device is to replace it.
constexpr int64_t kCublasMinMacs = int64_t(1) << 26;

inline bool gemm_on_cublas(int64_t M, int64_t N, int64_t K, bool half_type) {
  return half_type ||
         static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >= static_cast<double>(kCublasMinMacs);
}

// Split K when the output has too few tiles to fill the device and K is long
// enough to be worth it. Depends only on the shape and the SM count, so the
// summation order is fixed for a given device.
inline void choose_splits(int64_t M, int64_t N, int64_t K, int sm_count, int* splits, int64_t* k_chunk) {
  // N == 0 still launches one tile column (for the row sums); M == 0 launches nothing.
  const int64_t tiles = ceil_div(M, kTileM) * ceil_div(N > 0 ? N : 1, kTileN);
  int64_t s = 1;
  const int64_t min_k_per_split = 8 * kTileK;
  if (tiles > 0 && tiles < 2 * sm_count && K >= 2 * min_k_per_split) {
    s = ceil_div(2 * sm_count, tiles);
    const int64_t by_k = K / min_k_per_split;
    if (s > by_k) s = by_k;
    if (s > 64) s = 64;
    if (s < 1) s = 1;
  }
  int64_t chunk = ceil_div(ceil_div(K, s), kTileK) * kTileK;
  if (chunk == 0) chunk = kTileK;
  *splits = static_cast<int>(K == 0 ? 1 : ceil_div(K, chunk));
  *k_chunk = chunk;
}

// Accumulator elements of workspace the launch needs (0 without split-K).
template <typename scalar_t> int64_t gemm_workspace_elems(const GemmParams<scalar_t>& p) {
  return p.splits > 1 ? static_cast<int64_t>(p.splits) * (p.M * p.N + (p.a_rowsum ? p.M : 0)) : 0;
}

// Fill p.splits / p.k_chunk with choose_splits() before calling; `workspace`
// holds gemm_workspace_elems(p) accumulators.
template <typename scalar_t>
void launch_gemm(const GemmParams<scalar_t>& p, acc_t<scalar_t>* workspace, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) {
    // Nothing to compute except row sums over an empty K... or an empty M.
    if (p.M == 0 || p.a_rowsum == nullptr) return;
  }
  const dim3 grid(static_cast<unsigned>(gemm_grid_tiles(p.M, p.N)), 1, static_cast<unsigned>(p.splits));
  launch_kernel(gemm_kernel<scalar_t>, grid, dim3(kThreadsX, kThreadsY), 0, stream, p, workspace);
  if (p.splits > 1) {
    const int64_t total = p.M * p.N + (p.a_rowsum ? p.M : 0);
    const int64_t blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
    launch_kernel(gemm_reduce_splits_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream,
                  p, static_cast<const acc_t<scalar_t>*>(workspace));
  }
}

}  // namespace fastmlp::cuda
