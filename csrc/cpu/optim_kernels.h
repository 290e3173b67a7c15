// CPU kernels of fastmlp::optimizer_step (registered by cpu/optim.cpp with
// the training step / epoch ops built on them, common/train_ops.h), and their
// element loops, which the training step also runs inside its gradient
// reduction (cpu/mlp_step.cpp). The math per element is common/optim_math.h's.
//
// The update is one pass over every element of every parameter: the elements
// of all parameters are cut into fixed chunks, run in one parallel region when
// there are enough of them (a small model's update is cheaper than waking the
// thread pool). Each element's update is independent of the others, so the
// result does not depend on the thread count. The clipping norm adds fixed
// chunks' partial sums in order, in double.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/train_ops.h"
#include "cpu/parallel_thresholds.h"
#include "cpu/simd.h"
#include "cpu/train_step.h"

namespace fastmlp::cpu {

// The element loops, one clone per ISA. Restrict pointers and a compile-time
// momentum / amsgrad (the only conditional stores) let the compiler vectorise
// them; the other options are selects.
template <typename T, bool kMomentum>
FASTMLP_CPU_CLONES void sgd_range(const SgdSlot<T>& s, int64_t begin, int64_t end) {
  T* __restrict param = s.param;
  const T* __restrict grad = s.grad;
  T* __restrict buf = s.momentum_buffer;
  SgdScalars<T> k = s.s;
  k.has_momentum = kMomentum;
  for (int64_t i = begin; i < end; ++i) sgd_update<T>(param[i], grad[i], kMomentum ? buf + i : nullptr, k);
}

template <typename T, bool kAmsgrad>
FASTMLP_CPU_CLONES void adam_range(const AdamSlot<T>& s, int64_t begin, int64_t end) {
  T* __restrict param = s.param;
  const T* __restrict grad = s.grad;
  T* __restrict m = s.exp_avg;
  T* __restrict v = s.exp_avg_sq;
  T* __restrict vmax = s.max_exp_avg_sq;
  AdamScalars<T> k = s.s;
  k.amsgrad = kAmsgrad;
  for (int64_t i = begin; i < end; ++i) adam_update<T>(param[i], grad[i], m[i], v[i], kAmsgrad ? vmax + i : nullptr, k);
}

// Sum of squares of x[begin, end) in double.
template <typename T> FASTMLP_CPU_CLONES double sum_squares(const T* x, int64_t begin, int64_t end) {
  double acc = 0;
  for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return acc;
}

// One slot's update of elements [begin, end), its loop picked by its options.
template <typename T> void update_range(const SgdSlot<T>& s, int64_t begin, int64_t end) {
  s.momentum_buffer != nullptr ? sgd_range<T, true>(s, begin, end) : sgd_range<T, false>(s, begin, end);
}
template <typename T> void update_range(const AdamSlot<T>& s, int64_t begin, int64_t end) {
  s.max_exp_avg_sq != nullptr ? adam_range<T, true>(s, begin, end) : adam_range<T, false>(s, begin, end);
}

// Elements per work item: a multiple of narrow_step.h's kReduceBlock, so the update
// inside the training step splits each parameter where this one does.
constexpr int64_t kOptimChunk = 16384;

// A work item: elements [begin, end) of slot `slot`.
struct OptimChunk {
  size_t slot;
  int64_t begin, end;
};

template <class Slot> std::vector<OptimChunk> chunks_of(const std::vector<Slot>& slots, int64_t* total) {
  std::vector<OptimChunk> chunks;
  *total = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    for (int64_t b = 0; b < slots[i].numel; b += kOptimChunk)
      chunks.push_back({i, b, std::min(slots[i].numel, b + kOptimChunk)});
    *total += slots[i].numel;
  }
  return chunks;
}

template <class Slot, class Fn> void for_each_chunk(const std::vector<Slot>& slots, const Fn& fn) {
  int64_t total = 0;
  const std::vector<OptimChunk> chunks = chunks_of(slots, &total);
  if (total < kParallelUpdateElements) {
    for (const OptimChunk& c : chunks) fn(slots[c.slot], c.begin, c.end);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(slots[chunks[i].slot], chunks[i].begin, chunks[i].end);
  });
}

