// Registers the CPU kernels of the Linear(+ReLU) ops: fastmlp::linear_act,
// linear_act_backward, mlp_forward and mlp_backward. A chain of narrow layers
// runs its forward tile by tile through every layer (narrow_chain_forward), and
// on a small batch its backward as row partials in one parallel region
// (narrow_step.h); anything else layer by layer.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/autotune.h"
#include "common/layer_ops.h"
#include "cpu/layer_backend.h"
#include "cpu/narrow_step.h"

namespace fastmlp::cpu {
namespace {

using Layers = LayerOps<CpuKernels>;

bool narrow_chain(const at::Tensor& input, at::TensorList weights) {
  if (!narrow_eligible(input, weights[0].size(0), kNarrowForwardMax)) return false;
  for (const at::Tensor& w : weights) {
    if (w.size(0) > kNarrowForwardMax) return false;
  }
  return true;
}

// The narrow chain's forward, tile by tile through every layer.
std::tuple<at::Tensor, at::Tensor> narrow_mlp_forward(const at::Tensor& input, at::TensorList weights,
                                                      const c10::List<c10::optional<at::Tensor>>& biases,
                                                      bool last_relu) {
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

// A narrow chain: tile by tile, unless a first-use timing found the layer by
// layer path (BLAS or narrow kernels, each layer's own decision) faster.
std::tuple<at::Tensor, at::Tensor> mlp_forward(const at::Tensor& input, at::TensorList weights,
                                               const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu) {
  check_mlp_args(input, weights, biases);
  if (!narrow_chain(input, weights)) return Layers::mlp_forward(input, weights, biases, last_relu);
  std::tuple<at::Tensor, at::Tensor> result;
  Autotuner::instance().run([&] { return chain_autotune_key("cpu_mlp_forward", input, weights); }, 0,
                            [&] { result = narrow_mlp_forward(input, weights, biases, last_relu); },
                            [&] { result = Layers::mlp_forward(input, weights, biases, last_relu); });
  return result;
}

using MlpGradients = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// A small batch's backward as row partials in one parallel region.
MlpGradients row_partials_backward(const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
                                   const at::Tensor& hidden, const c10::optional<at::Tensor>& output, bool last_relu,
                                   bool input_grad, const c10::List<bool>& weight_mask,
                                   const c10::List<bool>& bias_mask) {
  BelowAutograd below_autograd;
  // The backward reads no bias (a bias gradient is a column sum).
  const c10::List<c10::optional<at::Tensor>> no_biases(std::vector<c10::optional<at::Tensor>>(weights.size()));
  ChainTensors t(input, weights, no_biases, input_grad, weight_mask, bias_mask);
  const at::Tensor go = grad_output.contiguous(), h = hidden.contiguous();
  const at::Tensor out = last_relu ? output->contiguous() : at::Tensor();
  const std::vector<int64_t> offsets = hidden_offsets(input.size(0), weights);
  AT_DISPATCH_FLOATING_TYPES(t.x.scalar_type(), "fastmlp_mlp_backward_cpu", [&] {
    std::vector<scalar_t*> gw, gb;
    const NarrowChain<scalar_t> chain = t.chain<scalar_t>(last_relu, gw, gb);
    SavedChain<scalar_t> saved;
    saved.hidden = h.const_data_ptr<scalar_t>();
    saved.hidden_at = offsets;
    saved.output = out.defined() ? out.const_data_ptr<scalar_t>() : nullptr;
    saved.grad_output = go.const_data_ptr<scalar_t>();
    narrow_backward(chain, saved, gw, gb);
  });
  return t.gradients();
}

// A small batch of a narrow chain: row partials, unless a first-use timing
// found the layer by layer path faster.
MlpGradients mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, const at::Tensor& hidden,
    const c10::optional<at::Tensor>& output, bool last_relu, bool input_grad, const c10::List<bool>& weight_mask,
    const c10::List<bool>& bias_mask) {
  Layers::check_mlp_backward_args(grad_output, input, weights, hidden, output, last_relu, weight_mask, bias_mask);
  const auto by_layer = [&] {
    return Layers::mlp_backward(grad_output, input, weights, hidden, output, last_relu, input_grad, weight_mask,
                                bias_mask);
  };
  if (!row_partials_eligible(input, weights)) return by_layer();
  MlpGradients result;
  Autotuner::instance().run(
      [&] { return chain_autotune_key("cpu_mlp_backward", input, weights); }, 0,
      [&] {
        result = row_partials_backward(grad_output, input, weights, hidden, output, last_relu, input_grad, weight_mask,
                                       bias_mask);
      },
      [&] { result = by_layer(); });
  return result;
}

}  // namespace
}  // namespace fastmlp::cpu

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_act", &fastmlp::LayerOps<fastmlp::cpu::CpuKernels>::linear_act);
  m.impl("linear_act_backward", &fastmlp::LayerOps<fastmlp::cpu::CpuKernels>::linear_act_backward);
  m.impl("mlp_forward", &fastmlp::cpu::mlp_forward);
  m.impl("mlp_backward", &fastmlp::cpu::mlp_backward);
}
