// fastmlp::mlp_loss_step for every backend: mlp_bce_step generalised to a loss
// kind (BCE with logits, MSE, softmax cross-entropy). The chain forward, the
// reduced loss with its logits gradient in the same pass, and the chain
// backward, in one op call. This file has the loss kinds, their argument
// checks and the generic composition from the backend's LayerOps and loss
// kernels; a backend routes BCE to its own mlp_bce_step and may serve the other
// kinds with a fused path (cpu/mlp_bce.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/bce_ops.h"
#include "common/cross_entropy_ops.h"
#include "common/layer_ops.h"
#include "common/mse_ops.h"

namespace fastmlp {

// mlp_loss_step's `loss`.
enum StepLossKind : int64_t { kStepLossBce = 0, kStepLossMse = 1, kStepLossCrossEntropy = 2 };

// The loss of a step as the op takes it. weight: BCE's per-element pattern or
// cross-entropy's class weights [N_out]; pos_weight: BCE only.
struct StepLossArgs {
  int64_t kind = kStepLossBce;
  c10::optional<at::Tensor> weight, pos_weight;
  int64_t reduction = kReductionMean;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
};

inline bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The checks of a non-BCE loss against the chain's output [batch, out_features]
// (BCE is checked by mlp_bce_step). MSE: a target of the output's shape and no
// weights; cross-entropy: class indices [batch] (int64) or probabilities of the
// output's shape, class weights [out_features].
inline void check_step_loss(const StepLossArgs& loss, const at::Tensor& input, const at::Tensor& target,
                            int64_t batch, int64_t out_features) {
  TORCH_CHECK(loss.kind == kStepLossBce || loss.kind == kStepLossMse || loss.kind == kStepLossCrossEntropy,
              "fastmlp.mlp_loss_step: loss must be 0 (BCE with logits), 1 (MSE) or 2 (cross-entropy), got ",
              loss.kind);
  TORCH_CHECK(loss.reduction == kReductionMean || loss.reduction == kReductionSum,
              "fastmlp.mlp_loss_step: reduction must be 1 (mean) or 2 (sum), got ", loss.reduction);
  if (loss.kind == kStepLossBce) return;
  const std::vector<int64_t> out_shape{batch, out_features};
  TORCH_CHECK(!defined(loss.pos_weight), "fastmlp.mlp_loss_step: pos_weight is a BCE option");
  if (loss.kind == kStepLossMse) {
    TORCH_CHECK(!defined(loss.weight), "fastmlp.mlp_loss_step: MSE takes no weight");
    check_same(target, input, "target", "input");
    TORCH_CHECK(target.sizes() == c10::IntArrayRef(out_shape), "fastmlp.mlp_loss_step: expected target of shape ",
                c10::IntArrayRef(out_shape), ", got ", target.sizes());
    return;
  }
  if (ce_index_target(target)) {
    TORCH_CHECK(target.device() == input.device(), "fastmlp: expected target and input to be on the same device, ",
                "but got ", target.device(), " and ", input.device());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == batch,
                "fastmlp.mlp_loss_step: expected class index target of shape [", batch, "], got ", target.sizes());
  } else {
    check_same(target, input, "target", "input");
    TORCH_CHECK(target.sizes() == c10::IntArrayRef(out_shape),
                "fastmlp.mlp_loss_step: expected probability target of shape ", c10::IntArrayRef(out_shape),
                ", got ", target.sizes());
  }
  if (defined(loss.weight)) {
    check_same(*loss.weight, input, "weight", "input");
    TORCH_CHECK(loss.weight->dim() == 1 && loss.weight->size(0) == out_features,
                "fastmlp.mlp_loss_step: weight tensor should be defined either for all ", out_features,
                " classes or no classes but got weight tensor of shape: ", loss.weight->sizes());
  }
  TORCH_CHECK(loss.label_smoothing >= 0.0 && loss.label_smoothing <= 1.0,
              "label_smoothing must be between 0.0 and 1.0. Got: ", loss.label_smoothing);
}

using LossStepResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

template <class LayerKernels, class BceKernels, class MseKernels, class CeKernels> struct MlpLossOps {
  // The reduced loss of `output` and its gradient, by the backend's loss kernels.
  static std::tuple<at::Tensor, at::Tensor> loss_and_grad(const StepLossArgs& loss, const at::Tensor& output,
                                                          const at::Tensor& target) {
    switch (loss.kind) {
      case kStepLossMse:
        return MseOps<MseKernels>::forward(output, target, loss.reduction, true);
      case kStepLossCrossEntropy:
        return CrossEntropyOps<CeKernels>::forward(output, target, loss.weight, loss.reduction, loss.ignore_index,
                                                   loss.label_smoothing, true);
      default:
        return BceOps<BceKernels>::forward(output, target, loss.weight, loss.pos_weight, loss.reduction, true);
    }
  }

  static LossStepResult step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                             const StepLossArgs& loss, bool input_grad, const c10::List<bool>& weight_mask,
                             const c10::List<bool>& bias_mask) {
    check_mlp_args(input, weights, biases);
    check_step_loss(loss, input, target, input.size(0), weights.back().size(0));
    auto [output, hidden] = LayerOps<LayerKernels>::mlp_forward(input, weights, biases, last_relu);
    if (loss.kind == kStepLossBce) {
      TORCH_CHECK(target.sizes() == output.sizes(), "fastmlp.mlp_bce_step: Target size (", target.sizes(),
                  ") must be the same as input size (", output.sizes(), ")");
    }
    auto [value, grad_logits] = loss_and_grad(loss, output, target);
    auto [grad_input, grad_weights, grad_biases] = LayerOps<LayerKernels>::mlp_backward(
        grad_logits, input, weights, hidden, output, last_relu, input_grad, weight_mask, bias_mask);
    return {value, grad_input, grad_weights, grad_biases};
  }
};

inline StepLossArgs step_loss_args(int64_t loss, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& pos_weight, int64_t reduction,
                                   int64_t ignore_index, double label_smoothing) {
  StepLossArgs args;
  args.kind = loss;
  args.weight = weight;
  args.pos_weight = pos_weight;
  args.reduction = reduction;
  args.ignore_index = ignore_index;
  args.label_smoothing = label_smoothing;
  return args;
}

// A backend's mlp_loss_step and mlp_bce_step from its `Step(input, target,
// weights, biases, last_relu, StepLossArgs, input_grad, weight_mask,
// bias_mask)`: the ops' flat arguments gathered into StepLossArgs.
template <auto Step>
LossStepResult mlp_loss_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu, int64_t loss,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                             int64_t reduction, int64_t ignore_index, double label_smoothing, bool input_grad,
                             const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  return Step(input, target, weights, biases, last_relu,
              step_loss_args(loss, weight, pos_weight, reduction, ignore_index, label_smoothing), input_grad,
              weight_mask, bias_mask);
}

template <auto Step>
LossStepResult mlp_bce_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                            const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                            int64_t reduction, bool input_grad, const c10::List<bool>& weight_mask,
                            const c10::List<bool>& bias_mask) {
  return Step(input, target, weights, biases, last_relu,
              step_loss_args(kStepLossBce, weight, pos_weight, reduction, -100, 0.0), input_grad, weight_mask,
              bias_mask);
}

// Registers a backend's mlp_bce_step and mlp_loss_step.
#define FASTMLP_REGISTER_STEP_OPS(m, Step)                                    \
  do {                                                                        \
    (m).impl("mlp_bce_step", &::fastmlp::mlp_bce_step<&Step>);                \
    (m).impl("mlp_loss_step", &::fastmlp::mlp_loss_step<&Step>);              \
  } while (0)

}  // namespace fastmlp
