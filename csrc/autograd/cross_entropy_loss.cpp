// fastmlp::cross_entropy_loss: softmax cross-entropy as one differentiable op.
// For a reduced loss d loss / d input is computed in the forward pass and
// backward only scales it; for reduction='none' backward recomputes it per row.
// No gradient for probability targets or class weights (functional.cross_entropy
// hands such calls to torch; here they are refused, never silently dropped).
#include "autograd/autograd_utils.h"

namespace fastmlp::autograd {
namespace {

using Optional = std::optional<at::Tensor>;
using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const Optional&,
                                                            int64_t, int64_t, double, bool);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&,
                                     int64_t, int64_t, double);

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const at::Tensor& target,
                                                const Optional& weight, int64_t reduction, int64_t ignore_index,
                                                double smoothing, bool input_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::cross_entropy_forward", "").typed<ForwardSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, weight, reduction, ignore_index, smoothing, input_grad);
}

// Inputs, in autograd's order: input, target, weight (when given), reduction,
// ignore_index, label_smoothing.
struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const Optional& weight, int64_t reduction, int64_t ignore_index, double smoothing) {
    const bool need_input = ctx->needs_input_grad(0);
    const bool reduced = reduction != 0;
    auto [loss, grad_input] = call_forward(input, target, weight, reduction, ignore_index, smoothing,
                                           need_input && reduced);
    const bool elementwise = need_input && !reduced;
    const at::Tensor none;
    ctx->save_for_backward({need_input && reduced ? grad_input : none, elementwise ? input : none,
                            elementwise ? target : none, elementwise ? weight.value_or(none) : none});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = smoothing;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list out(6);
    if (!ctx->needs_input_grad(0)) return out;
    const at::Tensor& stored = saved[0];
    if (stored.defined()) {
      out[0] = scaled(stored, grad_loss, is_unit_seed(grad_loss), true);
      return out;
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastmlp::cross_entropy_backward", "")
                               .typed<BackwardSignature>();
    const Optional weight = saved[3].defined() ? Optional(saved[3]) : std::nullopt;
    out[0] = op.call(grad_loss, saved[1], saved[2], weight, ctx->saved_data["reduction"].toInt(),
                     ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble());
    return out;
  }
};

at::Tensor cross_entropy_plain(const at::Tensor& input, const at::Tensor& target, const Optional& weight,
                               int64_t reduction, int64_t ignore_index, double smoothing) {
  return std::get<0>(call_forward(input, target, weight, reduction, ignore_index, smoothing, false));
}

at::Tensor cross_entropy_autograd(const at::Tensor& input, const at::Tensor& target, const Optional& weight,
                                  int64_t reduction, int64_t ignore_index, double smoothing) {
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK(!(grad_mode && target.requires_grad()),
              "fastmlp.cross_entropy_loss: no gradient for the target (torch_fastmlp.functional.cross_entropy "
              "hands probability targets that require grad to torch)");
  TORCH_CHECK(!(grad_mode && weight.has_value() && weight->defined() && weight->requires_grad()),
              "fastmlp.cross_entropy_loss: no gradient for the class weight (torch_fastmlp.functional.cross_entropy "
              "hands a weight that requires grad to torch)");
  if (!any_requires_grad({input}, {})) return cross_entropy_plain(input, target, weight, reduction, ignore_index, smoothing);
  return CrossEntropyFunction::apply(input, target, weight, reduction, ignore_index, smoothing);
}

}  // namespace
}  // namespace fastmlp::autograd

FASTMLP_REGISTER_AUTOGRAD_OP("cross_entropy_loss", fastmlp::autograd::cross_entropy_autograd,
                             fastmlp::autograd::cross_entropy_plain)
