// fastmlp::mlp_loss (and its BCE case fastmlp::mlp_bce_loss): the loss of an
// MLP as one differentiable op. Forward runs fastmlp::mlp_loss_step, which
// computes the loss and every gradient asked for in one pass; backward only
// scales those by the incoming gradient. The C++ counterpart of
// torch_fastmlp.MLPBCEFunction.
#include "autograd/autograd_utils.h"

namespace fastmlp::autograd {
namespace {

using StepResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using StepSignature = StepResult(const at::Tensor&, const at::Tensor&, at::TensorList, const OptionalTensorList&,
                                 bool, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 int64_t, int64_t, double, bool, const c10::List<bool>&, const c10::List<bool>&);

// The loss and its non-tensor options, as mlp_loss_step takes them.
struct LossSpec {
  int64_t kind, reduction, ignore_index;
  double label_smoothing;
};

StepResult call_step(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                     const OptionalTensorList& biases, bool last_relu, const LossSpec& loss,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                     bool input_grad, const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mlp_loss_step", "").typed<StepSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, weights, biases, last_relu, loss.kind, weight, pos_weight, loss.reduction,
                 loss.ignore_index, loss.label_smoothing, input_grad, weight_mask, bias_mask);
}

// Inputs, in autograd's order: input, target, weights[L], the present biases
// (then the non-tensor arguments and the loss weights, which get no gradient).
struct MLPLossFunction : public torch::autograd::Function<MLPLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            at::TensorList weights, at::TensorList biases, const c10::List<bool>& has_bias,
                            bool last_relu, int64_t kind, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, int64_t reduction, int64_t ignore_index,
                            double label_smoothing) {
    TORCH_CHECK(!ctx->needs_input_grad(1),
                "fastmlp.mlp_loss: no gradient for target; compute the loss with the model's output and "
                "torch_fastmlp.functional's loss instead");
    const int64_t layers = static_cast<int64_t>(weights.size());
    c10::List<bool> weight_mask, bias_mask;
    for (int64_t l = 0, next = 2 + layers; l < layers; ++l) {
      weight_mask.push_back(ctx->needs_input_grad(2 + l));
      bias_mask.push_back(has_bias[l] && ctx->needs_input_grad(next++));
    }
    const bool input_grad = ctx->needs_input_grad(0);
    auto [loss, grad_input, grad_weights, grad_biases] =
        call_step(input, target, weights, Biases::expand(biases, has_bias), last_relu,
                  LossSpec{kind, reduction, ignore_index, label_smoothing}, weight, pos_weight, input_grad,
                  weight_mask, bias_mask);
    // In autograd's order (input, weights, present biases): grads[i] is the
    // gradient of edge i + 1 for i >= 1.
    std::vector<at::Tensor> grads{grad_input};
    grads.insert(grads.end(), grad_weights.begin(), grad_weights.end());
    for (int64_t l = 0; l < layers; ++l) {
      if (has_bias[l]) grads.push_back(grad_biases[l]);
    }
    // Saved as variables (not saved_data): autograd releases them right after
    // backward (unless the graph is retained), so the parameters' gradient
    // accumulation can take the tensors over instead of copying them.
    ctx->save_for_backward(grads);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    const at::Tensor& grad_loss = grad_outputs[0];
    const bool unit = is_unit_seed(grad_loss);
    const variable_list grads = ctx->get_saved_variables();
    std::vector<bool> wanted(grads.size());
    wanted[0] = ctx->needs_input_grad(0);  // input (edge 1 is the target)
    for (size_t i = 1; i < grads.size(); ++i) wanted[i] = ctx->needs_input_grad(i + 1);
    std::vector<at::Tensor> scaled_grads = scaled_all(grads, grad_loss, unit, wanted);
    variable_list out;
    out.reserve(grads.size() + 9);
    out.push_back(std::move(scaled_grads[0]));  // input
    out.emplace_back();                         // target
    for (size_t i = 1; i < grads.size(); ++i) out.push_back(std::move(scaled_grads[i]));
    out.resize(out.size() + 8);  // has_bias, last_relu, kind, weight, pos_weight, reduction, ignore_index, smoothing
    return out;
  }
};

// Below autograd (inference mode), or with no gradient to compute: the loss alone.
at::Tensor mlp_loss_plain(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                          const OptionalTensorList& biases, bool last_relu, int64_t kind,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                          int64_t reduction, int64_t ignore_index, double label_smoothing) {
  c10::List<bool> none;
  for (size_t l = 0; l < weights.size(); ++l) none.push_back(false);
  return std::get<0>(call_step(input, target, weights, biases, last_relu,
                               LossSpec{kind, reduction, ignore_index, label_smoothing}, weight, pos_weight, false,
                               none, none));
}

at::Tensor mlp_loss_autograd(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                             const OptionalTensorList& biases, bool last_relu, int64_t kind,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_not_differentiable(weight, "weight");
  check_not_differentiable(pos_weight, "pos_weight");
  const Biases b(biases);
  if (!any_requires_grad({input, target}, weights, b.present)) {
    return mlp_loss_plain(input, target, weights, biases, last_relu, kind, weight, pos_weight, reduction,
                          ignore_index, label_smoothing);
  }
  return MLPLossFunction::apply(input, target, weights, at::TensorList(b.present), b.has, last_relu, kind, weight,
                                pos_weight, reduction, ignore_index, label_smoothing);
}

// fastmlp::mlp_bce_loss: the BCE case.
constexpr int64_t kBce = 0, kNoIgnoreIndex = -100;

at::Tensor mlp_bce_loss_plain(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                              const OptionalTensorList& biases, bool last_relu,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                              int64_t reduction) {
  return mlp_loss_plain(input, target, weights, biases, last_relu, kBce, weight, pos_weight, reduction,
                        kNoIgnoreIndex, 0.0);
}

at::Tensor mlp_bce_loss_autograd(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                                 const OptionalTensorList& biases, bool last_relu,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  return mlp_loss_autograd(input, target, weights, biases, last_relu, kBce, weight, pos_weight, reduction,
                           kNoIgnoreIndex, 0.0);
}

}  // namespace
}  // namespace fastmlp::autograd

FASTMLP_REGISTER_AUTOGRAD_OP("mlp_bce_loss", fastmlp::autograd::mlp_bce_loss_autograd,
                             fastmlp::autograd::mlp_bce_loss_plain)
FASTMLP_REGISTER_AUTOGRAD_OP("mlp_loss", fastmlp::autograd::mlp_loss_autograd, fastmlp::autograd::mlp_loss_plain)
