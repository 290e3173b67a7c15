// fastmlp::mlp_bce_step for every backend: the chain forward, the reduced BCE
// loss with its logits gradient computed in the same pass, and the chain
// backward, in one op call, so a training step pays the Python and autograd
// overhead once. Built from the backend's LayerOps and BceOps kernels.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/bce_ops.h"
#include "common/layer_ops.h"

namespace fastmlp {

// The single-pass step has no form for an unreduced loss.
inline void check_step_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == kReductionMean || reduction == kReductionSum,
              "fastmlp.mlp_bce_step: reduction must be 1 (mean) or 2 (sum), got ", reduction);
}

template <class LayerKernels, class BceKernels> struct MlpBceOps {
  static std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> step(
      const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
      const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& pos_weight, int64_t reduction, bool input_grad,
      const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
    check_step_reduction(reduction);
    auto [output, hidden] = LayerOps<LayerKernels>::mlp_forward(input, weights, biases, last_relu);
    TORCH_CHECK(target.sizes() == output.sizes(), "fastmlp.mlp_bce_step: Target size (", target.sizes(),
                ") must be the same as input size (", output.sizes(), ")");
    auto [loss, grad_logits] = BceOps<BceKernels>::forward(output, target, weight, pos_weight, reduction, true);
    auto [grad_input, grad_weights, grad_biases] = LayerOps<LayerKernels>::mlp_backward(
        grad_logits, input, weights, hidden, output, last_relu, input_grad, weight_mask, bias_mask);
    return {loss, grad_input, grad_weights, grad_biases};
  }
};

}  // namespace fastmlp
