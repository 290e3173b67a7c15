// Registers the CPU kernels of the Linear(+ReLU) ops: fastmlp::linear_act,
// linear_act_backward, mlp_forward and mlp_backward. A chain of narrow layers
// runs its forward tile by tile through every layer (narrow_chain_forward);
// anything else layer by layer.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/layer_ops.h"
#include "cpu/layer_backend.h"

namespace fastmlp::cpu {
namespace {

using Layers = LayerOps<CpuKernels>;

bool narrow_chain(const at::Tensor& input, at::TensorList weights) {
  if (!narrow_eligible(input, weights[0].size(0))) return false;
  for (const at::Tensor& w : weights) {
    if (w.size(0) > kNarrowMax) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> mlp_forward(const at::Tensor& input, at::TensorList weights,
                                               const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu) {
  check_mlp_args(input, weights, biases);
  if (!narrow_chain(input, weights)) {
    return Layers::mlp_forward(input, weights, biases, last_relu);
  }
  BelowAutograd below_autograd;
  const int64_t batch = input.size(0);
  const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
  at::Tensor hidden = at::empty({offsets.back()}, input.options());
  at::Tensor output = at::empty({batch, weights.back().size(0)}, input.options());
  std::vector<at::Tensor> kept;  // contiguous weights and biases, alive for the call
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastmlp_mlp_forward_cpu", [&] {
    std::vector<NarrowLayer<scalar_t>> layers(weights.size());
    for (size_t l = 0; l < weights.size(); ++l) {
      NarrowLayer<scalar_t>& layer = layers[l];
      kept.push_back(weights[l].contiguous());
      layer.w = kept.back().const_data_ptr<scalar_t>();
      const c10::optional<at::Tensor> bias = biases.get(l);
      if (bias.has_value() && bias->defined()) {
        kept.push_back(bias->contiguous());
        layer.bias = kept.back().const_data_ptr<scalar_t>();
      }
      const bool last = l + 1 == weights.size();
      layer.out = last ? output.data_ptr<scalar_t>() : hidden.data_ptr<scalar_t>() + offsets[l];
      layer.N = weights[l].size(0);
      layer.K = weights[l].size(1);
      layer.relu = !last || last_relu;
    }
    narrow_chain_forward<scalar_t>(input.const_data_ptr<scalar_t>(), input.stride(0), batch, layers);
  });
  return {output, hidden};
}

}  // namespace
}  // namespace fastmlp::cpu

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_act", &fastmlp::LayerOps<fastmlp::cpu::CpuKernels>::linear_act);
  m.impl("linear_act_backward", &fastmlp::LayerOps<fastmlp::cpu::CpuKernels>::linear_act_backward);
  m.impl("mlp_forward", &fastmlp::cpu::mlp_forward);
  m.impl("mlp_backward", &fastmlp::LayerOps<fastmlp::cpu::CpuKernels>::mlp_backward);
}
