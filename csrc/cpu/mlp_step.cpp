// CPU kernels of fastmlp::mlp_bce_step and fastmlp::mlp_loss_step (the whole
// training step's math, with a BCE, MSE or cross-entropy loss).
//
// For a narrow chain (every hidden width <= 128), rows are split into parts
// that are processed start to finish while their rows of the input are still in
// cache: forward, loss, logits gradient, backward and the part's parameter
// gradients, so the input is read from memory once per step instead of twice
// (forward, then the first layer's weight gradient).
//  - up to kRowPartialsSmallBatch rows: a few row partials in one parallel
//    region (narrow_step.h), one thread wake-up per step;
//  - larger ones: tiles of kTileRows (or two halves of a smaller batch),
//    grouped into a fixed number of partials, each through the chain's ops.
// Either way the parts are fixed by the batch size and their sums are added in
// order, so the result does not depend on the thread count. The loss of a
// part's rows is one pass of the loss's vector kernel (RowLoss below), its
// gradient scaled for the whole batch's mean. Anything else takes the generic
// composition.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/autotune.h"
#include "common/mlp_loss_ops.h"
#include "cpu/bce_backend.h"
#include "cpu/cross_entropy_backend.h"
#include "cpu/layer_backend.h"
#include "cpu/mse_backend.h"
#include "cpu/narrow_step.h"
#include "cpu/optim_kernels.h"
#include "cpu/train_step.h"

