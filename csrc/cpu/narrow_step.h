// A narrow chain's training step, or its backward, on a small batch in one
// parallel region (CPU fastmlp::mlp_bce_step and mlp_backward; which chains
// and batches: row_partials_eligible).
//
// The batch is cut into a few row partials (how many depends on the shapes
// only). One worker runs a partial from start to finish: for the step the
// forward through every layer, the loss and the logits gradient, then the
// backward; for mlp_backward only the backward from the saved activations. A
// partial writes its own parameter gradients; the partials are then added in
// order, in the same parallel region (with the optimizer's update for a
// training step). So a step wakes the thread pool once instead of once per
// kernel, each
// worker's rows stay in its own cache, and the result does not depend on the
// thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/layer_ops.h"  // or_empty
#include "common/math.h"
#include "cpu/narrow_gemm.h"
#include "cpu/parallel_thresholds.h"
#include "cpu/shared_work.h"
#include "cpu/simd.h"

namespace fastmlp::cpu {

// Batches of up to kRowPartialsSmallBatch rows run as row partials when every
// layer is at most kMaxPartialWidth wide; up to kRowPartialsMaxBatch rows when
// every layer is at most kLargePartialWidth wide. Wider layers do better layer
// by layer (measured: 1000 -> 100 -> 10 at 512 rows; a 1000-wide last layer
// over 30 features at 64 rows ran 2x slower on the narrow kernels).
constexpr int64_t kRowPartialsSmallBatch = 256;
constexpr int64_t kRowPartialsMaxBatch = 1024;
constexpr int64_t kMaxPartialWidth = 128;
constexpr int64_t kLargePartialWidth = 64;
constexpr int64_t kStepPartialRows = 32;            // rows per partial, at least
constexpr int64_t kMaxStepPartials = 8;
constexpr int64_t kMaxStepPartialBytes = 16 << 20;  // bounds the partial gradients' memory
// The partials' gradients together, at most (beyond one partial): adding them
// up reads them all, so a model of 100k parameters in 8 partials of a 256-row
// batch spent more on that than its 32-row partials saved.
constexpr int64_t kPartialGradBudget = 1 << 20;

// One layer of the chain: y = act(in @ w.T + bias), w contiguous [N, K].
template <typename T> struct ChainLayer {
  const T* w = nullptr;
  const T* bias = nullptr;  // or nullptr
  int64_t N = 0, K = 0;
  bool relu = false;
  bool want_w = false, want_b = false;
  int64_t grad_w_at = 0, grad_b_at = 0;  // offsets of this layer's gradients in a partial's slot
};

// A chain over a batch, as raw pointers: x [B, K0] with unit column stride.
template <typename T> struct NarrowChain {
  const T* x = nullptr;
  int64_t ldx = 0, batch = 0;
  std::vector<ChainLayer<T>> layers;
  size_t lowest = 0;        // backward visits layers lowest .. L-1
  T* grad_input = nullptr;  // [B, K0] contiguous, or nullptr
  int64_t grad_elems = 0;   // parameter gradient elements per partial

  // The widest layer output: the width of the backward's gradient buffers
  // (a layer's input gradient is the layer below's output width; the first
  // layer's goes straight to grad_input).
  int64_t widest() const {
    int64_t w = 0;
    for (const auto& layer : layers) w = std::max(w, layer.N);
    return w;
  }
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

// The backward of rows [r0, r0 + rows). out[l]: layer l's output of these
// rows (row stride N_l); g: d loss / d (last layer's output) of these rows,
// [rows, N_L], overwritten; g_next: scratch of rows x c.widest(). Writes the
// gradients wanted at grad_w / grad_b (per layer) and the rows of grad_input.
template <typename T>
void narrow_backward_rows(const NarrowChain<T>& c, int64_t r0, int64_t rows, const T* const* out, T* g, T* g_next,
                          T* const* grad_w, T* const* grad_b) {
  for (size_t l = c.layers.size(); l-- > c.lowest;) {
    const ChainLayer<T>& layer = c.layers[l];
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
    if (layer.want_w) {
      const T* in = l == 0 ? c.x + r0 * c.ldx : out[l - 1];
      narrow_weight_grad_cols<T>(in, l == 0 ? c.ldx : K, static_cast<const T*>(g), N, grad_w[l], N, K, rows,
                                 int64_t(0), K);
    }
    if (l > c.lowest) {
      input_grad_rows<T>(static_cast<const T*>(g), N, layer.w, K, g_next, K, rows);
      std::swap(g, g_next);
    } else if (l == 0 && c.grad_input != nullptr) {
      input_grad_rows<T>(static_cast<const T*>(g), N, layer.w, K, c.grad_input + r0 * K, K, rows);
    }
  }
}

// How many partials: a power of two (they split evenly over 2, 4 or 8
// threads) of about kStepPartialRows rows or more each, one when the work
// (`macs_per_row`) is too small to be worth a second thread. Shapes only.
template <typename T> int64_t row_partials(const NarrowChain<T>& c, int64_t macs_per_row) {
  int64_t params = 0;
  for (const auto& layer : c.layers) params += layer.N * (layer.K + 1);
  if (c.batch * macs_per_row < 2 * kMinTaskMacs) return 1;
  const int64_t by_rows = (c.batch + kStepPartialRows - 1) / kStepPartialRows;
  // Within kPartialGradBudget (but two partials whatever the size, up to kMaxStepPartialBytes).
  const int64_t param_bytes = std::max<int64_t>(1, params * static_cast<int64_t>(sizeof(T)));
  const int64_t by_memory = std::min(kMaxStepPartialBytes / param_bytes,
                                     std::max<int64_t>(2, kPartialGradBudget / param_bytes));
  const int64_t most = std::clamp<int64_t>(std::min(by_rows, by_memory), 1, kMaxStepPartials);
  int64_t partials = 1;
  while (partials * 2 <= most) partials *= 2;
  return partials;
}

// Memory for the partials' gradients (all but the first) and the scratch,
// kept by the calling thread across calls up to kKeptWorkspaceBytes: a fresh
// allocation of a few hundred KB comes from mmap and costs its page faults on
// every call (measured: a batch-128 step of 784 -> 30 -> 1 took 137 or 260 µs
// depending on glibc's trim state).
constexpr int64_t kKeptWorkspaceBytes = 32 << 20;

template <typename T> T* partial_workspace(int64_t partials, int64_t grad_elems, int64_t scratch, at::Tensor& owner) {
  const int64_t n = (partials - 1) * grad_elems + scratch;
  if (n * static_cast<int64_t>(sizeof(T)) > kKeptWorkspaceBytes) {
    owner = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    return owner.data_ptr<T>();
  }
  thread_local std::vector<T> kept;
  if (static_cast<int64_t>(kept.size()) < n) kept.resize(n);
  return kept.data();
}

// No work on the summed gradients (run_row_partials' `after_partials` when
// nothing follows the backward).
struct NoEpilogue {
  void operator()(size_t, int64_t, int64_t) const {}
};
inline NoEpilogue no_epilogue() { return {}; }

// Elements summed, then handed to the epilogue, at a time: blocks counted from
// each gradient's start, so the epilogue sees the same ranges at any thread
// count (and, 1024 dividing the optimizer's chunks, its vector loops split
// each parameter where the separate update's do).
constexpr int64_t kReduceBlock = 1024;
// Below this many element visits (sums, or updates counted as a few sums): the
// calling thread alone. A step's update after one partial, with the pool not
// woken for its rows, stays alone below the separate update's threshold.
constexpr int64_t kReduceParallelElements = 1 << 14;
constexpr int64_t kUpdateCostInSums = 4;

// The reduction of the partials' gradients in fixed blocks: grad[i] += the
// other partials' slots for each wanted gradient (layer by layer, weight then
// bias: the k-th of them), then `epilogue(k, begin, end)` on its elements
// [begin, end) once they hold the batch's sum. Each element is summed in
// partial order, so the result does not depend on which worker runs a block.
template <typename T> class PartialsReduction {
 public:
  PartialsReduction(const NarrowChain<T>& c, int64_t partials, const T* partial_grads, const std::vector<T*>& grad_w,
                    const std::vector<T*>& grad_b, bool has_epilogue)
      : partials_(partials), stride_(c.grad_elems) {
    if (partials == 1 && !has_epilogue) return;  // nothing to add, nothing to run
    size_t k = 0;
    int64_t total = 0;
    for (size_t l = 0; l < c.layers.size(); ++l) {
      const ChainLayer<T>& layer = c.layers[l];
      for (const auto& [dst, at, n] : {std::make_tuple(grad_w[l], layer.grad_w_at, layer.N * layer.K),
                                       std::make_tuple(grad_b[l], layer.grad_b_at, layer.N)}) {
        if (dst == nullptr) continue;
        for (int64_t b = 0; b < n; b += kReduceBlock) {
          blocks_.push_back({k, dst, partial_grads + at, b, std::min(n, b + kReduceBlock)});
        }
        total += n;
        ++k;
      }
    }
    const int64_t visits = partials > 1 ? total * (partials - 1 + (has_epilogue ? kUpdateCostInSums : 0)) : 0;
    parallel_ = partials > 1 ? visits >= kReduceParallelElements : total >= kParallelUpdateElements;
  }

  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Whether the blocks are worth more than one worker.
  bool parallel() const { return parallel_; }

  template <typename Epilogue> void run(int64_t i, const Epilogue& epilogue) const {
    const Block& blk = blocks_[i];
    for (int64_t q = 1; q < partials_; ++q) {
      const T* src = blk.src + (q - 1) * stride_;
      for (int64_t e = blk.begin; e < blk.end; ++e) blk.dst[e] += src[e];
    }
    epilogue(blk.k, blk.begin, blk.end);
  }

 private:
  struct Block {
    size_t k;  // which gradient
    T* dst;
    const T* src;  // partial 1's slot of it (the others follow at stride_)
    int64_t begin, end;
  };
  int64_t partials_, stride_;
  std::vector<Block> blocks_;
  bool parallel_ = false;
};

// Runs `partial(r0, r1, scratch, grad_w, grad_b, prepared) -> double` for
// every partial, each with scratch_per_row elements of scratch per row:
// partial 0 writes the parameter gradients at grad_w / grad_b (per layer,
// nullptr where not wanted), the others at their own slot of c.grad_elems;
// then the slots are added to partial 0's in order (PartialsReduction, with the
// epilogue that `after_partials()` returns: e.g. the optimizer's update, set up
// by one worker once every partial is done, so only after the gradients exist
// and before any update). All of it in one parallel region (shared_work.h).
// `prepared` is what `prepare(once)` returned on that worker, called once per
// worker (e.g. its packed weights; `once`, a vector of T, lives as long as the
// worker's partials). Returns the sum of what the partials return.
template <typename T, typename Partial, typename Prepare, typename AfterPartials = NoEpilogue (*)()>
double run_row_partials(const NarrowChain<T>& c, int64_t partials, int64_t scratch_per_row,
                        const std::vector<T*>& grad_w, const std::vector<T*>& grad_b, const Partial& partial,
                        const Prepare& prepare, const AfterPartials& after_partials = &no_epilogue) {
  using Epilogue = decltype(after_partials());
  constexpr bool has_epilogue = !std::is_same_v<Epilogue, NoEpilogue>;
  const size_t L = c.layers.size();
  const int64_t rows_per = (c.batch + partials - 1) / partials;
  const int64_t scratch_per_partial = rows_per * scratch_per_row;
  at::Tensor large;  // owns the workspace when it is too large to keep
  T* partial_grads = partial_workspace<T>(partials, c.grad_elems, partials * scratch_per_partial, large);
  T* scratch = partial_grads + (partials - 1) * c.grad_elems;
  const PartialsReduction<T> reduction(c, partials, partial_grads, grad_w, grad_b, has_epilogue);
  const int64_t workers = std::clamp<int64_t>(std::max(partials, reduction.parallel() ? reduction.blocks() : 1), 1,
                                              at::get_num_threads());
  SharedItems partial_items(partials, workers), blocks(reduction.blocks(), reduction.parallel() ? workers : 1);
  Countdown partials_left(partials);
  Once set_up;
  std::optional<Epilogue> epilogue;
  std::vector<double> result(partials, 0.0);
  run_workers(workers, [&](int64_t me, const RegionErrors& errors) {
    {
      std::vector<T*> gw(L), gb(L);
      std::vector<T> once;
      std::optional<decltype(prepare(once))> prepared;
      for (int64_t q; !errors.failed() && (q = partial_items.claim(me)) >= 0; partials_left.finish_one()) {
        if (!prepared) prepared.emplace(prepare(once));
        T* slot = q == 0 ? nullptr : partial_grads + (q - 1) * c.grad_elems;
        for (size_t l = 0; l < L; ++l) {
          gw[l] = slot == nullptr || grad_w[l] == nullptr ? grad_w[l] : slot + c.layers[l].grad_w_at;
          gb[l] = slot == nullptr || grad_b[l] == nullptr ? grad_b[l] : slot + c.layers[l].grad_b_at;
        }
        const int64_t r0 = q * rows_per, r1 = std::min(c.batch, r0 + rows_per);
        result[q] = partial(r0, r1, scratch + q * scratch_per_partial, gw.data(), gb.data(), *prepared);
      }
    }
    if (!partials_left.wait(errors)) return;
    if (set_up.claim()) {
      epilogue.emplace(after_partials());
      set_up.done();
    } else if (!reduction.parallel() || !set_up.wait(errors)) {
      return;  // (the worker that set up sums every block)
    }
    for (int64_t i; !errors.failed() && (i = blocks.claim(me)) >= 0;) reduction.run(i, *epilogue);
  });
  double total = 0;
  for (double v : result) total += v;
  return total;
}

// The whole step; returns the sum of what loss_rows returns.
// loss_rows(logits, r0, rows, grad) -> double: the loss of rows [r0, r0 + rows)
// from their logits ([rows, N_out], contiguous), writing d loss / d logits at grad
// in the same pass (a partial's rows only: any batch-wide scale is the caller's).
// after_partials: as run_row_partials'.
template <typename T, typename LossRows, typename AfterPartials = NoEpilogue (*)()>
double narrow_step(const NarrowChain<T>& c, const LossRows& loss_rows, const std::vector<T*>& grad_w,
                   const std::vector<T*>& grad_b, const AfterPartials& after_partials = &no_epilogue) {
  const size_t L = c.layers.size();
  const int64_t widest = c.widest();
  int64_t macs_per_row = 0, outputs = 0;
  for (const auto& layer : c.layers) {
    macs_per_row += 2 * layer.N * layer.K;  // forward and weight gradient
    outputs += layer.N;
  }
  // The forward's form per layer (narrow_gemm.h's cost model): short rows take
  // the outer form, packed once per worker (10-64-64-64-1 at 64 rows: the dot
  // form spent more on its lane sums than on its 4 vectors of multiply-adds).
  const int64_t lanes = vector_bytes() / static_cast<int64_t>(sizeof(T));
  std::vector<int64_t> nv(L), pack_at(L + 1, 0);
  for (size_t l = 0; l < L; ++l) {
    nv[l] = forward_form(c.layers[l].N, c.layers[l].K, c.batch, lanes);
    pack_at[l + 1] = pack_at[l] + c.layers[l].K * nv[l] * lanes;
  }
  auto pack = [&](std::vector<T>& once) { return pack_outer_weights<T>(c.layers, nv, pack_at, lanes, once); };
  auto partial = [&](int64_t r0, int64_t r1, T* work, T* const* gw, T* const* gb, const T* packed) {
    const int64_t rows = r1 - r0;
    std::vector<T*> out(L);
    for (size_t l = 0; l < L; ++l) {
      out[l] = work;
      work += rows * c.layers[l].N;
    }
    T* g = work;
    const T* in = c.x + r0 * c.ldx;
    int64_t ld = c.ldx;
    for (size_t l = 0; l < L; ++l) {
      const ChainLayer<T>& layer = c.layers[l];
      narrow_forward_rows<T>(in, ld, layer.w, layer.K, nv[l] > 0 ? packed + pack_at[l] : nullptr, nv[l], layer.bias,
                             layer.relu, out[l], layer.N, layer.K, int64_t(0), rows, rows);
      in = out[l];
      ld = layer.N;
    }
    const double sum = loss_rows(static_cast<const T*>(out[L - 1]), r0, rows, g);
    narrow_backward_rows(c, r0, rows, out.data(), g, g + rows * widest, gw, gb);
    return sum;
  };
  // Scratch per row: every layer's output, and two gradient buffers.
  return run_row_partials(c, row_partials(c, macs_per_row), outputs + 2 * widest, grad_w, grad_b, partial, pack,
                          after_partials);
}

// The backward alone, from saved activations: hidden (layer l's output at
// hidden_at[l], [B, N_l] contiguous), output (the last layer's, read when its
// ReLU is applied), grad_output [B, N_L] contiguous.
template <typename T> struct SavedChain {
  const T* hidden = nullptr;
  std::vector<int64_t> hidden_at;
  const T* output = nullptr;
  const T* grad_output = nullptr;
};

template <typename T>
void narrow_backward(const NarrowChain<T>& c, const SavedChain<T>& saved, const std::vector<T*>& grad_w,
                     const std::vector<T*>& grad_b) {
  const size_t L = c.layers.size();
  const int64_t widest = c.widest(), n_out = c.layers.back().N;
  int64_t macs_per_row = 0;
  for (size_t l = c.lowest; l < L; ++l) {
    const ChainLayer<T>& layer = c.layers[l];
    macs_per_row += layer.N * layer.K * ((layer.want_w ? 1 : 0) + (l > c.lowest || c.grad_input ? 1 : 0));
  }
  auto partial = [&](int64_t r0, int64_t r1, T* work, T* const* gw, T* const* gb, std::nullptr_t) {
    const int64_t rows = r1 - r0;
    std::vector<const T*> out(L);
    for (size_t l = 0; l + 1 < L; ++l) out[l] = saved.hidden + saved.hidden_at[l] + r0 * c.layers[l].N;
    out[L - 1] = saved.output ? saved.output + r0 * n_out : nullptr;
    std::copy(saved.grad_output + r0 * n_out, saved.grad_output + r1 * n_out, work);
    narrow_backward_rows(c, r0, rows, out.data(), work, work + rows * widest, gw, gb);
    return 0.0;
  };
  // Scratch per row: two gradient buffers.
  run_row_partials(c, row_partials(c, macs_per_row), 2 * widest, grad_w, grad_b, partial,
                   [](std::vector<T>&) { return nullptr; });
}

// Whether row partials serve this chain (float / double; see
// kRowPartialsSmallBatch), and a second partial's gradients fit
// kMaxStepPartialBytes (larger models keep the generic path, whose kernels
// split the columns of each layer over the threads instead).
inline bool row_partials_eligible(const at::Tensor& input, at::TensorList weights) {
  const int64_t batch = input.size(0);
  if (batch == 0 || batch > kRowPartialsMaxBatch) return false;
  if (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble) return false;
  int64_t param_bytes = 0;
  for (const at::Tensor& w : weights) param_bytes += (w.numel() + w.size(0)) * static_cast<int64_t>(input.element_size());
  if (param_bytes > kMaxStepPartialBytes) return false;
  for (size_t l = 0; l < weights.size(); ++l) {
    const int64_t width = weights[l].size(0);
    if (width > (batch > kRowPartialsSmallBatch ? kLargePartialWidth : kMaxPartialWidth)) return false;
  }
  return true;
}

// The tensors behind a NarrowChain: the input with unit column stride,
// contiguous weights and biases, and the gradients asked for (allocated here).
struct ChainTensors {
  at::Tensor x, grad_input;
  std::vector<at::Tensor> w, b, grad_w, grad_b;
  size_t lowest;

  ChainTensors(const at::Tensor& input, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
               bool input_grad, const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask)
      : x(input.stride(1) == 1 ? input : input.contiguous()),
        w(weights.size()),
        b(weights.size()),
        grad_w(weights.size()),
        grad_b(weights.size()),
        lowest(weights.size()) {
    for (size_t l = 0; l < weights.size(); ++l) {
      w[l] = weights[l].contiguous();
      const c10::optional<at::Tensor> bias = biases.get(l);
      if (bias.has_value() && bias->defined()) b[l] = bias->contiguous();
      if (weight_mask[l]) grad_w[l] = at::empty(w[l].sizes(), x.options());
      if (bias_mask[l]) grad_b[l] = at::empty({w[l].size(0)}, x.options());
      if (lowest == weights.size() && (weight_mask[l] || bias_mask[l])) lowest = l;
    }
    if (input_grad) {
      grad_input = at::empty(x.sizes(), x.options());
      lowest = 0;
    }
  }

  // The chain as pointers; gw / gb get each layer's gradient (nullptr where not wanted).
  template <typename T> NarrowChain<T> chain(bool last_relu, std::vector<T*>& gw, std::vector<T*>& gb) {
    NarrowChain<T> c;
    c.x = x.const_data_ptr<T>();
    c.ldx = x.stride(0);
    c.batch = x.size(0);
    c.lowest = lowest;
    c.grad_input = grad_input.defined() ? grad_input.data_ptr<T>() : nullptr;
    gw.assign(w.size(), nullptr);
    gb.assign(w.size(), nullptr);
    for (size_t l = 0; l < w.size(); ++l) {
      ChainLayer<T> layer;
      layer.w = w[l].const_data_ptr<T>();
      layer.bias = b[l].defined() ? b[l].const_data_ptr<T>() : nullptr;
      layer.N = w[l].size(0);
      layer.K = w[l].size(1);
      layer.relu = l + 1 < w.size() || last_relu;
      layer.want_w = grad_w[l].defined();
      layer.want_b = grad_b[l].defined();
      layer.grad_w_at = c.grad_elems;
      c.grad_elems += layer.want_w ? layer.N * layer.K : 0;
      layer.grad_b_at = c.grad_elems;
      c.grad_elems += layer.want_b ? layer.N : 0;
      c.layers.push_back(layer);
      if (layer.want_w) gw[l] = grad_w[l].data_ptr<T>();
      if (layer.want_b) gb[l] = grad_b[l].data_ptr<T>();
    }
    return c;
  }

  // The op contract's gradients: empty tensors for those not asked for.
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gradients() const {
    std::vector<at::Tensor> gw(w.size()), gb(w.size());
    for (size_t l = 0; l < w.size(); ++l) {
      gw[l] = or_empty(grad_w[l], x);
      gb[l] = or_empty(grad_b[l], x);
    }
    return {or_empty(grad_input, x), gw, gb};
  }
};

}  // namespace fastmlp::cpu