struct CpuOptimKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  // Step counts are torch's CPU scalars, advanced on the host.
  static bool step_on_device(const at::Tensor&, const at::Tensor&) { return false; }

  static std::optional<TrainStepResult> fused_step(const at::Tensor& input, const at::Tensor& target,
                                                   at::TensorList weights,
                                                   const c10::List<std::optional<at::Tensor>>& biases,
                                                   bool last_relu, const StepLossArgs& loss,
                                                   const c10::List<bool>& weight_mask,
                                                   const c10::List<bool>& bias_mask, at::TensorList state,
                                                   int64_t optimizer, c10::ArrayRef<double> hyper,
                                                   std::optional<double> max_grad_norm) {
    return fused_train_step(input, target, weights, biases, last_relu, loss, weight_mask, bias_mask, state, optimizer,
                            hyper, max_grad_norm);
  }

  template <typename T>
  static void sgd(const std::vector<SgdSlot<T>>& slots, std::optional<double> max_grad_norm, const at::Tensor&) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      if (max_grad_norm.has_value()) clip_grad_norm(slots, *max_grad_norm);
      for_each_chunk(slots, [](const SgdSlot<T>& s, int64_t b, int64_t e) { update_range(s, b, e); });
    } else {
      TORCH_CHECK(false, "fastmlp.optimizer_step: the CPU kernels take float32 and float64 parameters");
    }
  }

  template <typename T>
  static void adam(const std::vector<AdamSlot<T>>& slots, std::optional<double> max_grad_norm, const at::Tensor&) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      if (max_grad_norm.has_value()) clip_grad_norm(slots, *max_grad_norm);
      for_each_chunk(slots, [](const AdamSlot<T>& s, int64_t b, int64_t e) { update_range(s, b, e); });
    } else {
      TORCH_CHECK(false, "fastmlp.optimizer_step: the CPU kernels take float32 and float64 parameters");
    }
  }

  // torch.nn.utils.clip_grad_norm_(norm_type=2): each gradient's norm (in its
  // dtype), the norm of those norms, clip_coef = max_norm / (total + 1e-6)
  // clamped to at most 1, every gradient multiplied by it (NaN propagates).
  template <class Slot> static void clip_grad_norm(const std::vector<Slot>& slots, double max_norm) {
    using T = std::remove_pointer_t<decltype(slots[0].grad)>;
    int64_t total_elems = 0;
    const std::vector<OptimChunk> chunks = chunks_of(slots, &total_elems);
    std::vector<double> partial(chunks.size(), 0.0);
    auto run = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        partial[c] = sum_squares<T>(slots[chunks[c].slot].grad, chunks[c].begin, chunks[c].end);
    };
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());
    if (total_elems < kParallelUpdateElements) {
      run(0, n_chunks);
    } else {
      at::parallel_for(0, n_chunks, 1, run);
    }
    std::vector<double> per_grad(slots.size(), 0.0);
    for (size_t c = 0; c < chunks.size(); ++c) per_grad[chunks[c].slot] += partial[c];
    double total_sq = 0;
    for (double s : per_grad) {
      const double norm = static_cast<T>(std::sqrt(s));  // vector_norm of one gradient, in its dtype
      total_sq += norm * norm;
    }
    const T total = static_cast<T>(std::sqrt(total_sq));
    // max_norm / tensor is tensor.reciprocal() * max_norm in torch.
    const T coef = (T(1) / (total + static_cast<T>(1e-6))) * static_cast<T>(max_norm);
    if (!(coef != coef) && coef >= T(1)) return;  // clamp(max=1.0): multiplying by 1 changes nothing
    for_each_chunk(slots, [coef](const Slot& s, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) s.grad[i] = s.grad[i] * coef;
    });
  }
};

}  // namespace fastmlp::cpu
