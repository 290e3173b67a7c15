// fastmlp::mlp: a whole Linear(+ReLU) chain as one differentiable op, forward
// by fastmlp::mlp_forward and backward by fastmlp::mlp_backward. The C++
// counterpart of torch_fastmlp.MLPFunction, saving the same tensors.
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>

#include "autograd/autograd_utils.h"

namespace fastmlp::autograd {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                            const OptionalTensorList&, bool);
using BackwardSignature = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&, bool,
    bool, const c10::List<bool>&, const c10::List<bool>&);

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, at::TensorList weights,
                                                const OptionalTensorList& biases, bool last_relu) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mlp_forward", "").typed<ForwardSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weights, biases, last_relu);
}

// The chain's output recomputed with torch's own (differentiable) ops: from the
// input when it was saved (the first weight needs a gradient), else from the
// first hidden activation, a constant unless the input or the first bias needs
// a gradient (then there is nothing to recompute it from: a clear error).
at::Tensor recompute(const at::Tensor& input, const at::Tensor& hidden, const std::vector<at::Tensor>& weights,
                     const std::vector<at::Tensor>& biases, bool last_relu, bool first_layer_grad,
                     const c10::SymInt& batch) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  int64_t first = 0;
  at::Tensor h = input;
  if (!input.defined()) {
    TORCH_CHECK(!first_layer_grad && layers > 1,
                "torch_fastmlp: double backward (create_graph=True) through a chain whose first weight is frozen "
                "needs no gradient for the input or the first bias; use the torch.nn modules for this case");
    const int64_t width = weights[0].size(0);
    h = hidden.narrow_symint(0, 0, batch * width).view_symint({batch, width});
    first = 1;
  }
  for (int64_t l = first; l < layers; ++l) {
    h = at::linear(h, weights[l], biases[l].defined() ? std::optional<at::Tensor>(biases[l]) : std::nullopt);
    if (l + 1 < layers || last_relu) h = at::relu(h);
  }
  return h;
}

// Inputs, in autograd's order: input, weights[L], the present biases (then
// has_bias and last_relu, which are not tensors).
struct MLPFunction : public torch::autograd::Function<MLPFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::TensorList weights,
                            at::TensorList biases, const c10::List<bool>& has_bias, bool last_relu) {
    auto [output, hidden] = call_forward(input, weights, Biases::expand(biases, has_bias), last_relu);
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["last_relu"] = last_relu;
    ctx->saved_data["batch"] = input.sym_size(0);
    ctx->saved_data["in_features"] = input.sym_size(1);
    // As eager: the input only for the first layer's weight gradient, the
    // output only for a final ReLU's mask; the hidden activations always. The
    // parameters (no memory of their own) for the gradients and for a
    // differentiable backward.
    variable_list saved{ctx->needs_input_grad(1) ? input : at::Tensor(), hidden,
                        last_relu ? output : at::Tensor()};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    ctx->save_for_backward(saved);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& hidden = saved[1];
    const c10::List<bool> has_bias = ctx->saved_data["has_bias"].toBoolList();
    const int64_t layers = static_cast<int64_t>(has_bias.size());
    const std::vector<at::Tensor> weights(saved.begin() + 3, saved.begin() + 3 + layers);
    const std::vector<at::Tensor> biases = Biases::expand_list(
        at::TensorList(saved).slice(3 + layers), has_bias);
    const bool last_relu = ctx->saved_data["last_relu"].toBool();
    const bool input_grad = ctx->needs_input_grad(0);
    c10::List<bool> weight_mask, bias_mask;
    std::vector<int64_t> bias_edge(layers, -1);  // autograd's index of each present bias
    bool any = input_grad;
    for (int64_t l = 0, next = 1 + layers; l < layers; ++l) {
      if (has_bias[l]) bias_edge[l] = next++;
      weight_mask.push_back(ctx->needs_input_grad(1 + l));
      bias_mask.push_back(has_bias[l] && ctx->needs_input_grad(bias_edge[l]));
      any = any || weight_mask[l] || bias_mask[l];
    }
    const int64_t present = std::count(has_bias.begin(), has_bias.end(), true);
    variable_list out(1 + layers + present + 2);  // input, weights, biases, has_bias, last_relu
    if (!any) return out;
    const at::Tensor& grad_output = grad_outputs[0];
    if (at::GradMode::is_enabled()) {
      // create_graph=True (a gradient penalty, say): the gradients must be
      // differentiable themselves. Recompute the chain with torch's ops from
      // the saved tensors and let autograd differentiate it, as eager would.
      variable_list wrt;
      std::vector<int64_t> slot;
      if (input_grad) {
        wrt.push_back(saved[0]);
        slot.push_back(0);
      }
      for (int64_t l = 0; l < layers; ++l) {
        if (weight_mask[l]) {
          wrt.push_back(weights[l]);
          slot.push_back(1 + l);
        }
        if (bias_mask[l]) {
          wrt.push_back(biases[l]);
          slot.push_back(bias_edge[l]);
        }
      }
      const at::Tensor recomputed = recompute(saved[0], hidden, weights, biases, last_relu, input_grad || bias_mask[0],
                                              ctx->saved_data["batch"].toSymInt());
      const variable_list grads = torch::autograd::grad({recomputed}, wrt, {grad_output}, /*retain_graph=*/true,
                                                        /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t i = 0; i < grads.size(); ++i) out[slot[i]] = grads[i];
      return out;
    }
    // The input is only read for the first weight gradient; otherwise a
    // stand-in of its shape that allocates nothing.
    const c10::SymInt batch = ctx->saved_data["batch"].toSymInt();
    const c10::SymInt in_features = ctx->saved_data["in_features"].toSymInt();
    const at::Tensor input =
        saved[0].defined() ? saved[0] : at::zeros({}, grad_output.options()).expand_symint({batch, in_features});
    const std::optional<at::Tensor> output = last_relu ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mlp_backward", "").typed<BackwardSignature>();
    auto [gi, gws, gbs] =
        op.call(grad_output, input, weights, hidden, output, last_relu, input_grad, weight_mask, bias_mask);
    if (input_grad) out[0] = gi;
    for (int64_t l = 0; l < layers; ++l) {
      if (weight_mask[l]) out[1 + l] = gws[l];
      if (bias_mask[l]) out[bias_edge[l]] = gbs[l];
    }
    return out;
  }
};

at::Tensor mlp_plain(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                     bool last_relu) {
  return std::get<0>(call_forward(input, weights, biases, last_relu));
}

at::Tensor mlp_autograd(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                        bool last_relu) {
  const Biases b(biases);
  if (!any_requires_grad({input}, weights, b.present)) return mlp_plain(input, weights, biases, last_relu);
  return MLPFunction::apply(input, weights, at::TensorList(b.present), b.has, last_relu);
}

}  // namespace
}  // namespace fastmlp::autograd

FASTMLP_REGISTER_AUTOGRAD_OP("mlp", fastmlp::autograd::mlp_autograd,
                             fastmlp::autograd::mlp_plain)
