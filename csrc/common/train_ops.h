// fastmlp::mlp_train_step and fastmlp::mlp_train_epoch for every backend: a
// whole training step (the chain forward, the loss, every gradient, clipping,
// the optimizer update) as one op, and a whole epoch of such steps over
// minibatches drawn through a permutation, with no Python between the phases
// or the batches. The gradients come from the backend's fastmlp::mlp_loss_step,
// the update from OptimOps<Kernels>, unless the backend runs both itself
// (OptimKernels::fused_step, where it has one: e.g. the update inside the
// gradient reduction).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <concepts>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/mlp_loss_ops.h"
#include "common/optim_ops.h"

namespace fastmlp {

using TrainStepResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The gradients of a step apart from its update: fastmlp::mlp_loss_step through
// the dispatcher, so each backend's own kernel (row partials, tiles, the fused
// CUDA chain) runs. (A backend's fused_step, where it serves, calls its
// kernels directly: a profiler then records only mlp_train_step.)
inline LossStepResult step_gradients(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                                     const c10::List<std::optional<at::Tensor>>& biases, bool last_relu,
                                     const StepLossArgs& loss, const c10::List<bool>& weight_mask,
                                     const c10::List<bool>& bias_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmlp::mlp_loss_step", "")
          .typed<LossStepResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                                const c10::List<std::optional<at::Tensor>>&, bool, int64_t,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                double, bool, const c10::List<bool>&, const c10::List<bool>&)>();
  return op.call(input, target, weights, biases, last_relu, loss.kind, loss.weight, loss.pos_weight, loss.reduction,
                 loss.ignore_index, loss.label_smoothing, false, weight_mask, bias_mask);
}

// The trainable parameters in layer order (weight, then bias) and their
// gradients: the lists the update takes, in the order of its state and hyper.
inline void trainable_with_grads(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                                 const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask,
                                 const std::vector<at::Tensor>& grad_w, const std::vector<at::Tensor>& grad_b,
                                 std::vector<at::Tensor>& params, std::vector<at::Tensor>& grads) {
  params.clear();
  grads.clear();
  for (size_t l = 0; l < weights.size(); ++l) {
    if (weight_mask.get(l)) {
      params.push_back(weights[l]);
      grads.push_back(grad_w[l]);
    }
    if (bias_mask.get(l)) {
      params.push_back(*biases.get(l));
      grads.push_back(grad_b[l]);
    }
  }
}

// Whether a backend's optimizer kernels run a whole step themselves:
// Kernels::fused_step(input, target, weights, biases, last_relu, loss, weight_mask,
// bias_mask, state, optimizer, hyper, max_grad_norm) -> optional<TrainStepResult>.
template <class K>
concept has_fused_step = requires(const at::Tensor& t, at::TensorList l, const c10::List<std::optional<at::Tensor>>& b,
                                  const StepLossArgs& loss, const c10::List<bool>& m, c10::ArrayRef<double> h,
                                  std::optional<double> g) {
  { K::fused_step(t, t, l, b, true, loss, m, m, l, int64_t(0), h, g) } -> std::same_as<std::optional<TrainStepResult>>;
};

