// Softmax cross-entropy on the GPU (log-softmax and NLL in one pass over the
// logits). Launches:
//   1. ce_prepare_kernel: per-block sums of the mean's denominator (w_t over the
//      rows not ignored; the row count for probability targets), checking each
//      class index (an index outside [0, C) that is not ignore_index traps, as
//      torch's device-side assert);
//   2. ce_prepare_finish_kernel (one block): the denominator and sum_c w_c, in a
//      fixed order, into stats[0..2);
//   3. ce_rows_kernel: a group of kGroup threads per row (1 for narrow rows, a
//      warp for wide ones: lanes stride over the classes, online softmax per lane,
//      merged by xor-shuffles) computes the row's loss and, when asked, its
//      gradient, and per-block partial sums of the loss;
//   4. loss_finish_kernel (reduced losses): the partials in a fixed order.
// Deterministic (no float atomics). The math is common/loss_math.h's.
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/loss_math.h"
#include "cuda/loss_reduce.cuh"

namespace fastmlp::cuda {

template <typename scalar_t> struct CeParams {
  int64_t rows = 0, classes = 0;
  const scalar_t* input = nullptr;          // [rows, classes]
  const int64_t* target_index = nullptr;    // [rows] class indices, or
  const scalar_t* target_prob = nullptr;    // [rows, classes] probabilities
  const scalar_t* weight = nullptr;         // [classes] or nullptr
  int64_t ignore_index = -100;
  acc_t<scalar_t> smoothing = acc_t<scalar_t>(0);
  int64_t reduction = 1;                    // 0 none, 1 mean, 2 sum
  scalar_t* loss = nullptr;                 // forward: [rows] (none) or [1]
  scalar_t* grad_input = nullptr;           // [rows, classes] or nullptr
  const scalar_t* grad_output = nullptr;    // backward: [rows] (none) or [1]; nullptr in forward
  acc_t<scalar_t>* stats = nullptr;         // workspace: [denominator, sum of class weights]
};

// Rows of at most this many classes get one thread each, wider rows a warp.
constexpr int64_t kCeThreadPerRowMaxClasses = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kLossThreads) ce_prepare_kernel(CeParams<scalar_t> p, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kLossThreads];
  acc sum = acc(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kLossThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kLossThreads + threadIdx.x; r < p.rows; r += stride) {
    if (p.target_index == nullptr) {
      sum += acc(1);
      continue;
    }
    const int64_t t = p.target_index[r];
    if (t == p.ignore_index) continue;
    if (t < 0 || t >= p.classes) __trap();  // torch: "Target t is out of bounds" (device-side assert)
    sum += p.weight != nullptr ? static_cast<acc>(p.weight[t]) : acc(1);
  }
  const acc block = loss_block_sum(sum, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = block;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLossThreads)
    ce_prepare_finish_kernel(CeParams<scalar_t> p, const acc_t<scalar_t>* partial, int blocks) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[kLossThreads];
  const acc denominator = loss_sum_partials(partial, blocks, scratch);
  acc w = acc(0);
  for (int64_t c = threadIdx.x; c < p.classes; c += kLossThreads) {
    w += p.weight != nullptr ? static_cast<acc>(p.weight[c]) : acc(1);
  }
  const acc weight_sum = loss_block_sum(w, scratch);
  if (threadIdx.x == 0) {
    p.stats[0] = denominator;
    p.stats[1] = weight_sum;
  }
}

