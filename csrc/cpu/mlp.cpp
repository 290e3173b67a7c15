// CPU kernels of the whole-chain ops: a Linear(+ReLU) chain in one op, so a
// small batch pays the dispatcher and autograd overhead once, not per layer.
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/layer_kernels.h"

namespace fastmlp::cpu {
namespace {

// Layer l's block [B, N_l] of the packed hidden buffer.
at::Tensor hidden_block(const at::Tensor& hidden, const std::vector<int64_t>& offsets, size_t l,
                        int64_t batch, int64_t width) {
  return hidden.narrow(0, offsets[l], batch * width).view({batch, width});
}

std::tuple<at::Tensor, at::Tensor> mlp_forward(const at::Tensor& input, at::TensorList weights,
                                               const c10::List<c10::optional<at::Tensor>>& biases,
                                               bool last_relu) {
  check_mlp_args(input, weights, biases);
  const int64_t batch = input.size(0);
  const size_t layers = weights.size();
  const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
  at::Tensor hidden = at::empty({offsets.back()}, input.options());
  at::Tensor output = at::empty({batch, weights.back().size(0)}, input.options());
  at::Tensor h = input;
  for (size_t l = 0; l < layers; ++l) {
    const bool last = l + 1 == layers;
    at::Tensor dst = last ? output : hidden_block(hidden, offsets, l, batch, weights[l].size(0));
    linear_act_into(dst, h, weights[l], biases.get(l), !last || last_relu);
    h = dst;
  }
  return {output, hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, const at::Tensor& hidden,
    const c10::optional<at::Tensor>& output, bool last_relu, bool input_grad,
    const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  const size_t layers = weights.size();
  TORCH_CHECK(weight_mask.size() == layers && bias_mask.size() == layers,
              "fastmlp.mlp_backward: expected one weight_mask and bias_mask entry per layer (", layers,
              "), got ", weight_mask.size(), " and ", bias_mask.size());
  TORCH_CHECK(!last_relu || (output.has_value() && output->defined()),
              "fastmlp.mlp_backward: last_relu needs the saved output");
  const int64_t batch = input.size(0);
  const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
  TORCH_CHECK(hidden.numel() == offsets.back(), "fastmlp.mlp_backward: hidden has ", hidden.numel(),
              " elements, expected ", offsets.back());
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == batch &&
                  grad_output.size(1) == weights.back().size(0),
              "fastmlp.mlp_backward: grad_output has shape ", grad_output.sizes(), ", expected [", batch, ", ",
              weights.back().size(0), "]");

  // Layers below the lowest one that needs a gradient are never visited.
  size_t lowest = layers;
  for (size_t l = 0; l < layers; ++l) {
    if (weight_mask[l] || bias_mask[l]) {
      lowest = l;
      break;
    }
  }
  if (input_grad) lowest = 0;

  std::vector<at::Tensor> grad_w(layers), grad_b(layers);
  at::Tensor grad_input;
  at::Tensor g = grad_output;
  for (size_t l = layers; l-- > lowest;) {
    const bool last = l + 1 == layers;
    at::Tensor out_l = last ? (last_relu ? *output : at::Tensor())
                            : hidden_block(hidden, offsets, l, batch, weights[l].size(0));
    at::Tensor in_l = l == 0 ? input : hidden_block(hidden, offsets, l - 1, batch, weights[l - 1].size(0));
    const bool want_in = l > lowest || input_grad;
    auto [gx, gw, gb] = layer_backward(g, in_l, weights[l], out_l, !last || last_relu, want_in,
                                       weight_mask[l], bias_mask[l]);
    grad_w[l] = gw;
    grad_b[l] = gb;
    if (l == 0) grad_input = gx;
    g = gx;
  }
  for (size_t l = 0; l < layers; ++l) {
    grad_w[l] = or_empty(grad_w[l], input);
    grad_b[l] = or_empty(grad_b[l], input);
  }
  return {or_empty(grad_input, input), grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_forward", &mlp_forward);
  m.impl("mlp_backward", &mlp_backward);
}

}  // namespace fastmlp::cpu
