// Small kernels that exercise the CPU emulation harness itself (block barrier,
// warp intrinsics, static and dynamic shared memory, 2-D grids). Plain CUDA:
// nvcc compiles them unchanged.
#pragma once
#include <stdint.h>

#include "cuda/launch.cuh"

namespace fastmlp::cuda {

constexpr int kSelftestThreads = 256;

// partial[b] = sum of the elements block b visits (grid-stride), reduced in
// static shared memory; positives[b] = how many of the block's threads saw a
// positive first element (__syncthreads_count).
template <typename T>
__global__ void selftest_block_sum(const T* __restrict__ x, int64_t n, T* partial, int* positives) {
  __shared__ T s[kSelftestThreads];
  const int t = threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  T acc = T(0);
  for (int64_t i = first; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) acc += x[i];
  const int count = __syncthreads_count(first < n && x[first] > T(0));
  s[t] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) {
    partial[blockIdx.x] = s[0];
    positives[blockIdx.x] = count;
  }
}

// One warp per row: out[r][0] = butterfly (__shfl_xor_sync) sum, out[r][1] =
// tree (__shfl_down_sync) sum. Blocks of 4 warps; 2-D grid to cover many rows.
template <typename T>
__global__ void selftest_warp_row_sum(const T* __restrict__ x, int64_t rows, int64_t cols, T* out) {
  const int lane = threadIdx.x % 32;
  const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t r = block * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps leave together: no warp op sees an exited lane
  T acc = T(0);
  for (int64_t c = lane; c < cols; c += 32) acc += x[r * cols + c];
  T bfly = acc, tree = acc;
  for (int off = 16; off > 0; off /= 2) bfly += __shfl_xor_sync(0xffffffffu, bfly, off);
  for (int off = 16; off > 0; off /= 2) tree += __shfl_down_sync(0xffffffffu, tree, off);
  if (lane == 0) {
    out[r * 2] = bfly;
    out[r * 2 + 1] = tree;
  }
  __syncwarp();
}

// Ten results per thread of one block (any size): the warp intrinsics'
// semantics, checked against a Python model.
constexpr int kWarpOpsOut = 10;
__global__ void selftest_warp_ops(const int* __restrict__ x, int* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = x[t];
  int* o = out + t * kWarpOpsOut;
  o[0] = __shfl_sync(0xffffffffu, v, 3);        // broadcast lane 3
  int scan = v;                                  // inclusive prefix sum
  for (int d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += up;
  }
  o[1] = scan;
  o[2] = __shfl_down_sync(0xffffffffu, v, 3, 8);  // segments of 8
  o[3] = __shfl_xor_sync(0xffffffffu, v, 5, 16);  // segments of 16
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, v > 0));
  o[5] = __all_sync(0xffffffffu, v > -100);
  o[6] = __any_sync(0xffffffffu, v > 100);
  o[7] = __reduce_add_sync(0xffffffffu, v);
  o[8] = static_cast<int>(__match_any_sync(0xffffffffu, v % 3));
  // lanes 0-15 only: a partial mask
  o[9] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -7;
}

// Reverses each chunk of blockDim.x elements through dynamic shared memory.
template <typename T>
__global__ void selftest_reverse_chunks(const T* __restrict__ x, T* y, int64_t n) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* s = reinterpret_cast<T*>(smem);
  const int t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  const int valid = static_cast<int>(n - base < blockDim.x ? n - base : blockDim.x);
  if (t < valid) s[t] = x[base + t];
  __syncthreads();
  if (t < valid) y[base + t] = s[valid - 1 - t];
}

// y = x^T through a padded 32x33 shared tile; blocks (32, 8) on a 2-D grid.
constexpr int kTile = 32, kTileRows = 8;
template <typename T>
__global__ void selftest_transpose(const T* __restrict__ x, T* y, int rows, int cols) {
  __shared__ T tile[kTile][kTile + 1];
  int c = blockIdx.x * kTile + threadIdx.x;
  int r = blockIdx.y * kTile + threadIdx.y;
  for (int j = 0; j < kTile; j += kTileRows) {
    if (r + j < rows && c < cols) tile[threadIdx.y + j][threadIdx.x] = x[(r + j) * cols + c];
  }
  __syncthreads();
  c = blockIdx.y * kTile + threadIdx.x;  // output column = input row
  r = blockIdx.x * kTile + threadIdx.y;
  for (int j = 0; j < kTile; j += kTileRows) {
    if (r + j < cols && c < rows) y[(r + j) * rows + c] = tile[threadIdx.x][threadIdx.y + j];
  }
}

}  // namespace fastmlp::cuda

// A kernel outside fastmlp::cuda with a differently named dynamic buffer: the
// harness TU declares it with FASTMLP_EMU_DYNAMIC_SMEM(fastmlp_emu_tests, buf).
// y[i] = x[i] * (number of floats of dynamic shared memory).
namespace fastmlp_emu_tests {
__global__ void scale_by_smem_size(const float* __restrict__ x, float* y, int64_t n, int smem_floats) {
  extern __shared__ __align__(16) unsigned char buf[];
  float* s = reinterpret_cast<float*>(buf);
  for (int i = threadIdx.x; i < smem_floats; i += blockDim.x) s[i] = 1.0f;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < smem_floats; ++i) total += s[i];
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i] * total;
}
}  // namespace fastmlp_emu_tests