template <class OptimKernels> struct TrainOps {
  static TrainStepResult step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases, bool last_relu, int64_t loss_kind,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                              int64_t reduction, int64_t ignore_index, double label_smoothing,
                              const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask,
                              at::TensorList state, int64_t optimizer, c10::ArrayRef<double> hyper,
                              std::optional<double> max_grad_norm) {
    check_masks(weights, biases, weight_mask, bias_mask);
    BelowAutograd below_autograd;
    const StepLossArgs args = step_loss_args(loss_kind, weight, pos_weight, reduction, ignore_index, label_smoothing);
    return one_step(input, target, weights, biases, last_relu, args, weight_mask, bias_mask, state, optimizer, hyper,
                    max_grad_norm);
  }

  // Batches of `batch_size` rows of inputs / targets in the order of `order` (row
  // indices, e.g. a permutation, or None for every row in its own order), the
  // last one short unless drop_last. Returns every batch's loss and the last batch's gradients.
  static TrainStepResult epoch(const at::Tensor& inputs, const at::Tensor& targets,
                               const std::optional<at::Tensor>& order, int64_t batch_size, bool drop_last,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                               bool last_relu, int64_t loss_kind, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& pos_weight, int64_t reduction, int64_t ignore_index,
                               double label_smoothing, const c10::List<bool>& weight_mask,
                               const c10::List<bool>& bias_mask,
                               at::TensorList state, int64_t optimizer, c10::ArrayRef<double> hyper,
                               std::optional<double> max_grad_norm) {
    TORCH_CHECK(batch_size > 0, "fastmlp.mlp_train_epoch: batch_size should be a positive integer value, but got ",
                "batch_size=", batch_size);
    TORCH_CHECK(inputs.dim() == 2 && (targets.dim() == 1 || targets.dim() == 2) && inputs.size(0) == targets.size(0),
                "fastmlp.mlp_train_epoch: expected 2-D inputs and 1-D or 2-D targets with the same number of rows, ",
                "got ", inputs.sizes(), " and ", targets.sizes());
    const bool shuffled = order.has_value() && order->defined();
    at::Tensor perm;
    if (shuffled) {
      TORCH_CHECK(order->dim() == 1 && order->scalar_type() == at::kLong,
                  "fastmlp.mlp_train_epoch: order must be a 1-D int64 tensor of row indices, got ",
                  order->sizes(), " ", order->scalar_type());
      TORCH_CHECK(order->device() == inputs.device(), "fastmlp.mlp_train_epoch: order must be on ",
                  inputs.device(), ", got ", order->device());
      perm = order->contiguous();
    }
    check_masks(weights, biases, weight_mask, bias_mask);
    BelowAutograd below_autograd;
    const StepLossArgs args = step_loss_args(loss_kind, weight, pos_weight, reduction, ignore_index, label_smoothing);
    const int64_t rows = shuffled ? perm.size(0) : inputs.size(0);  // rows visited, in batches
    const int64_t batches = drop_last ? rows / batch_size : (rows + batch_size - 1) / batch_size;
    std::vector<at::Tensor> losses;
    losses.reserve(batches);
    std::vector<at::Tensor> grad_w, grad_b;
    // One buffer per operand for every batch's gathered rows (a fresh input-sized
    // allocation per batch can pay its page faults every time).
    at::Tensor x_buf, y_buf;
    if (shuffled && batches > 0) {
      const int64_t buf_rows = std::min(batch_size, rows);
      x_buf = at::empty({buf_rows, inputs.size(1)}, inputs.options());
      std::vector<int64_t> y_rows(targets.sizes().begin(), targets.sizes().end());
      y_rows[0] = buf_rows;
      y_buf = at::empty(y_rows, targets.options());
    }
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t start = b * batch_size, len = std::min(batch_size, rows - start);
      at::Tensor x, y;
      if (shuffled) {
        const at::Tensor idx = perm.narrow(0, start, len);
        x = x_buf.narrow(0, 0, len);
        y = y_buf.narrow(0, 0, len);
        at::index_select_out(x, inputs, 0, idx);
        at::index_select_out(y, targets, 0, idx);
      } else {
        x = inputs.narrow(0, start, len);
        y = targets.narrow(0, start, len);
      }
      auto [loss, gw, gb] = one_step(x, y, weights, biases, last_relu, args, weight_mask, bias_mask, state, optimizer,
                                     hyper, max_grad_norm);
      losses.push_back(loss);
      grad_w = std::move(gw);
      grad_b = std::move(gb);
    }
    at::Tensor all = losses.empty() ? at::empty({0}, inputs.options()) : at::stack(losses);
    if (batches == 0) {
      // No batch: no step, and no gradients (torch leaves .grad as it was: None after zero_grad).
      for (size_t l = 0; l < weights.size(); ++l) {
        grad_w.push_back(at::empty({0}, inputs.options()));
        grad_b.push_back(at::empty({0}, inputs.options()));
      }
    }
    return {all, grad_w, grad_b};
  }

 private:
  // One step: the backend's fused step where it has one and it serves, else
  // the gradients through the dispatcher and then the update.
  static TrainStepResult one_step(const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& biases, bool last_relu,
                                  const StepLossArgs& args, const c10::List<bool>& weight_mask,
                                  const c10::List<bool>& bias_mask, at::TensorList state, int64_t optimizer,
                                  c10::ArrayRef<double> hyper, std::optional<double> max_grad_norm) {
    if constexpr (has_fused_step<OptimKernels>) {
      if (auto fused = OptimKernels::fused_step(x, y, weights, biases, last_relu, args, weight_mask, bias_mask, state,
                                                optimizer, hyper, max_grad_norm)) {
        return std::move(*fused);
      }
    }
    auto [loss, grad_input, grad_w, grad_b] =
        step_gradients(x, y, weights, biases, last_relu, args, weight_mask, bias_mask);
    update(weights, biases, weight_mask, bias_mask, grad_w, grad_b, state, optimizer, hyper, max_grad_norm);
    return {loss, grad_w, grad_b};
  }

  static void check_masks(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                          const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
    TORCH_CHECK(biases.size() == weights.size() && weight_mask.size() == weights.size() &&
                    bias_mask.size() == weights.size(),
                "fastmlp.mlp_train_step: expected one bias, weight_mask and bias_mask entry per layer (",
                weights.size(), "), got ", biases.size(), ", ", weight_mask.size(), " and ", bias_mask.size());
    for (size_t l = 0; l < weights.size(); ++l) {
      const std::optional<at::Tensor> b = biases.get(l);
      TORCH_CHECK(!bias_mask.get(l) || (b.has_value() && b->defined()),
                  "fastmlp.mlp_train_step: bias_mask[", l, "] is set but layer ", l, " has no bias");
    }
  }

  // The update of the trainable parameters with their gradients.
  static void update(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                     const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask,
                     const std::vector<at::Tensor>& grad_w, const std::vector<at::Tensor>& grad_b,
                     at::TensorList state, int64_t optimizer, c10::ArrayRef<double> hyper,
                     std::optional<double> max_grad_norm) {
    std::vector<at::Tensor> params, grads;
    trainable_with_grads(weights, biases, weight_mask, bias_mask, grad_w, grad_b, params, grads);
    OptimOps<OptimKernels>::step(params, grads, state, optimizer, hyper, max_grad_norm);
  }
};

// Registers a backend's optimizer_step, mlp_train_step and mlp_train_epoch.
#define FASTMLP_REGISTER_TRAIN_OPS(m, OptimKernels)                                       \
  do {                                                                                    \
    (m).impl("optimizer_step", &::fastmlp::OptimOps<OptimKernels>::step);                  \
    (m).impl("mlp_train_step", &::fastmlp::TrainOps<OptimKernels>::step);                  \
    (m).impl("mlp_train_epoch", &::fastmlp::TrainOps<OptimKernels>::epoch);                \
  } while (0)

}  // namespace fastmlp