namespace fastmlp::cpu {
namespace {

static_assert(kOptimChunk % kReduceBlock == 0, "the fused update must split parameters where optimizer_step does");

using Generic = MlpLossOps<CpuKernels, CpuBceKernels, CpuMseKernels, CpuCrossEntropyKernels>;
using Layers = LayerOps<CpuKernels>;

constexpr int64_t kTileRows = 1024;  // 784 float features: ~3 MB of input per tile, inside L3
constexpr int64_t kMaxPartials = 16;  // bounds the partial-gradient memory

// Rows per tile: the batch in equal tiles of at most about kTileRows (at least
// two: each thread runs its rows' forward and backward while they are in its own
// cache), their count rounded up to a multiple of 4 (of kMaxPartials past that)
// so that the tiles and partials split evenly over 2 or 4 threads: 12396 rows as
// 12 tiles of 1024 and one of 108 left one thread 7 full tiles and the other 5
// (7.50 ms; 12288 rows: 6.70 ms). A function of the batch only.
int64_t tile_rows(int64_t batch) {
  int64_t tiles = std::max<int64_t>(2, (batch + kTileRows - 1) / kTileRows);
  if (tiles > 2) {
    const int64_t multiple = tiles > kMaxPartials ? kMaxPartials : 4;
    tiles = (tiles + multiple - 1) / multiple * multiple;
  }
  return ((batch + tiles - 1) / tiles + 15) / 16 * 16;
}

// Whether the row-partitioned paths serve this chain: float / double, narrow hidden layers.
bool chain_eligible(const at::Tensor& input, at::TensorList weights) {
  if (input.size(0) == 0) return false;
  if (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble) return false;
  for (size_t l = 0; l + 1 < weights.size(); ++l) {
    if (weights[l].size(0) > kMaxPartialWidth) return false;
  }
  return true;
}

// acc = t (first) or acc += t, keeping undefined/empty (not asked for) as is.
void accumulate(at::Tensor& acc, const at::Tensor& t) {
  if (t.numel() == 0 && (!acc.defined() || acc.numel() == 0)) {
    acc = t;
  } else if (!acc.defined()) {
    acc = t;  // a fresh tensor of this tile's: taken over
  } else {
    acc.add_(t);
  }
}

// The loss of a block of whole rows from their logits [rows, N_out]
// (contiguous), d loss / d logits written in the same pass and scaled by
// `scale` (the batch's mean, or 1): the loss_rows of narrow_step.
template <typename T> struct BceRows {
  const T* target = nullptr;
  int64_t n_out = 0;
  VecPattern<T> weight, pos_weight;  // repeat per row: indexed within the block
  T scale = T(1);
  double operator()(const T* logits, int64_t r0, int64_t rows, T* grad) const {
    return bce_forward_vec(logits, target + r0 * n_out, weight, pos_weight, static_cast<T*>(nullptr), grad, scale,
                           int64_t(0), rows * n_out);
  }
};

template <typename T> struct MseRows {
  const T* target = nullptr;
  int64_t n_out = 0;
  T scale = T(1);
  double operator()(const T* logits, int64_t r0, int64_t rows, T* grad) const {
    return mse_forward_vec(logits, target + r0 * n_out, static_cast<T*>(nullptr), grad, scale, int64_t(0),
                           rows * n_out);
  }
};

template <typename T> struct CrossEntropyRows {
  CeRows<T> base;  // weight (padded), constants, ignore_index, scale
  const int64_t* index = nullptr;  // class indices, or
  const T* prob = nullptr;         // probabilities [B, N_out]
  double operator()(const T* logits, int64_t r0, int64_t rows, T* grad) const {
    CeRows<T> a = base;
    const int64_t C = a.classes;
    a.x = logits;
    a.x_end = logits + rows * C;
    if (index != nullptr) {
      a.target_index = index + r0;
    } else {
      a.target_prob = prob + r0 * C;
      a.y_end = a.target_prob + rows * C;
    }
    a.grad = grad;
    return ce_rows_vec(a, 0, rows);
  }
};

// Calls f(row_loss, denominator) with the RowLoss of `loss` for T: the loss is
// the rows' sum divided by the denominator (1 for a sum; for a mean the element
// count, or cross-entropy's weight of the rows not ignored). Its storage lives
// for the call. Checks cross-entropy's class indices first.
template <typename T, typename F>
void with_row_loss(const StepLossArgs& loss, const at::Tensor& y, int64_t batch, int64_t n_out, const F& f) {
  const bool mean = loss.reduction == kReductionMean;
  if (loss.kind == kStepLossBce) {
    std::vector<T> weight_ext, pos_weight_ext;
    BceRows<T> rows;
    rows.target = y.const_data_ptr<T>();
    rows.n_out = n_out;
    rows.weight = vec_pattern(bce_pattern(loss.weight), weight_ext);
    rows.pos_weight = vec_pattern(bce_pattern(loss.pos_weight), pos_weight_ext);
    const double denominator = mean ? static_cast<double>(batch * n_out) : 1.0;
    rows.scale = static_cast<T>(1.0 / denominator);
    f(rows, denominator);
  } else if (loss.kind == kStepLossMse) {
    MseRows<T> rows;
    rows.target = y.const_data_ptr<T>();
    rows.n_out = n_out;
    const double denominator = mean ? static_cast<double>(batch * n_out) : 1.0;
    rows.scale = mean ? T(1) / static_cast<T>(batch * n_out) : T(1);  // as the MSE kernel scales
    f(rows, denominator);
  } else {
    const at::Tensor w = ce_weight(loss.weight);
    // (also the check of the class indices, needed for a sum too)
    const double weight_of_rows = CpuCrossEntropyKernels::denominator<T>(batch, n_out, y, w, loss.ignore_index);
    const double denominator = mean ? weight_of_rows : 1.0;
    CrossEntropyRows<T> rows;
    CeRows<T>& a = rows.base;
    a.classes = n_out;
    a.ignore_index = loss.ignore_index;
    a.scale = static_cast<T>(1.0 / denominator);
    std::vector<T> padded;
    if (w.defined()) a.weight = ce_padded_weight(w, n_out, padded);
    a.k = ce_constants<T>(static_cast<T>(loss.label_smoothing), n_out, static_cast<T>(ce_weight_sum<T>(w, n_out)));
    if (ce_index_target(y)) {
      rows.index = y.const_data_ptr<int64_t>();
    } else {
      rows.prob = y.const_data_ptr<T>();
    }
    f(rows, denominator);
  }
}

// The loss value from the rows' sum, as the loss's own op rounds it.
double reduced_loss(const StepLossArgs& loss, double sum, double denominator) {
  if (loss.kind == kStepLossBce) return sum * (1.0 / denominator);
  return loss.reduction == kReductionMean ? sum / denominator : sum;
}

// What runs on a small batch's summed gradients: nothing (a loss step).
struct NoUpdate {
  template <typename T> NoEpilogue epilogue(const ChainTensors&) const { return {}; }
};

// A small batch: narrow_step's row partials in one parallel region. `after`'s
// epilogue<T>(tensors), made once the gradients are complete, runs on each
// block of them as the reduction sums it (e.g. the optimizer's update).
template <class After = NoUpdate>
LossStepResult row_partials_step(const at::Tensor& input, const at::Tensor& y, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                                 const StepLossArgs& loss, bool input_grad, const c10::List<bool>& weight_mask,
                                 const c10::List<bool>& bias_mask, const After& after = {}) {
  BelowAutograd below_autograd;
  ChainTensors t(input, weights, biases, input_grad, weight_mask, bias_mask);
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(t.x.scalar_type(), "fastmlp_row_partials_step", [&] {
    std::vector<scalar_t*> gw, gb;
    const NarrowChain<scalar_t> chain = t.chain<scalar_t>(last_relu, gw, gb);
    with_row_loss<scalar_t>(loss, y, chain.batch, chain.layers.back().N, [&](const auto& rows, double denominator) {
      const auto after_partials = [&] { return after.template epilogue<scalar_t>(t); };
      value = reduced_loss(loss, narrow_step(chain, rows, gw, gb, after_partials), denominator);
    });
  });
  auto [grad_input, grad_w, grad_b] = t.gradients();
  return {at::scalar_tensor(value, t.x.options()), grad_input, grad_w, grad_b};
}

// A larger batch: tiles of rows through the chain's ops, in a fixed number of partials.
LossStepResult tiled_step(const at::Tensor& input, const at::Tensor& y, at::TensorList weights,
                          const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                          const StepLossArgs& loss, bool input_grad, const c10::List<bool>& weight_mask,
                          const c10::List<bool>& bias_mask) {
  const size_t layers = weights.size();
  const int64_t batch = input.size(0), out_features = weights.back().size(0);
  const int64_t tile = tile_rows(batch);
  const int64_t tiles = (batch + tile - 1) / tile;
  const int64_t tiles_per_partial = (tiles + kMaxPartials - 1) / kMaxPartials;
  const int64_t partials = (tiles + tiles_per_partial - 1) / tiles_per_partial;

  at::Tensor grad_input = input_grad ? at::empty(input.sizes(), input.options()) : at::Tensor();
  std::vector<double> loss_partial(partials, 0.0);
  std::vector<std::vector<at::Tensor>> gw(partials, std::vector<at::Tensor>(layers));
  std::vector<std::vector<at::Tensor>> gb(partials, std::vector<at::Tensor>(layers));
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastmlp_tiled_step", [&] {
    with_row_loss<scalar_t>(loss, y, batch, out_features, [&](const auto& rows_loss, double denominator) {
      at::parallel_for(0, partials, 1, [&](int64_t p_begin, int64_t p_end) {
        BelowAutograd below_autograd;
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t t_end = std::min(tiles, (p + 1) * tiles_per_partial);
          for (int64_t t = p * tiles_per_partial; t < t_end; ++t) {
            const int64_t r0 = t * tile, rows = std::min(tile, batch - r0);
            const at::Tensor x = input.narrow(0, r0, rows);
            auto [out, hidden] = Layers::mlp_forward(x, weights, biases, last_relu);
            const at::Tensor output = out.contiguous();
            at::Tensor grad_logits = at::empty_like(output);
            loss_partial[p] +=
                rows_loss(output.const_data_ptr<scalar_t>(), r0, rows, grad_logits.data_ptr<scalar_t>());
            auto [gi, tile_gw, tile_gb] = Layers::mlp_backward(grad_logits, x, weights, hidden, output, last_relu,
                                                               input_grad, weight_mask, bias_mask);
            if (input_grad) grad_input.narrow(0, r0, rows).copy_(gi);
            for (size_t l = 0; l < layers; ++l) {
              accumulate(gw[p][l], tile_gw[l]);
              accumulate(gb[p][l], tile_gb[l]);
            }
          }
        }
      });
      double total = 0;
      for (double v : loss_partial) total += v;
      value = reduced_loss(loss, total, denominator);
    });
  });
  std::vector<at::Tensor> grad_w(layers), grad_b(layers);
  for (size_t l = 0; l < layers; ++l) {
    grad_w[l] = gw[0][l];
    grad_b[l] = gb[0][l];
    for (int64_t p = 1; p < partials; ++p) {
      if (grad_w[l].numel() > 0) grad_w[l].add_(gw[p][l]);
      if (grad_b[l].numel() > 0) grad_b[l].add_(gb[p][l]);
    }
  }
  return {at::scalar_tensor(value, input.options()), or_empty(grad_input, input), grad_w, grad_b};
}

