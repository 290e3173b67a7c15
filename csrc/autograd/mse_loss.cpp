// fastmlp::mse_loss: the mean squared error as one differentiable op. For a
// reduced loss the input gradient is computed in the forward pass (the target's
// is its negative) and backward only scales it.
#include "autograd/autograd_utils.h"

namespace fastmlp::autograd {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, bool);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             int64_t, std::array<bool, 2>);

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const at::Tensor& target, int64_t reduction,
                                                bool input_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mse_forward", "").typed<ForwardSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, reduction, input_grad);
}

// Inputs, in autograd's order: input, target, reduction.
struct MSEFunction : public torch::autograd::Function<MSEFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            int64_t reduction) {
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    const bool reduced = reduction != 0;
    const bool in_forward = reduced && (need_input || need_target);
    auto [loss, grad_input] = call_forward(input, target, reduction, in_forward);
    const at::Tensor none;
    ctx->save_for_backward({in_forward ? grad_input : none, in_forward ? none : input, in_forward ? none : target});
    ctx->saved_data["reduction"] = reduction;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grad_outputs[0];
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list out(3);  // input, target, reduction
    const at::Tensor& stored = saved[0];
    if (stored.defined()) {
      const bool unit = is_unit_seed(grad_loss);
      if (need_input) out[0] = scaled(stored, grad_loss, unit, true);
      if (need_target) out[1] = unit ? -stored : stored * -grad_loss;
      return out;
    }
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mse_backward", "").typed<BackwardSignature>();
    auto [gi, gt] = op.call(grad_loss, saved[1], saved[2], ctx->saved_data["reduction"].toInt(),
                            {need_input, need_target});
    if (need_input) out[0] = gi;
    if (need_target) out[1] = gt;
    return out;
  }
};

at::Tensor mse_loss_plain(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  return std::get<0>(call_forward(input, target, reduction, false));
}

at::Tensor mse_loss_autograd(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  if (!any_requires_grad({input, target}, {})) return mse_loss_plain(input, target, reduction);
  return MSEFunction::apply(input, target, reduction);
}

}  // namespace
}  // namespace fastmlp::autograd

FASTMLP_REGISTER_AUTOGRAD_OP("mse_loss", fastmlp::autograd::mse_loss_autograd, fastmlp::autograd::mse_loss_plain)
