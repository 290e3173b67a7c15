// The optimizer update on the GPU: every parameter of a step in one launch
// (a multi-tensor kernel: each block takes one chunk of one parameter; Adam's
// step counts kept on the device advanced by one small launch before it), with
// gradient clipping as two small kernels before it (per-chunk sums of squares,
// then one block that adds them in a fixed order into the clipping
// coefficient, which the update reads from device memory: no host sync).
// Pure CUDA (no torch): also compiled by the CPU emulation harness.
#pragma once
#include <stdint.h>

#include "common/optim_math.h"
#include "cuda/launch.cuh"

namespace fastmlp::cuda {

constexpr int kOptimThreads = 256;
constexpr int64_t kOptimChunk = 4096;  // elements per block
constexpr int kOptimMaxSlots = 24;     // parameters per launch (keeps the argument block under 4 KB)

// Up to kOptimMaxSlots parameters' slots, passed by value, and where each
// one's chunks start in the grid (first_chunk[count] = the grid size).
template <class Slot> struct SlotBatch {
  Slot slot[kOptimMaxSlots];
  int64_t first_chunk[kOptimMaxSlots + 1];
  int count = 0;
};

template <class Slot> inline void add_slot(SlotBatch<Slot>& b, const Slot& s) {
  if (b.count == 0) b.first_chunk[0] = 0;
  b.slot[b.count] = s;
  b.first_chunk[b.count + 1] = b.first_chunk[b.count] + (s.numel + kOptimChunk - 1) / kOptimChunk;
  ++b.count;
}

// The slot and element range of this block.
template <class Slot>
__device__ __forceinline__ int slot_of_block(const SlotBatch<Slot>& b, int64_t* begin, int64_t* end) {
  const int64_t chunk = blockIdx.x;
  int s = 0;
  while (s + 1 < b.count && b.first_chunk[s + 1] <= chunk) ++s;
  *begin = (chunk - b.first_chunk[s]) * kOptimChunk;
  const int64_t stop = *begin + kOptimChunk;
  *end = stop < b.slot[s].numel ? stop : b.slot[s].numel;
  return s;
}

// grad * clip_coef, written back (p.grad holds the clipped gradient, as after
// clip_grad_norm_), or grad as it is without clipping.
template <typename T, typename A>
__device__ __forceinline__ A clipped_grad(T* grad, int64_t i, const A* clip_coef) {
  if (clip_coef == nullptr) return static_cast<A>(grad[i]);
  const T g = static_cast<T>(static_cast<A>(grad[i]) * *clip_coef);
  grad[i] = g;
  return static_cast<A>(g);
}

template <typename T>
__global__ void __launch_bounds__(kOptimThreads)
    sgd_kernel(SlotBatch<SgdSlot<T>> b, const acc_t<T>* clip_coef) {
  using A = acc_t<T>;
  int64_t begin, end;
  const SgdSlot<T>& s = b.slot[slot_of_block(b, &begin, &end)];
  for (int64_t i = begin + threadIdx.x; i < end; i += kOptimThreads) {
    A p = static_cast<A>(s.param[i]);
    const A g = clipped_grad<T, A>(s.grad, i, clip_coef);
    if (s.momentum_buffer != nullptr) {
      A buf = static_cast<A>(s.momentum_buffer[i]);
      sgd_update<A>(p, g, &buf, s.s);
      s.momentum_buffer[i] = static_cast<T>(buf);
    } else {
      sgd_update<A>(p, g, nullptr, s.s);
    }
    s.param[i] = static_cast<T>(p);
  }
}

// The step counts kept on the device, advanced before the update reads them
// (one thread per slot; a separate launch, so no block of the update can read
// a count before or after another block moved it).
template <typename T> __global__ void adam_count_steps_kernel(SlotBatch<AdamSlot<T>> b) {
  const int s = static_cast<int>(threadIdx.x);
  if (s >= b.count) return;
  const DeviceStep& step = b.slot[s].step;
  if (step.f32 != nullptr) {
    *step.f32 = *step.f32 + 1.0f;  // torch: state_steps += 1 in the count's dtype
  } else if (step.f64 != nullptr) {
    *step.f64 = *step.f64 + 1.0;
  }
}

// The slot's scalars, with the bias corrections of a step count on the device.
template <typename T> __device__ __forceinline__ AdamScalars<acc_t<T>> adam_scalars(const AdamSlot<T>& s) {
  using A = acc_t<T>;
  AdamScalars<A> sc = s.s;
  if (s.step.f32 != nullptr || s.step.f64 != nullptr) {
    const double step = s.step.f32 != nullptr ? static_cast<double>(*s.step.f32) : *s.step.f64;
    const AdamBiasCorrection bc = adam_bias_correction(step, s.step.lr, s.step.beta1, s.step.beta2);
    sc.neg_step_size = static_cast<A>(bc.neg_step_size);
    sc.bias_correction2_sqrt = static_cast<A>(bc.bias_correction2_sqrt);
  }
  return sc;
}

template <typename T>
__global__ void __launch_bounds__(kOptimThreads)
    adam_kernel(SlotBatch<AdamSlot<T>> b, const acc_t<T>* clip_coef) {
  using A = acc_t<T>;
  int64_t begin, end;
  const AdamSlot<T>& s = b.slot[slot_of_block(b, &begin, &end)];
  const AdamScalars<A> scalars = adam_scalars(s);
  for (int64_t i = begin + threadIdx.x; i < end; i += kOptimThreads) {
    A p = static_cast<A>(s.param[i]);
    const A g = clipped_grad<T, A>(s.grad, i, clip_coef);
    A m = static_cast<A>(s.exp_avg[i]), v = static_cast<A>(s.exp_avg_sq[i]);
    if (s.max_exp_avg_sq != nullptr) {
      A vmax = static_cast<A>(s.max_exp_avg_sq[i]);
      adam_update<A>(p, g, m, v, &vmax, scalars);
      s.max_exp_avg_sq[i] = static_cast<T>(vmax);
    } else {
      adam_update<A>(p, g, m, v, nullptr, scalars);
    }
    s.exp_avg[i] = static_cast<T>(m);
    s.exp_avg_sq[i] = static_cast<T>(v);
    s.param[i] = static_cast<T>(p);
  }
}

// Block-wide sum in a fixed tree order; every thread must call it.
template <typename A> __device__ __forceinline__ A optim_block_sum(A v, A* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = v;
  __syncthreads();
  for (int width = kOptimThreads / 2; width > 0; width /= 2) {
    if (tid < width) scratch[tid] += scratch[tid + width];
    __syncthreads();
  }
  const A total = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// partial[chunk] = sum of squares of the chunk's gradient elements.
template <typename T, class Slot>
__global__ void __launch_bounds__(kOptimThreads) grad_sum_squares_kernel(SlotBatch<Slot> b, acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A scratch[kOptimThreads];
  int64_t begin, end;
  const Slot& s = b.slot[slot_of_block(b, &begin, &end)];
  A acc = A(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += kOptimThreads) {
    const A g = static_cast<A>(s.grad[i]);
    acc += g * g;
  }
  const A total = optim_block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// torch.nn.utils.clip_grad_norm_(norm_type=2): each gradient's norm rounded to
// its dtype, the norm of those, coef = max_norm / (total + 1e-6) (computed as
// torch does, reciprocal then product), clamped to at most 1.
template <typename T, class Slot>
__global__ void __launch_bounds__(kOptimThreads)
    clip_coef_kernel(SlotBatch<Slot> b, const acc_t<T>* partial, double max_norm, acc_t<T>* coef) {
  using A = acc_t<T>;
  __shared__ A scratch[kOptimThreads];
  A total_sq = A(0);
  for (int s = 0; s < b.count; ++s) {
    A acc = A(0);
    for (int64_t c = b.first_chunk[s] + threadIdx.x; c < b.first_chunk[s + 1]; c += kOptimThreads) acc += partial[c];
    const A sum = optim_block_sum(acc, scratch);
    const A norm = static_cast<A>(static_cast<T>(m_sqrt(sum)));
    total_sq += norm * norm;
  }
  if (threadIdx.x == 0) {
    const T total = static_cast<T>(m_sqrt(total_sq));
    const T c = static_cast<T>((A(1) / static_cast<A>(static_cast<T>(static_cast<A>(total) + A(1e-6)))) *
                               static_cast<A>(max_norm));
    const A ca = static_cast<A>(c);
    *coef = (ca != ca || ca < A(1)) ? ca : A(1);
  }
}

// Workspace (in acc_t<T> elements) clipping needs for a batch: one partial per
// chunk and the coefficient.
template <class Slot> inline int64_t clip_workspace_elems(const SlotBatch<Slot>& b) {
  return b.first_chunk[b.count] + 1;
}

template <typename T, class Slot>
void launch_clip_coef(const SlotBatch<Slot>& b, double max_norm, acc_t<T>* workspace, cudaStream_t stream) {
  const int64_t chunks = b.first_chunk[b.count];
  launch_kernel(grad_sum_squares_kernel<T, Slot>, dim3(static_cast<unsigned>(chunks)), dim3(kOptimThreads), 0,
                stream, b, workspace);
  launch_kernel(clip_coef_kernel<T, Slot>, dim3(1), dim3(kOptimThreads), 0, stream, b,
                static_cast<const acc_t<T>*>(workspace), max_norm, workspace + chunks);
}

// clip_coef: null, or the coefficient launch_clip_coef wrote (workspace + chunks).
template <typename T>
void launch_sgd(const SlotBatch<SgdSlot<T>>& b, const acc_t<T>* clip_coef, cudaStream_t stream) {
  launch_kernel(sgd_kernel<T>, dim3(static_cast<unsigned>(b.first_chunk[b.count])), dim3(kOptimThreads), 0, stream,
                b, clip_coef);
}

template <typename T> bool has_device_steps(const SlotBatch<AdamSlot<T>>& b) {
  for (int s = 0; s < b.count; ++s) {
    if (b.slot[s].step.f32 != nullptr || b.slot[s].step.f64 != nullptr) return true;
  }
  return false;
}

// One launch, two with step counts on the device (advanced first).
template <typename T>
void launch_adam(const SlotBatch<AdamSlot<T>>& b, const acc_t<T>* clip_coef, cudaStream_t stream) {
  if (has_device_steps(b)) launch_kernel(adam_count_steps_kernel<T>, dim3(1), dim3(kOptimMaxSlots), 0, stream, b);
  launch_kernel(adam_kernel<T>, dim3(static_cast<unsigned>(b.first_chunk[b.count])), dim3(kOptimThreads), 0,
                stream, b, clip_coef);
}

}  // namespace fastmlp::cuda