// The checks of a BCE step's target and weights; whether they repeat per row
// (else the generic path: a block of whole rows sees the patterns from offset
// 0 only when they do).
bool check_bce_step(const StepLossArgs& loss, const at::Tensor& input, const at::Tensor& target, int64_t batch,
                    int64_t out_features) {
  TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == out_features,
              "fastmlp.mlp_bce_step: Target size (", target.sizes(), ") must be the same as input size ([", batch,
              ", ", out_features, "])");
  check_same(target, input, "target", "input");
  check_bce_pattern(loss.weight, target, "weight");
  check_bce_pattern(loss.pos_weight, target, "pos_weight");
  auto per_row = [&](const c10::optional<at::Tensor>& t) {
    return !defined(t) || (t->numel() > 0 && out_features % t->numel() == 0);
  };
  return per_row(loss.weight) && per_row(loss.pos_weight);
}

// How loss_step runs a step whose arguments passed its checks: the generic
// composition of the layer and loss ops, row partials (small batches) or tiles.
enum class StepPath { kGeneric, kRowPartials, kTiles };

StepPath step_path(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                   const StepLossArgs& loss) {
  const int64_t batch = input.size(0), out_features = weights.back().size(0);
  if (!chain_eligible(input, weights) ||
      (loss.kind == kStepLossBce && !check_bce_step(loss, input, target, batch, out_features))) {
    return StepPath::kGeneric;
  }
  // Row partials up to kRowPartialsSmallBatch rows; past that the half-batch tiles are as fast (measured,
  // 784 -> 30 -> 1, row partials vs tiles: 240 vs 271 us at 256 rows, 421 vs 407 us at 512).
  return batch <= kRowPartialsSmallBatch && row_partials_eligible(input, weights) ? StepPath::kRowPartials
                                                                                   : StepPath::kTiles;
}

