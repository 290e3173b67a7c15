// Mean squared error on the GPU: one pass computes the squared errors, d loss /
// d input (for a reduced loss) and per-block partial sums; loss_finish_kernel
// adds the partials in a fixed order (deterministic, no float atomics).
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/loss_math.h"
#include "cuda/loss_reduce.cuh"

namespace fastmlp::cuda {

template <typename scalar_t> struct MseParams {
  int64_t n = 0;
  const scalar_t* input = nullptr;
  const scalar_t* target = nullptr;
  int64_t reduction = 1;           // 0 none, 1 mean, 2 sum
  scalar_t* loss = nullptr;        // n values (none) or 1 (mean / sum)
  scalar_t* grad_input = nullptr;  // forward: d loss / d input of the reduced loss, or nullptr
  // backward only:
  const scalar_t* grad_output = nullptr;  // n values (none) or 1
  scalar_t* grad_target = nullptr;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kLossThreads) mse_forward_kernel(MseParams<scalar_t> p, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kLossThreads];
  const acc scale = p.reduction == 1 ? acc(1) / static_cast<acc>(p.n) : acc(1);
  acc sum = acc(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kLossThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kLossThreads + threadIdx.x; i < p.n; i += stride) {
    const auto t = fastmlp::mse_terms<acc>(static_cast<acc>(p.input[i]), static_cast<acc>(p.target[i]));
    if (p.reduction == 0) {
      p.loss[i] = static_cast<scalar_t>(t.loss);
    } else {
      sum += t.loss;
      if (p.grad_input != nullptr) p.grad_input[i] = static_cast<scalar_t>(t.grad_input * scale);
    }
  }
  if (p.reduction != 0) {
    const acc block = loss_block_sum(sum, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = block;
  }
}

template <typename scalar_t> __global__ void __launch_bounds__(kLossThreads) mse_backward_kernel(MseParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const bool reduced = p.reduction != 0;
  const acc mean_scale = p.reduction == 1 ? acc(1) / static_cast<acc>(p.n) : acc(1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kLossThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kLossThreads + threadIdx.x; i < p.n; i += stride) {
    const acc scale = static_cast<acc>(p.grad_output[reduced ? 0 : i]) * mean_scale;
    const acc g =
        fastmlp::mse_terms<acc>(static_cast<acc>(p.input[i]), static_cast<acc>(p.target[i])).grad_input * scale;
    if (p.grad_input != nullptr) p.grad_input[i] = static_cast<scalar_t>(g);
    if (p.grad_target != nullptr) p.grad_target[i] = static_cast<scalar_t>(-g);
  }
}

inline int mse_blocks(int64_t n) { return loss_blocks(n, 4); }

// Accumulator elements of workspace launch_mse_forward needs.
inline int64_t mse_workspace_elems(int64_t n) { return mse_blocks(n); }

template <typename scalar_t>
void launch_mse_forward(const MseParams<scalar_t>& p, acc_t<scalar_t>* workspace, cudaStream_t stream) {
  if (p.reduction == 0 && p.n == 0) return;
  const int blocks = mse_blocks(p.n);
  launch_kernel(mse_forward_kernel<scalar_t>, dim3(blocks), dim3(kLossThreads), 0, stream, p, workspace);
  if (p.reduction != 0) {
    launch_kernel(loss_finish_kernel<scalar_t, acc_t<scalar_t>>, dim3(1), dim3(kLossThreads), 0, stream,
                  static_cast<const acc_t<scalar_t>*>(workspace), blocks, p.reduction,
                  static_cast<const acc_t<scalar_t>*>(nullptr), p.n, p.loss);
  }
}

template <typename scalar_t> void launch_mse_backward(const MseParams<scalar_t>& p, cudaStream_t stream) {
  if (p.n == 0) return;
  launch_kernel(mse_backward_kernel<scalar_t>, dim3(mse_blocks(p.n)), dim3(kLossThreads), 0, stream, p);
}

}  // namespace fastmlp::cuda
