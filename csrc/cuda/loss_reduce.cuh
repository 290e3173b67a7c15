// Deterministic reductions of the MSE / cross-entropy kernels: a block-wide sum
// in a fixed tree order, and a one-block kernel that adds per-block partials in
// a fixed order and writes the reduced loss (no float atomics).
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/math.h"
#include "cuda/launch.cuh"

namespace fastmlp::cuda {

constexpr int kLossThreads = 256;
constexpr int kLossMaxBlocks = 1024;

// Block-wide sum in a fixed tree order over kLossThreads threads; every thread
// must call it, and every thread gets the sum. May be called repeatedly.
template <typename acc> __device__ __forceinline__ acc loss_block_sum(acc v, acc* scratch) {
  const int tid = threadIdx.x;
  __syncthreads();  // a previous call's readers are done with scratch[0]
  scratch[tid] = v;
  __syncthreads();
  for (int width = kLossThreads / 2; width > 0; width /= 2) {
    if (tid < width) scratch[tid] += scratch[tid + width];
    __syncthreads();
  }
  return scratch[0];
}

// The sum of `blocks` partials, in a fixed order (every thread gets it).
template <typename acc> __device__ __forceinline__ acc loss_sum_partials(const acc* partial, int blocks, acc* scratch) {
  acc sum = acc(0);
  for (int b = threadIdx.x; b < blocks; b += kLossThreads) sum += partial[b];
  return loss_block_sum(sum, scratch);
}

// loss[0] = sum of the partials, divided by *denominator (device) when given, or
// by `count` for a mean (0 / 0 = NaN for an empty mean, as torch).
template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kLossThreads)
    loss_finish_kernel(const acc* partial, int blocks, int64_t reduction, const acc* denominator, int64_t count,
                       scalar_t* loss) {
  __shared__ acc scratch[kLossThreads];
  const acc total = loss_sum_partials(partial, blocks, scratch);
  if (threadIdx.x == 0) {
    const acc denom = denominator != nullptr ? *denominator : static_cast<acc>(count);
    loss[0] = static_cast<scalar_t>(reduction == 1 ? total / denom : total);
  }
}

// Blocks of kLossThreads threads for `work` items at `per_thread` items a thread.
inline int loss_blocks(int64_t work, int64_t per_thread) {
  const int64_t per_block = kLossThreads * per_thread;
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kLossMaxBlocks ? kLossMaxBlocks : blocks));
}

}  // namespace fastmlp::cuda