// The autotuner's key of a step: the chain's shapes, the loss and which gradients.
std::string loss_step_key(const at::Tensor& input, at::TensorList weights, bool last_relu, const StepLossArgs& loss,
                          bool input_grad, const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  std::vector<int64_t> extra{loss.kind, loss.reduction, last_relu ? 1 : 0, input_grad ? 1 : 0};
  append_mask_dims(extra, weight_mask, bias_mask);
  return chain_autotune_key("cpu_loss_step", input, weights, extra);
}

void check_loss_step_args(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                          const c10::List<c10::optional<at::Tensor>>& biases, const StepLossArgs& loss,
                          const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  check_mlp_args(input, weights, biases);
  check_step_loss(loss, input, target, input.size(0), weights.back().size(0));
  TORCH_CHECK(weight_mask.size() == weights.size() && bias_mask.size() == weights.size(),
              "fastmlp.mlp_bce_step: expected one weight_mask and bias_mask entry per layer (", weights.size(),
              "), got ", weight_mask.size(), " and ", bias_mask.size());
}

LossStepResult loss_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                         const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu, const StepLossArgs& loss,
                         bool input_grad, const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  check_loss_step_args(input, target, weights, biases, loss, weight_mask, bias_mask);
  const StepPath path = step_path(input, target, weights, loss);
  if (path == StepPath::kGeneric) {
    return Generic::step(input, target, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask);
  }
  const at::Tensor y = target.contiguous();
  // Rows through the chain start to finish, unless a first-use timing found
  // the layer by layer composition (each layer's own BLAS or narrow kernels) faster.
  LossStepResult result;
  Autotuner::instance().run(
      [&] { return loss_step_key(input, weights, last_relu, loss, input_grad, weight_mask, bias_mask); }, 0,
      [&] {
        result = path == StepPath::kRowPartials
                     ? row_partials_step(input, y, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask)
                     : tiled_step(input, y, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask);
      },
      [&] {
        result = Generic::step(input, target, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask);
      });
  return result;
}

