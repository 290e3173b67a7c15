// The whole training step of a narrow chain on a small batch, in one parallel
// region (fastmlp::mlp_bce_step on CPU, batches under kMinTiledBatch rows).
//
// The batch is cut into a few row partials (how many depends on the shapes
// only). One worker runs a partial from start to finish: the forward through
// every layer, the loss and the logits gradient, the backward, and the
// partial's parameter gradients; then the partials are added in order. So a
// step wakes the thread pool once instead of once per kernel (on this VM a
// sleeping worker takes 10-20 µs to wake, as much as half the arithmetic of a
// batch-64 step of 784 -> 30 -> 1), each worker's rows stay in its own cache,
// and the result does not depend on the thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/math.h"
#include "cpu/bce_backend.h"
#include "cpu/narrow_gemm.h"
#include "cpu/simd.h"

namespace fastmlp::cpu {

constexpr int64_t kStepPartialRows = 32;   // rows per partial, at least
constexpr int64_t kMaxStepPartials = 8;
constexpr int64_t kMaxStepPartialBytes = 16 << 20;  // bounds the partial gradients' memory

// One layer of the chain: y = act(in @ w.T + bias), w contiguous [N, K].
template <typename T> struct StepLayer {
  const T* w = nullptr;
  const T* bias = nullptr;  // or nullptr
  int64_t N = 0, K = 0;
  bool relu = false;
  bool want_w = false, want_b = false;
  int64_t grad_w_at = 0, grad_b_at = 0;  // offsets of this layer's gradients in a partial's slot
};

// The step's operands, as raw pointers: x [B, K0] with unit column stride,
// target [B, N_out] contiguous, the loss weight patterns (VecPattern).
template <typename T> struct StepProblem {
  const T* x = nullptr;
  int64_t ldx = 0, batch = 0;
  const T* target = nullptr;
  VecPattern<T> weight, pos_weight;
  std::vector<StepLayer<T>> layers;
  T grad_scale = T(1);     // 1 / (B * N_out) for a mean, else 1
  size_t lowest = 0;       // layers below this one are not visited by backward
  T* grad_input = nullptr;  // [B, K0] contiguous, or nullptr
  int64_t grad_elems = 0;  // parameter gradient elements per partial
};

// out[b, k] = sum_n g[b, n] * w[n, k] (n in order) for `rows` rows: the
// gradient of a layer's input, a vector of k at a time.
template <typename T, int kBytes>
FASTMLP_ALWAYS_INLINE void input_grad_rows_impl(const T* g, int64_t N, const T* w, int64_t K, T* out, int64_t ldo,
                                                int64_t rows) {
  using S = Simd<T, kBytes>;
  using V = typename S::Vec;
  constexpr int64_t kL = S::kLanes;
  for (int64_t b = 0; b < rows; ++b) {
    const T* gb = g + b * N;
    T* ob = out + b * ldo;
    int64_t k = 0;
    for (; k + 4 * kL <= K; k += 4 * kL) {
      V a0{}, a1{}, a2{}, a3{};
      for (int64_t n = 0; n < N; ++n) {
        const T* wr = w + n * K + k;
        const T s = gb[n];
        a0 += S::load(wr) * s;
        a1 += S::load(wr + kL) * s;
        a2 += S::load(wr + 2 * kL) * s;
        a3 += S::load(wr + 3 * kL) * s;
      }
      S::store(ob + k, a0);
      S::store(ob + k + kL, a1);
      S::store(ob + k + 2 * kL, a2);
      S::store(ob + k + 3 * kL, a3);
    }
    for (; k + kL <= K; k += kL) {
      V a{};
      for (int64_t n = 0; n < N; ++n) a += S::load(w + n * K + k) * gb[n];
      S::store(ob + k, a);
    }
    for (; k < K; ++k) {
      T a = T(0);
      for (int64_t n = 0; n < N; ++n) a += gb[n] * w[n * K + k];
      ob[k] = a;
    }
  }
}
FASTMLP_ISA_ENTRY(input_grad_rows, input_grad_rows_impl)

// Scratch of one partial: every layer's output, and two gradient buffers.
template <typename T> int64_t step_scratch_elems(const StepProblem<T>& p, int64_t rows) {
  int64_t total = 0, widest = 0;
  for (const auto& layer : p.layers) {
    total += layer.N;
    widest = std::max(widest, std::max(layer.N, layer.K));
  }
  return rows * (total + 2 * widest);
}

// Rows [r0, r1) of the step: writes the partial's parameter gradients at
// `grads` (laid out by grad_w_at / grad_b_at), its rows of grad_input, and
// returns the partial's loss sum.
template <typename T>
double narrow_step_partial(const StepProblem<T>& p, int64_t r0, int64_t r1, T* scratch, T* const* grad_w,
                           T* const* grad_b) {
  const size_t L = p.layers.size();
  const int64_t rows = r1 - r0;
  // Forward: every layer's output of these rows, in scratch.
  std::vector<T*> out(L);
  T* at = scratch;
  int64_t widest = 0;
  for (size_t l = 0; l < L; ++l) {
    out[l] = at;
    at += rows * p.layers[l].N;
    widest = std::max(widest, std::max(p.layers[l].N, p.layers[l].K));
  }
  T* g = at;
  T* g_next = at + rows * widest;
  const T* in = p.x + r0 * p.ldx;
  int64_t ld = p.ldx;
  for (size_t l = 0; l < L; ++l) {
    const StepLayer<T>& layer = p.layers[l];
    // The dot form: at these row counts packing the weights for the outer form costs more than it saves.
    narrow_forward_rows<T>(in, ld, layer.w, layer.K, static_cast<const T*>(nullptr), int64_t(0), layer.bias,
                           layer.relu, out[l], layer.N, layer.K, int64_t(0), rows, rows);
    in = out[l];
    ld = layer.N;
  }
  // Loss and the logits gradient (scaled for a mean) in one pass. The loss
  // weights repeat along each row (step_eligible), so they are indexed within the rows.
  const int64_t n_out = p.layers.back().N;
  const double loss = bce_forward_vec(static_cast<const T*>(out[L - 1]), p.target + r0 * n_out, p.weight,
                                      p.pos_weight, static_cast<T*>(nullptr), g, p.grad_scale, int64_t(0),
                                      rows * n_out);
  // Backward: g is the gradient of layer l's output.
  for (size_t l = L; l-- > p.lowest;) {
    const StepLayer<T>& layer = p.layers[l];
    const int64_t N = layer.N, K = layer.K;
    if (layer.relu) {
      const T* y = out[l];
      for (int64_t i = 0; i < rows * N; ++i) g[i] = fastmlp::relu_passes(y[i]) ? g[i] : T(0);
    }
    if (layer.want_b) {
      T* db = grad_b[l];
      for (int64_t n = 0; n < N; ++n) db[n] = T(0);
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t n = 0; n < N; ++n) db[n] += g[b * N + n];
    }
    const T* layer_in = l == 0 ? p.x + r0 * p.ldx : out[l - 1];
    const int64_t ld_in = l == 0 ? p.ldx : K;
    if (layer.want_w) {
      const int64_t blocks = (K + kWeightGradCols - 1) / kWeightGradCols;
      narrow_weight_grad_blocks<T>(layer_in, ld_in, static_cast<const T*>(g), N, grad_w[l], N, K, rows, int64_t(0),
                                   blocks);
    }
    if (l > p.lowest) {
      input_grad_rows<T>(static_cast<const T*>(g), N, layer.w, K, g_next, K, rows);
      std::swap(g, g_next);
    } else if (l == 0 && p.grad_input != nullptr) {
      input_grad_rows<T>(static_cast<const T*>(g), N, layer.w, K, p.grad_input + r0 * K, K, rows);
    }
  }
  return loss;
}

