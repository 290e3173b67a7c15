// CUDA kernels of fastmlp::mlp_bce_step and fastmlp::mlp_loss_step (the whole
// training step's math).
//
// BCE on a narrow chain (cuda/fused_chain.cuh: at most kChainMaxLayers layers,
// each at most kChainMaxWidth wide) runs as one fused kernel plus a
// deterministic reduction of the per-block gradients, unless its first layer is
// big enough for cuBLAS (cuda/fused_or_layered.cuh); anything else (the MSE and
// cross-entropy losses included) composes the per-layer GEMMs and the loss's
// kernel.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <vector>

#include "common/mlp_loss_ops.h"
#include "cuda/bce_backend.cuh"
#include "cuda/fused_or_layered.cuh"
#include "cuda/kernel_params.h"
#include "cuda/layer_backend.cuh"
#include "cuda/loss_backend.cuh"

namespace fastmlp::cuda {
namespace {

using Generic = MlpLossOps<CudaKernels, CudaBceKernels, CudaMseKernels, CudaCrossEntropyKernels>;
using StepResult = LossStepResult;

// The options of a step that change what its candidates cost (its autotune key
// beyond the shapes): the loss's weights and reduction, the gradients asked for.
std::vector<int64_t> step_key_extra(const StepLossArgs& loss, bool input_grad, const c10::List<bool>& weight_mask,
                                    const c10::List<bool>& bias_mask) {
  std::vector<int64_t> extra{loss.weight.has_value() && loss.weight->defined() ? 1 : 0,
                             loss.pos_weight.has_value() && loss.pos_weight->defined() ? 1 : 0, loss.reduction,
                             input_grad ? 1 : 0};
  append_mask_dims(extra, weight_mask, bias_mask);
  return extra;
}

StepResult loss_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                     const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu, const StepLossArgs& loss,
                     bool input_grad, const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  check_mlp_args(input, weights, biases);
  if (loss.kind != kStepLossBce || !fused_chain_shape(input, weights)) {
    return Generic::step(input, target, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask);
  }
  check_step_loss(loss, input, target, input.size(0), weights.back().size(0));
  const c10::optional<at::Tensor>& weight = loss.weight;
  const c10::optional<at::Tensor>& pos_weight = loss.pos_weight;
  const int64_t reduction = loss.reduction;
  const size_t layers = weights.size();
  TORCH_CHECK(weight_mask.size() == layers && bias_mask.size() == layers,
              "fastmlp.mlp_bce_step: expected one weight_mask and bias_mask entry per layer (", layers, "), got ",
              weight_mask.size(), " and ", bias_mask.size());
  const int64_t batch = input.size(0);
  const std::vector<int64_t> out_shape{batch, weights.back().size(0)};
  TORCH_CHECK(target.sizes() == out_shape, "fastmlp.mlp_bce_step: Target size (", target.sizes(),
              ") must be the same as input size (", c10::IntArrayRef(out_shape), ")");
  check_bce_args(target, target, weight, pos_weight, reduction);
  check_same(target, input, "target", "input");

  c10::cuda::CUDAGuard guard(input.device());
  BelowAutograd below_autograd;
  const at::Tensor y = target.contiguous(), lw = bce_pattern(weight), pw = bce_pattern(pos_weight);
  const ContiguousChain chain(weights, biases);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();

  const auto layered = [&] {
    return Generic::step(input, target, weights, biases, last_relu, loss, input_grad, weight_mask, bias_mask);
  };
  StepResult result;
  bool planned = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastmlp_mlp_bce_step_cuda", [&] {
    using acc = acc_t<scalar_t>;
    FusedChainParams<scalar_t> p = fused_step_params_of<scalar_t>(input, y, chain, last_relu, lw, pw, reduction);
    // The plan lays out slots for the gradients asked for: outputs first.
    FusedStepOutputs o = fused_step_outputs(p, input, chain.weights, input_grad, weight_mask, bias_mask,
                                            [](at::IntArrayRef shape, const at::TensorOptions& opts) {
                                              return at::empty(shape, opts);
                                            });
    FusedChainPlan plan;
    if (!plan_fused_step(p, props->multiProcessorCount, props->sharedMemPerBlockOptin, &plan)) return;
    planned = true;
    const auto fused = [&] {
      at::Tensor workspace = at::empty({fused_step_workspace_elems(p, plan.blocks)},
                                       input.options().dtype(c10::CppTypeToScalarType<acc>::value));
      launch_fused_step(p, plan, workspace.data_ptr<acc>(), at::cuda::getCurrentCUDAStream());
      result = {o.loss, o.grad_input, o.grad_weight, o.grad_bias};
    };
    run_fused_or_layered("cuda_bce_step", input, weights, fused_chain_preferred(p, plan), fused,
                         [&] { result = layered(); }, step_key_extra(loss, input_grad, weight_mask, bias_mask));
  });
  return planned ? result : layered();
}

}  // namespace
}  // namespace fastmlp::cuda

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) { FASTMLP_REGISTER_STEP_OPS(m, fastmlp::cuda::loss_step); }