// The optimizer's update as the epilogue of the gradient reduction. The
// update's checks and its slots (Adam's step counts advance as they are made)
// come once the gradients are complete, as in the separate path: the loss's
// errors first, and nothing written before the last check.
struct FusedUpdate {
  at::TensorList weights;
  const c10::List<std::optional<at::Tensor>>& biases;
  const c10::List<bool>& weight_mask;
  const c10::List<bool>& bias_mask;
  at::TensorList state;
  int64_t optimizer;
  c10::ArrayRef<double> hyper;
  // The trainable parameters and their gradients in layer order, weight then bias
  // (the order of the reduction's gradients); filled by epilogue().
  mutable std::vector<at::Tensor> params, grads;

  template <typename T> auto epilogue(const ChainTensors& t) const {
    using Optim = OptimOps<CpuOptimKernels>;
    trainable_with_grads(weights, biases, weight_mask, bias_mask, t.grad_w, t.grad_b, params, grads);
    Optim::check_args(params, grads, state, optimizer, hyper);
    std::vector<SgdSlot<T>> sgd;
    std::vector<AdamSlot<T>> adam;
    if (optimizer == kOptimSgd) {
      sgd = Optim::template sgd_slots<T>(params, grads, state, hyper);
    } else {
      adam = Optim::template adam_slots<T>(params, grads, state, hyper);
    }
    return [sgd = std::move(sgd), adam = std::move(adam)](size_t k, int64_t begin, int64_t end) {
      if (!sgd.empty()) {
        update_range(sgd[k], begin, end);
      } else {
        update_range(adam[k], begin, end);
      }
    };
  }
};

}  // namespace

// A small batch's row partials with the optimizer's update in their gradient
// reduction: each block of elements is summed over the partials and updated
// while it is in cache, in the region that sums them (no pass and no pool
// wake-up of its own). Clipping needs the whole gradient's norm before the
// first update: the gradients and the update apart.
std::optional<TrainStepResult> fused_train_step(const at::Tensor& input, const at::Tensor& target,
                                                at::TensorList weights,
                                                const c10::List<std::optional<at::Tensor>>& biases, bool last_relu,
                                                const StepLossArgs& loss, const c10::List<bool>& weight_mask,
                                                const c10::List<bool>& bias_mask, at::TensorList state,
                                                int64_t optimizer, c10::ArrayRef<double> hyper,
                                                std::optional<double> max_grad_norm) {
  // Cheap refusals first: loss_step checks the arguments again on the other path.
  if (max_grad_norm.has_value() || input.dim() != 2 || input.size(0) > kRowPartialsSmallBatch) return std::nullopt;
  bool any_trainable = false;
  for (size_t l = 0; l < weight_mask.size() && l < bias_mask.size(); ++l)
    any_trainable = any_trainable || weight_mask[l] || bias_mask[l];
  if (!any_trainable) return std::nullopt;
  check_loss_step_args(input, target, weights, biases, loss, weight_mask, bias_mask);
  if (step_path(input, target, weights, loss) != StepPath::kRowPartials) return std::nullopt;
  // Autotuning: loss_step times the row partials against the layer by layer
  // composition at the first step of a shape (this step then runs apart);
  // the update is fused only into the row partials.
  const Autotuner& tuner = Autotuner::instance();
  if (tuner.enabled() &&
      tuner.cached_choice(loss_step_key(input, weights, last_relu, loss, false, weight_mask, bias_mask)) != 0) {
    return std::nullopt;
  }
  const FusedUpdate update{weights, biases, weight_mask, bias_mask, state, optimizer, hyper, {}, {}};
  auto [loss_value, grad_input, grad_w, grad_b] = row_partials_step(
      input, target.contiguous(), weights, biases, last_relu, loss, false, weight_mask, bias_mask, update);
  OptimOps<CpuOptimKernels>::bump_versions(update.params, update.grads, state, false);
  return TrainStepResult{loss_value, grad_w, grad_b};
}

}  // namespace fastmlp::cpu

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_STEP_OPS(m, fastmlp::cpu::loss_step); }