// The sum over the kGroup lanes of a row (every lane gets it).
template <int kGroup, typename acc> __device__ __forceinline__ acc group_sum(acc v) {
  for (int offset = kGroup / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kLossThreads) ce_rows_kernel(CeParams<scalar_t> p, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  static_assert(kGroup == 1 || kGroup == 32, "a row takes one thread or one warp");
  __shared__ acc scratch[kLossThreads];
  constexpr int kRowsPerBlock = kLossThreads / kGroup;
  const int lane = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t C = p.classes;
  const bool reduced = p.reduction != 0;
  const bool index = p.target_index != nullptr;
  const acc denominator = p.stats[0];
  const CeConstants<acc> k = ce_constants<acc>(p.smoothing, C, p.stats[1]);
  // the reduced loss's gradient scale: 1 (sum) or 1 / denominator (mean), times
  // the incoming gradient in backward
  acc reduced_scale = p.reduction == 1 ? acc(1) / denominator : acc(1);
  if (reduced && p.grad_output != nullptr) reduced_scale *= static_cast<acc>(p.grad_output[0]);
  acc block_loss = acc(0);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = first; r < p.rows; r += stride) {  // the same trip count for every lane of a group
    const scalar_t* x = p.input + r * C;
    scalar_t* g = p.grad_input != nullptr ? p.grad_input + r * C : nullptr;
    const scalar_t* y = index ? nullptr : p.target_prob + r * C;
    const int64_t t = index ? p.target_index[r] : -1;
    if (index && t == p.ignore_index) {
      if (g != nullptr) {
        for (int64_t c = lane; c < C; c += kGroup) g[c] = static_cast<scalar_t>(0);
      }
      if (lane == 0 && !reduced && p.grad_output == nullptr) p.loss[r] = static_cast<scalar_t>(0);
      continue;
    }
    if (index && (t < 0 || t >= C)) __trap();  // checked by ce_prepare_kernel; never read out of bounds
    SoftmaxStats<acc> s = softmax_stats_empty<acc>();
    acc qsum = acc(0);
    for (int64_t c = lane; c < C; c += kGroup) {
      s = softmax_stats_push(s, static_cast<acc>(x[c]));
      if (!index) {
        qsum += ce_prob_q(k, static_cast<acc>(y[c]), p.weight != nullptr ? static_cast<acc>(p.weight[c]) : acc(1));
      }
    }
    for (int offset = kGroup / 2; offset > 0; offset /= 2) {
      SoftmaxStats<acc> other;
      other.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
      other.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
      s = softmax_stats_merge(s, other);
    }
    const acc lse = softmax_lse(s);
    const acc w_t = index ? (p.weight != nullptr ? static_cast<acc>(p.weight[t]) : acc(1)) : acc(0);
    qsum = index ? ce_index_qsum(k, w_t) : group_sum<kGroup>(qsum);
    const acc row_scale = reduced ? reduced_scale
                                  : (p.grad_output != nullptr ? static_cast<acc>(p.grad_output[r]) : acc(1));
    acc loss = acc(0);
    for (int64_t c = lane; c < C; c += kGroup) {
      const acc xc = static_cast<acc>(x[c]);
      const acc w_c = p.weight != nullptr ? static_cast<acc>(p.weight[c]) : acc(1);
      const acc q = index ? ce_index_q(k, c == t, w_t, w_c) : ce_prob_q(k, static_cast<acc>(y[c]), w_c);
      if (!index || ce_index_term_used(k, c == t)) loss += ce_loss_term(q, lse, xc);
      if (g != nullptr) g[c] = static_cast<scalar_t>(ce_grad_term(q, qsum, lse, xc, row_scale));
    }
    loss = group_sum<kGroup>(loss);
    if (lane == 0) {
      if (!reduced && p.grad_output == nullptr) p.loss[r] = static_cast<scalar_t>(loss);
      block_loss += loss;
    }
  }
  if (reduced && p.grad_output == nullptr) {
    const acc block = loss_block_sum(block_loss, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = block;
  }
}

inline int ce_prepare_blocks(int64_t rows) { return loss_blocks(rows, 4); }
inline int ce_row_group(int64_t classes) { return classes <= kCeThreadPerRowMaxClasses ? 1 : 32; }
inline int ce_row_blocks(int64_t rows, int64_t classes) {
  const int64_t per_block = kLossThreads / ce_row_group(classes);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kLossMaxBlocks ? kLossMaxBlocks : blocks));
}

// Accumulator elements of workspace the launches need: stats, then the partials
// of the prepare pass, then those of the row pass.
inline int64_t ce_workspace_elems(int64_t rows, int64_t classes) {
  return 2 + ce_prepare_blocks(rows) + ce_row_blocks(rows, classes);
}

// Forward (p.grad_output == nullptr: writes p.loss and, when set, the reduced
// loss's p.grad_input) or backward (p.grad_output set: writes p.grad_input).
template <typename scalar_t>
void launch_cross_entropy(CeParams<scalar_t> p, acc_t<scalar_t>* workspace, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const bool forward = p.grad_output == nullptr;
  if (p.rows == 0 && !(forward && p.reduction != 0)) return;  // nothing to write
  const int prepare_blocks = ce_prepare_blocks(p.rows);
  p.stats = workspace;
  acc* prepare_partial = workspace + 2;
  acc* row_partial = prepare_partial + prepare_blocks;
  launch_kernel(ce_prepare_kernel<scalar_t>, dim3(prepare_blocks), dim3(kLossThreads), 0, stream, p, prepare_partial);
  launch_kernel(ce_prepare_finish_kernel<scalar_t>, dim3(1), dim3(kLossThreads), 0, stream, p,
                static_cast<const acc*>(prepare_partial), prepare_blocks);
  const int blocks = ce_row_blocks(p.rows, p.classes);
  if (ce_row_group(p.classes) == 1) {
    launch_kernel(ce_rows_kernel<scalar_t, 1>, dim3(blocks), dim3(kLossThreads), 0, stream, p, row_partial);
  } else {
    launch_kernel(ce_rows_kernel<scalar_t, 32>, dim3(blocks), dim3(kLossThreads), 0, stream, p, row_partial);
  }
  if (forward && p.reduction != 0) {
    launch_kernel(loss_finish_kernel<scalar_t, acc>, dim3(1), dim3(kLossThreads), 0, stream,
                  static_cast<const acc*>(row_partial), blocks, p.reduction, static_cast<const acc*>(p.stats),
                  int64_t(0), p.loss);
  }
}

}  // namespace fastmlp::cuda
