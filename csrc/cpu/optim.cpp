// CPU kernels of fastmlp::optimizer_step, and the training step / epoch ops
// built on it (common/train_ops.h).
//
// The update is one pass over every element of every parameter: the elements
// of all parameters are cut into fixed chunks, run in one parallel region when
// there are enough of them (a small model's update is cheaper than waking the
// thread pool). Each element's update is independent of the others, so the
// result does not depend on the thread count. The clipping norm adds fixed
// chunks' partial sums in order, in double.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/train_ops.h"
#include "cpu/simd.h"

namespace fastmlp::cpu {
namespace {

constexpr int64_t kChunk = 16384;           // elements per work item
constexpr int64_t kParallelElements = 1 << 16;  // below: one thread (the pool's wake-up costs more)

// A work item: elements [begin, end) of slot `slot`.
struct Chunk {
  size_t slot;
  int64_t begin, end;
};

template <class Slot> std::vector<Chunk> chunks_of(const std::vector<Slot>& slots, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    for (int64_t b = 0; b < slots[i].numel; b += kChunk) chunks.push_back({i, b, std::min(slots[i].numel, b + kChunk)});
    *total += slots[i].numel;
  }
  return chunks;
}

template <class Slot, class Fn> void for_each_chunk(const std::vector<Slot>& slots, const Fn& fn) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = chunks_of(slots, &total);
  if (total < kParallelElements) {
    for (const Chunk& c : chunks) fn(slots[c.slot], c.begin, c.end);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(slots[chunks[i].slot], chunks[i].begin, chunks[i].end);
  });
}

// The element loops, one clone per ISA (the compiler vectorises them).
template <typename T> FASTMLP_CPU_CLONES void sgd_range(const SgdSlot<T>& s, int64_t begin, int64_t end) {
  T* param = s.param;
  const T* grad = s.grad;
  T* buf = s.momentum_buffer;
  const SgdScalars<T> k = s.s;
  if (buf != nullptr) {
    for (int64_t i = begin; i < end; ++i) sgd_update<T>(param[i], grad[i], buf + i, k);
  } else {
    for (int64_t i = begin; i < end; ++i) sgd_update<T>(param[i], grad[i], nullptr, k);
  }
}

template <typename T> FASTMLP_CPU_CLONES void adam_range(const AdamSlot<T>& s, int64_t begin, int64_t end) {
  T* param = s.param;
  const T* grad = s.grad;
  T* m = s.exp_avg;
  T* v = s.exp_avg_sq;
  T* vmax = s.max_exp_avg_sq;
  const AdamScalars<T> k = s.s;
  if (vmax != nullptr) {
    for (int64_t i = begin; i < end; ++i) adam_update<T>(param[i], grad[i], m[i], v[i], vmax + i, k);
  } else {
    for (int64_t i = begin; i < end; ++i) adam_update<T>(param[i], grad[i], m[i], v[i], nullptr, k);
  }
}

// Sum of squares of x[begin, end) in double.
template <typename T> FASTMLP_CPU_CLONES double sum_squares(const T* x, int64_t begin, int64_t end) {
  double acc = 0;
  for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return acc;
}

struct CpuOptimKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  template <typename T> static void sgd(const std::vector<SgdSlot<T>>& slots) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      for_each_chunk(slots, [](const SgdSlot<T>& s, int64_t b, int64_t e) { sgd_range<T>(s, b, e); });
    } else {
      TORCH_CHECK(false, "fastmlp.optimizer_step: the CPU kernels take float32 and float64 parameters");
    }
  }

  template <typename T> static void adam(const std::vector<AdamSlot<T>>& slots) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      for_each_chunk(slots, [](const AdamSlot<T>& s, int64_t b, int64_t e) { adam_range<T>(s, b, e); });
    } else {
      TORCH_CHECK(false, "fastmlp.optimizer_step: the CPU kernels take float32 and float64 parameters");
    }
  }

  // torch.nn.utils.clip_grad_norm_(norm_type=2): each gradient's norm (in its
  // dtype), the norm of those norms, clip_coef = max_norm / (total + 1e-6)
  // clamped to at most 1, every gradient multiplied by it (NaN propagates).
  static void clip_grad_norm(at::TensorList grads, double max_norm) {
    AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "fastmlp_clip_grad_norm", [&] {
      struct Span {
        const scalar_t* data;
        int64_t numel;
      };
      std::vector<Span> spans;
      for (const at::Tensor& g : grads) spans.push_back({g.const_data_ptr<scalar_t>(), g.numel()});
      std::vector<Chunk> chunks;
      for (size_t i = 0; i < spans.size(); ++i)
        for (int64_t b = 0; b < spans[i].numel; b += kChunk)
          chunks.push_back({i, b, std::min(spans[i].numel, b + kChunk)});
      std::vector<double> partial(chunks.size(), 0.0);
      auto run = [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          partial[c] = sum_squares<scalar_t>(spans[chunks[c].slot].data, chunks[c].begin, chunks[c].end);
      };
      const int64_t n_chunks = static_cast<int64_t>(chunks.size());
      if (n_chunks * kChunk < kParallelElements) {
        run(0, n_chunks);
      } else {
        at::parallel_for(0, n_chunks, 1, run);
      }
      std::vector<double> per_grad(spans.size(), 0.0);
      for (size_t c = 0; c < chunks.size(); ++c) per_grad[chunks[c].slot] += partial[c];
      double total_sq = 0;
      for (double s : per_grad) {
        const double norm = static_cast<scalar_t>(std::sqrt(s));  // vector_norm of one gradient, in its dtype
        total_sq += norm * norm;
      }
      const scalar_t total = static_cast<scalar_t>(std::sqrt(total_sq));
      // max_norm / tensor is tensor.reciprocal() * max_norm in torch.
      const scalar_t coef =
          (scalar_t(1) / (total + static_cast<scalar_t>(1e-6))) * static_cast<scalar_t>(max_norm);
      if (!(coef != coef) && coef >= scalar_t(1)) return;  // clamp(max=1.0): multiplying by 1 changes nothing
      for (const at::Tensor& g : grads) {
        scalar_t* d = g.data_ptr<scalar_t>();
        at::parallel_for(0, g.numel(), kParallelElements, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) d[i] = d[i] * coef;
        });
      }
    });
  }
};

using Optim = OptimOps<CpuOptimKernels>;
using Train = TrainOps<CpuOptimKernels>;

void optimizer_step(at::TensorList params, at::TensorList grads, at::TensorList state, int64_t optimizer,
                    c10::ArrayRef<double> hyper, std::optional<double> max_grad_norm) {
  Optim::step(params, grads, state, optimizer, hyper, max_grad_norm);
}

}  // namespace
}  // namespace fastmlp::cpu

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("optimizer_step", &fastmlp::cpu::optimizer_step);
  m.impl("mlp_bce_train_step", &fastmlp::cpu::Train::step);
  m.impl("mlp_bce_train_epoch", &fastmlp::cpu::Train::epoch);
}
