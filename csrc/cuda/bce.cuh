// Binary cross-entropy with logits on the GPU: one pass computes the loss terms,
// d loss / d input (for a reduced loss) and per-block partial sums; a one-block
// kernel sums the partials in a fixed order (deterministic, no float atomics).
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/math.h"
#include "cuda/launch.cuh"

namespace fastmlp::cuda {

// weight / pos_weight: `period` values repeating along the flattened input.
template <typename scalar_t> struct BcePattern {
  const scalar_t* ptr = nullptr;
  int64_t period = 1;
  FASTMLP_HD acc_t<scalar_t> at(int64_t i) const {
    return ptr ? static_cast<acc_t<scalar_t>>(ptr[period == 1 ? 0 : i % period]) : acc_t<scalar_t>(1);
  }
};

template <typename scalar_t> struct BceParams {
  int64_t n = 0;
  const scalar_t* input = nullptr;
  const scalar_t* target = nullptr;
  BcePattern<scalar_t> weight, pos_weight;
  int64_t reduction = 1;             // 0 none, 1 mean, 2 sum
  scalar_t* loss = nullptr;          // n values (none) or 1 (mean / sum)
  scalar_t* grad_input = nullptr;    // forward: d loss / d input of the reduced loss, or nullptr
  // backward only:
  const scalar_t* grad_output = nullptr;  // n values (none) or 1
  scalar_t* grad_target = nullptr;
};

constexpr int kBceThreads = 256;
constexpr int kBceMaxBlocks = 1024;

// Block-wide sum in a fixed tree order; every thread must call it.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc v, acc* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = v;
  __syncthreads();
  for (int width = kBceThreads / 2; width > 0; width /= 2) {
    if (tid < width) scratch[tid] += scratch[tid + width];
    __syncthreads();
  }
  return scratch[0];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBceThreads) bce_forward_kernel(BceParams<scalar_t> p, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kBceThreads];
  const acc scale = p.reduction == 1 ? acc(1) / static_cast<acc>(p.n) : acc(1);
  acc sum = acc(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBceThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBceThreads + threadIdx.x; i < p.n; i += stride) {
    const auto t = fastmlp::bce_terms<acc>(static_cast<acc>(p.input[i]), static_cast<acc>(p.target[i]),
                                           p.weight.at(i), p.pos_weight.at(i));
    if (p.reduction == 0) {
      p.loss[i] = static_cast<scalar_t>(t.loss);
    } else {
      sum += t.loss;
      if (p.grad_input != nullptr) p.grad_input[i] = static_cast<scalar_t>(t.grad_input * scale);
    }
  }
  if (p.reduction != 0) {
    const acc block = block_sum(sum, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = block;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBceThreads) bce_finish_kernel(BceParams<scalar_t> p, const acc_t<scalar_t>* partial,
                                                                  int blocks) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kBceThreads];
  acc sum = acc(0);
  for (int b = threadIdx.x; b < blocks; b += kBceThreads) sum += partial[b];
  const acc total = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    // mean of an empty input is NaN, as in PyTorch (0 / 0)
    p.loss[0] = static_cast<scalar_t>(p.reduction == 1 ? total / static_cast<acc>(p.n) : total);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBceThreads) bce_backward_kernel(BceParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const bool reduced = p.reduction != 0;
  const acc mean_scale = p.reduction == 1 ? acc(1) / static_cast<acc>(p.n) : acc(1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBceThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBceThreads + threadIdx.x; i < p.n; i += stride) {
    const acc x = static_cast<acc>(p.input[i]);
    const acc w = p.weight.at(i), pw = p.pos_weight.at(i);
    const acc scale = static_cast<acc>(p.grad_output[reduced ? 0 : i]) * mean_scale;
    if (p.grad_input != nullptr) {
      const auto t = fastmlp::bce_terms<acc>(x, static_cast<acc>(p.target[i]), w, pw);
      p.grad_input[i] = static_cast<scalar_t>(t.grad_input * scale);
    }
    if (p.grad_target != nullptr) p.grad_target[i] = static_cast<scalar_t>(fastmlp::bce_grad_target(x, w, pw) * scale);
  }
}

inline int bce_blocks(int64_t n) {
  const int64_t per_block = kBceThreads * 4;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kBceMaxBlocks ? kBceMaxBlocks : blocks));
}

// Accumulator elements of workspace bce_forward needs.
inline int64_t bce_workspace_elems(int64_t n) { return bce_blocks(n); }

template <typename scalar_t>
void launch_bce_forward(const BceParams<scalar_t>& p, acc_t<scalar_t>* workspace, cudaStream_t stream) {
  if (p.reduction == 0 && p.n == 0) return;
  const int blocks = bce_blocks(p.n);
  launch_kernel(bce_forward_kernel<scalar_t>, dim3(blocks), dim3(kBceThreads), 0, stream, p, workspace);
  if (p.reduction != 0) {
    launch_kernel(bce_finish_kernel<scalar_t>, dim3(1), dim3(kBceThreads), 0, stream, p,
                  static_cast<const acc_t<scalar_t>*>(workspace), blocks);
  }
}

template <typename scalar_t> void launch_bce_backward(const BceParams<scalar_t>& p, cudaStream_t stream) {
  if (p.n == 0) return;
  launch_kernel(bce_backward_kernel<scalar_t>, dim3(bce_blocks(p.n)), dim3(kBceThreads), 0, stream, p);
}

}  // namespace fastmlp::cuda
