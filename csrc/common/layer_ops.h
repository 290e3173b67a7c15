// The Linear(+ReLU) ops, written once for every backend. A backend supplies
//   Kernels::Guard                          device guard type (constructed from a Device)
//   Kernels::linear_act_into(out, x, w, bias, relu)      out = act(x @ w.T + bias)
//   Kernels::layer_backward(g, x, w, y, relu, want_x, want_w, want_b) -> (dx, dw, db)
// (gradients not wanted are undefined tensors); this file adds the argument
// checks, the whole-chain loops and the op contract's empty outputs.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace fastmlp {

// The op contract returns gradients that were not asked for as empty tensors.
inline at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

template <class Kernels> struct LayerOps {
  static at::Tensor linear_act(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, bool relu) {
    check_linear_args(input, weight, bias);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    at::Tensor out = at::empty({input.size(0), weight.size(0)}, input.options());
    Kernels::linear_act_into(out, input, weight, bias, relu);
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
      bool relu, std::array<bool, 3> output_mask) {
    check_linear_args(input, weight, c10::nullopt);
    check_same(grad_output, input, "grad_output", "input");
    const std::vector<int64_t> out_shape{input.size(0), weight.size(0)};
    TORCH_CHECK(grad_output.sizes() == out_shape, "fastmlp.linear_act_backward: expected grad_output of shape ",
                c10::IntArrayRef(out_shape), ", got ", grad_output.sizes());
    if (relu) {
      check_same(output, input, "output", "input");
      TORCH_CHECK(output.sizes() == out_shape, "fastmlp.linear_act_backward: expected output of shape ", out_shape,
                  ", got ", output.sizes());
    }
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    auto [gx, gw, gb] = Kernels::layer_backward(grad_output, input, weight, output, relu, output_mask[0],
                                                output_mask[1], output_mask[2]);
    return {or_empty(gx, input), or_empty(gw, input), or_empty(gb, input)};
  }

  static std::tuple<at::Tensor, at::Tensor> mlp_forward(const at::Tensor& input, at::TensorList weights,
                                                        const c10::List<c10::optional<at::Tensor>>& biases,
                                                        bool last_relu) {
    check_mlp_args(input, weights, biases);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const int64_t batch = input.size(0);
    const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
    at::Tensor hidden = at::empty({offsets.back()}, input.options());
    at::Tensor output = at::empty({batch, weights.back().size(0)}, input.options());
    at::Tensor h = input;
    for (size_t l = 0; l < weights.size(); ++l) {
      const bool last = l + 1 == weights.size();
      at::Tensor dst = last ? output : hidden_block(hidden, offsets, l, batch, weights[l].size(0));
      Kernels::linear_act_into(dst, h, weights[l], biases.get(l), !last || last_relu);
      h = dst;
    }
    return {output, hidden};
  }

  // mlp_backward's argument checks (also run by backends that serve some chains their own way).
  static void check_mlp_backward_args(const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
                                      const at::Tensor& hidden, const c10::optional<at::Tensor>& output,
                                      bool last_relu, const c10::List<bool>& weight_mask,
                                      const c10::List<bool>& bias_mask) {
    const size_t layers = weights.size();
    check_mlp_args(input, weights, c10::List<c10::optional<at::Tensor>>(std::vector<c10::optional<at::Tensor>>(layers)));
    TORCH_CHECK(weight_mask.size() == layers && bias_mask.size() == layers,
                "fastmlp.mlp_backward: expected one weight_mask and bias_mask entry per layer (", layers, "), got ",
                weight_mask.size(), " and ", bias_mask.size());
    TORCH_CHECK(!last_relu || (output.has_value() && output->defined()),
                "fastmlp.mlp_backward: last_relu needs the saved output");
    const int64_t batch = input.size(0), out_features = weights.back().size(0);
    const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
    check_same(hidden, input, "hidden", "input");
    TORCH_CHECK(hidden.dim() == 1 && hidden.numel() == offsets.back(), "fastmlp.mlp_backward: expected hidden to be ",
                "1-D with ", offsets.back(), " elements, got shape ", hidden.sizes());
    check_same(grad_output, input, "grad_output", "input");
    TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == batch && grad_output.size(1) == out_features,
                "fastmlp.mlp_backward: grad_output has shape ", grad_output.sizes(), ", expected [", batch, ", ",
                out_features, "]");
    if (last_relu) {
      check_same(*output, input, "output", "input");
      TORCH_CHECK(output->dim() == 2 && output->size(0) == batch && output->size(1) == out_features,
                  "fastmlp.mlp_backward: output has shape ", output->sizes(), ", expected [", batch, ", ",
                  out_features, "]");
    }
  }

  static std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward(
      const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, const at::Tensor& hidden,
      const c10::optional<at::Tensor>& output, bool last_relu, bool input_grad, const c10::List<bool>& weight_mask,
      const c10::List<bool>& bias_mask) {
    check_mlp_backward_args(grad_output, input, weights, hidden, output, last_relu, weight_mask, bias_mask);
    const size_t layers = weights.size();
    const int64_t batch = input.size(0);
    const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;

    // Layers below the lowest one that needs a gradient are never visited.
    size_t lowest = layers;
    for (size_t l = 0; l < layers && lowest == layers; ++l) {
      if (weight_mask[l] || bias_mask[l]) lowest = l;
    }
    if (input_grad) lowest = 0;

    std::vector<at::Tensor> grad_w(layers), grad_b(layers);
    at::Tensor grad_input, g = grad_output;
    for (size_t l = layers; l-- > lowest;) {
      const bool last = l + 1 == layers;
      at::Tensor out_l = last ? (last_relu ? *output : at::Tensor())
                              : hidden_block(hidden, offsets, l, batch, weights[l].size(0));
      at::Tensor in_l = l == 0 ? input : hidden_block(hidden, offsets, l - 1, batch, weights[l - 1].size(0));
      const bool want_in = l > lowest || input_grad;
      auto [gx, gw, gb] = Kernels::layer_backward(g, in_l, weights[l], out_l, !last || last_relu, want_in,
                                                  weight_mask[l], bias_mask[l]);
      grad_w[l] = or_empty(gw, input);
      grad_b[l] = or_empty(gb, input);
      g = gx;
    }
    for (size_t l = 0; l < lowest && l < layers; ++l) {
      grad_w[l] = or_empty(at::Tensor(), input);
      grad_b[l] = or_empty(at::Tensor(), input);
    }
    if (input_grad) grad_input = g;
    return {or_empty(grad_input, input), grad_w, grad_b};
  }

 private:
  // Layer l's block [B, N_l] of the packed hidden buffer.
  static at::Tensor hidden_block(const at::Tensor& hidden, const std::vector<int64_t>& offsets, size_t l,
                                 int64_t batch, int64_t width) {
    return hidden.narrow(0, offsets[l], batch * width).view({batch, width});
  }
};

}  // namespace fastmlp
