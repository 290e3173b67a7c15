// fastmlp::bce_loss: binary cross-entropy with logits as one differentiable
// op. For a reduced loss the input gradient is computed in the forward pass
// and backward only scales it. The C++ counterpart of
// torch_fastmlp.BCEWithLogitsFunction, saving the same tensors.
#include "autograd/autograd_utils.h"

namespace fastmlp::autograd {
namespace {

using Optional = std::optional<at::Tensor>;
using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const Optional&,
                                                            const Optional&, int64_t, bool);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const Optional&, const Optional&,
                                                             int64_t, std::array<bool, 2>);

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const at::Tensor& target,
                                                const Optional& weight, const Optional& pos_weight,
                                                int64_t reduction, bool input_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::bce_with_logits", "").typed<ForwardSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, weight, pos_weight, reduction, input_grad);
}

Optional present(const at::Tensor& t) { return t.defined() ? Optional(t) : std::nullopt; }

// Inputs, in autograd's order: input, target (then weight, pos_weight when
// given: they get no gradient, as in torch).
struct BCEWithLogitsFunction : public torch::autograd::Function<BCEWithLogitsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const Optional& weight, const Optional& pos_weight, int64_t reduction) {
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    const bool reduced = reduction != 0;
    auto [loss, grad_input] =
        call_forward(input, target, weight, pos_weight, reduction, need_input && reduced);
    // The pre-computed input gradient replaces input and target unless the
    // elementwise backward needs them (no reduction, or a target gradient).
    const bool elementwise = need_target || (need_input && !reduced);
    const at::Tensor none;
    ctx->save_for_backward({need_input && reduced ? grad_input : none, elementwise ? input : none,
                            elementwise ? target : none, elementwise ? weight.value_or(none) : none,
                            elementwise ? pos_weight.value_or(none) : none});
    ctx->saved_data["reduction"] = reduction;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grad_outputs[0];
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list out(5);  // input, target, weight, pos_weight, reduction
    const at::Tensor& stored_grad = saved[0];
    if (need_input && stored_grad.defined()) out[0] = scaled(stored_grad, grad_loss, is_unit_seed(grad_loss), true);
    const bool elementwise_input = need_input && !stored_grad.defined();
    if (elementwise_input || need_target) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastmlp::bce_with_logits_backward", "")
                                 .typed<BackwardSignature>();
      auto [gi, gt] = op.call(grad_loss, saved[1], saved[2], present(saved[3]), present(saved[4]),
                              ctx->saved_data["reduction"].toInt(), {elementwise_input, need_target});
      if (elementwise_input) out[0] = gi;
      if (need_target) out[1] = gt;
    }
    return out;
  }
};

at::Tensor bce_loss_plain(const at::Tensor& input, const at::Tensor& target, const Optional& weight,
                          const Optional& pos_weight, int64_t reduction) {
  return std::get<0>(call_forward(input, target, weight, pos_weight, reduction, false));
}

at::Tensor bce_loss_autograd(const at::Tensor& input, const at::Tensor& target, const Optional& weight,
                             const Optional& pos_weight, int64_t reduction) {
  check_not_differentiable(weight, "weight");
  check_not_differentiable(pos_weight, "pos_weight");
  if (!any_requires_grad({input, target}, {})) return bce_loss_plain(input, target, weight, pos_weight, reduction);
  return BCEWithLogitsFunction::apply(input, target, weight, pos_weight, reduction);
}

}  // namespace
}  // namespace fastmlp::autograd

FASTMLP_REGISTER_AUTOGRAD_OP("bce_loss", fastmlp::autograd::bce_loss_autograd,
                             fastmlp::autograd::bce_loss_plain)
