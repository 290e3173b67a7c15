// CPU kernel of fastmlp::mlp_bce_step (the whole training step's math).
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
// order, so the result does not depend on the thread count. Anything else
// takes the generic composition.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/mlp_bce_ops.h"
#include "cpu/bce_backend.h"
#include "cpu/layer_backend.h"
#include "cpu/narrow_step.h"

namespace fastmlp::cpu {
namespace {

using Generic = MlpBceOps<CpuKernels, CpuBceKernels>;
using Layers = LayerOps<CpuKernels>;
using Bce = BceOps<CpuBceKernels>;

constexpr int64_t kTileRows = 1024;  // 784 float features: ~3 MB of input per tile, inside L3
constexpr int64_t kMaxPartials = 16;  // bounds the partial-gradient memory

using StepResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

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

// A small batch: narrow_step's row partials in one parallel region.
StepResult row_partials_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                             int64_t reduction, bool input_grad, const c10::List<bool>& weight_mask,
                             const c10::List<bool>& bias_mask) {
  TORCH_CHECK(weight_mask.size() == weights.size() && bias_mask.size() == weights.size(),
              "fastmlp.mlp_bce_step: expected one weight_mask and bias_mask entry per layer (", weights.size(),
              "), got ", weight_mask.size(), " and ", bias_mask.size());
  const at::Tensor y = target.contiguous();  // the logits' shape, dtype and device
  check_bce_pattern(weight, y, "weight");
  check_bce_pattern(pos_weight, y, "pos_weight");
  BelowAutograd below_autograd;
  ChainTensors t(input, weights, biases, input_grad, weight_mask, bias_mask);
  const at::Tensor weight_pattern = bce_pattern(weight), pos_weight_pattern = bce_pattern(pos_weight);
  const double mean_scale = reduction == kReductionMean ? 1.0 / static_cast<double>(y.numel()) : 1.0;
  double loss_sum = 0;
  AT_DISPATCH_FLOATING_TYPES(t.x.scalar_type(), "fastmlp_row_partials_step", [&] {
    std::vector<scalar_t*> gw, gb;
    const NarrowChain<scalar_t> chain = t.chain<scalar_t>(last_relu, gw, gb);
    StepLoss<scalar_t> loss;
    loss.target = y.const_data_ptr<scalar_t>();
    std::vector<scalar_t> weight_ext, pos_weight_ext;
    loss.weight = vec_pattern(weight_pattern, weight_ext);
    loss.pos_weight = vec_pattern(pos_weight_pattern, pos_weight_ext);
    loss.grad_scale = static_cast<scalar_t>(mean_scale);
    loss_sum = narrow_step(chain, loss, gw, gb);
  });
  auto [grad_input, grad_w, grad_b] = t.gradients();
  return {at::scalar_tensor(loss_sum * mean_scale, t.x.options()), grad_input, grad_w, grad_b};
}

StepResult step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                int64_t reduction, bool input_grad, const c10::List<bool>& weight_mask,
                const c10::List<bool>& bias_mask) {
  check_mlp_args(input, weights, biases);
  if (!chain_eligible(input, weights)) {
    return Generic::step(input, target, weights, biases, last_relu, weight, pos_weight, reduction, input_grad,
                         weight_mask, bias_mask);
  }
  check_step_reduction(reduction);
  const int64_t batch = input.size(0), out_features = weights.back().size(0);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == out_features,
              "fastmlp.mlp_bce_step: Target size (", target.sizes(), ") must be the same as input size ([", batch,
              ", ", out_features, "])");
  check_same(target, input, "target", "input");
  // Per-element weights are patterns along the flattened [B, N_out] logits; a
  // tile of whole rows sees them from offset 0 only when they repeat per row.
  auto per_row = [&](const c10::optional<at::Tensor>& t) {
    return !t.has_value() || !t->defined() || (t->numel() > 0 && out_features % t->numel() == 0);
  };
  if (!per_row(weight) || !per_row(pos_weight)) {
    return Generic::step(input, target, weights, biases, last_relu, weight, pos_weight, reduction, input_grad,
                         weight_mask, bias_mask);
  }

  // Row partials up to kRowPartialsSmallBatch rows; past that the half-batch tiles are as fast (measured,
  // 784 -> 30 -> 1, row partials vs tiles: 240 vs 271 us at 256 rows, 421 vs 407 us at 512).
  if (batch <= kRowPartialsSmallBatch && row_partials_eligible(input, weights)) {
    return row_partials_step(input, target, weights, biases, last_relu, weight, pos_weight, reduction, input_grad,
                             weight_mask, bias_mask);
  }

  const size_t layers = weights.size();
  const int64_t tile = tile_rows(batch);
  const int64_t tiles = (batch + tile - 1) / tile;
  const int64_t tiles_per_partial = (tiles + kMaxPartials - 1) / kMaxPartials;
  const int64_t partials = (tiles + tiles_per_partial - 1) / tiles_per_partial;
  const double mean_scale = reduction == kReductionMean ? 1.0 / static_cast<double>(batch * out_features) : 1.0;

  at::Tensor grad_input = input_grad ? at::empty(input.sizes(), input.options()) : at::Tensor();
  std::vector<double> loss_partial(partials, 0.0);
  std::vector<std::vector<at::Tensor>> gw(partials, std::vector<at::Tensor>(layers));
  std::vector<std::vector<at::Tensor>> gb(partials, std::vector<at::Tensor>(layers));

  at::parallel_for(0, partials, 1, [&](int64_t p_begin, int64_t p_end) {
    BelowAutograd below_autograd;
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t t_end = std::min(tiles, (p + 1) * tiles_per_partial);
      for (int64_t t = p * tiles_per_partial; t < t_end; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, batch - r0);
        const at::Tensor x = input.narrow(0, r0, rows);
        auto [output, hidden] = Layers::mlp_forward(x, weights, biases, last_relu);
        // Sum-reduced tile loss; its gradient is per element, scaled for a mean.
        auto [loss, grad_logits] =
            Bce::forward(output, target.narrow(0, r0, rows), weight, pos_weight, kReductionSum, true);
        loss_partial[p] += loss.item<double>();
        if (mean_scale != 1.0) grad_logits.mul_(mean_scale);
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
  at::Tensor loss = at::scalar_tensor(total * mean_scale, input.options());
  std::vector<at::Tensor> grad_w(layers), grad_b(layers);
  for (size_t l = 0; l < layers; ++l) {
    grad_w[l] = gw[0][l];
    grad_b[l] = gb[0][l];
    for (int64_t p = 1; p < partials; ++p) {
      if (grad_w[l].numel() > 0) grad_w[l].add_(gw[p][l]);
      if (grad_b[l].numel() > 0) grad_b[l].add_(gb[p][l]);
    }
  }
  return {loss, or_empty(grad_input, input), grad_w, grad_b};
}

}  // namespace
}  // namespace fastmlp::cpu

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { m.impl("mlp_bce_step", &fastmlp::cpu::step); }
