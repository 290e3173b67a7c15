// The CPU training step that runs the optimizer's update inside its own
// gradient reduction (defined in cpu/mlp_step.cpp, with the row partials it
// extends; called through CpuOptimKernels::fused_step, cpu/optim_kernels.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/train_ops.h"

namespace fastmlp::cpu {

// A small batch's row partials with the update in their reduction, or nullopt
// where that does not serve the step (TrainOps then runs the gradients and
// the update apart, with the same results).
std::optional<TrainStepResult> fused_train_step(const at::Tensor& input, const at::Tensor& target,
                                                at::TensorList weights,
                                                const c10::List<std::optional<at::Tensor>>& biases, bool last_relu,
                                                const StepLossArgs& loss, const c10::List<bool>& weight_mask,
                                                const c10::List<bool>& bias_mask, at::TensorList state,
                                                int64_t optimizer, c10::ArrayRef<double> hyper,
                                                std::optional<double> max_grad_norm);

}  // namespace fastmlp::cpu