// Partials for a batch: whole partials of kStepPartialRows rows or more, one
// when the step is too small to be worth a second thread. Shapes only.
template <typename T> int64_t step_partials(const StepProblem<T>& p) {
  int64_t macs_per_row = 0, params = 0;
  for (const auto& layer : p.layers) {
    macs_per_row += 2 * layer.N * layer.K;  // forward and weight gradient
    params += layer.N * (layer.K + 1);
  }
  if (p.batch * macs_per_row < 2 * kMinTaskMacs) return 1;
  const int64_t by_rows = (p.batch + kStepPartialRows - 1) / kStepPartialRows;
  const int64_t by_memory = std::max<int64_t>(1, kMaxStepPartialBytes / std::max<int64_t>(1, params * sizeof(T)));
  return std::clamp<int64_t>(std::min(by_rows, by_memory), 1, kMaxStepPartials);
}

// Runs the step; the parameter gradients of partial 0 go to `grad_w` /
// `grad_b` (per layer, nullptr where not wanted), the others to `partial_grads`
// ((partials - 1) slots of p.grad_elems) and are then added in order.
// Returns the loss sum (before the mean's scaling).
template <typename T>
double narrow_step(const StepProblem<T>& p, int64_t partials, const std::vector<T*>& grad_w,
                   const std::vector<T*>& grad_b, T* partial_grads, T* scratch) {
  const size_t L = p.layers.size();
  const int64_t rows_per = (p.batch + partials - 1) / partials;
  const int64_t scratch_per = step_scratch_elems(p, rows_per);
  std::vector<double> loss(partials, 0.0);
  at::parallel_for(0, partials, 1, [&](int64_t begin, int64_t end) {
    std::vector<T*> gw(L), gb(L);
    for (int64_t q = begin; q < end; ++q) {
      for (size_t l = 0; l < L; ++l) {
        T* slot = partial_grads + (q - 1) * p.grad_elems;
        gw[l] = q == 0 ? grad_w[l] : (grad_w[l] ? slot + p.layers[l].grad_w_at : nullptr);
        gb[l] = q == 0 ? grad_b[l] : (grad_b[l] ? slot + p.layers[l].grad_b_at : nullptr);
      }
      const int64_t r0 = q * rows_per, r1 = std::min(p.batch, r0 + rows_per);
      loss[q] = narrow_step_partial(p, r0, r1, scratch + q * scratch_per, gw.data(), gb.data());
    }
  });
  // Partial q > 0 added to partial 0 in order, element by element.
  for (size_t l = 0; l < L; ++l) {
    for (int which = 0; which < 2; ++which) {
      T* dst = which == 0 ? grad_w[l] : grad_b[l];
      if (dst == nullptr || partials == 1) continue;
      const StepLayer<T>& layer = p.layers[l];
      const int64_t at = which == 0 ? layer.grad_w_at : layer.grad_b_at;
      const int64_t n = which == 0 ? layer.N * layer.K : layer.N;
      at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t q = 1; q < partials; ++q) {
          const T* src = partial_grads + (q - 1) * p.grad_elems + at;
          for (int64_t i = begin; i < end; ++i) dst[i] += src[i];
        }
      });
    }
  }
  double total = 0;
  for (double v : loss) total += v;
  return total;
}

}  // namespace fastmlp::cpu
