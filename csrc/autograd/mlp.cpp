// fastmlp::mlp: a whole Linear(+ReLU) chain as one differentiable op, forward
// by fastmlp::mlp_forward and backward by fastmlp::mlp_backward. The C++
// counterpart of torch_fastmlp.MLPFunction, saving the same tensors.
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
    // output only for a final ReLU's mask; the hidden activations always.
    variable_list saved{ctx->needs_input_grad(1) ? input : at::Tensor(), hidden,
                        last_relu ? output : at::Tensor()};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& hidden = saved[1];
    const std::vector<at::Tensor> weights(saved.begin() + 3, saved.end());
    const int64_t layers = static_cast<int64_t>(weights.size());
    const c10::List<bool> has_bias = ctx->saved_data["has_bias"].toBoolList();
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
