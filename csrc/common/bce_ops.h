// The BCE-with-logits ops, written once for every backend. A backend supplies
//   Kernels::Guard
//   Kernels::forward(x, y, w, pw, reduction, loss, grad)   loss: [] or like x; grad: like x or undefined
//   Kernels::backward(grad_loss, x, y, w, pw, reduction, grad_input, grad_target)  (either undefined)
// on contiguous tensors (w / pw: undefined or a flat pattern repeating along x);
// this file adds the checks, layouts and output allocation.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/checks.h"

namespace fastmlp {

enum BceReduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// A weight / pos_weight as the kernels take it: contiguous, or undefined when absent.
inline at::Tensor bce_pattern(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <class Kernels> struct BceOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& weight,
                                                    const c10::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                    bool input_grad) {
    check_bce_args(input, target, weight, pos_weight, reduction);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), y = target.contiguous();
    const bool reduced = reduction != kReductionNone;
    at::Tensor loss = reduced ? at::empty({}, x.options()) : at::empty_like(x);
    // The input gradient is computed in the forward pass only for a reduced loss
    // (for `none` it would be a second input-sized tensor that PyTorch never keeps).
    at::Tensor grad = reduced && input_grad ? at::empty_like(x) : at::Tensor();
    Kernels::forward(x, y, bce_pattern(weight), bce_pattern(pos_weight), reduction, loss, grad);
    return {loss, grad.defined() ? grad : at::empty({0}, x.options())};
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                                     const c10::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                     std::array<bool, 2> output_mask) {
    check_bce_args(input, target, weight, pos_weight, reduction);
    check_same(grad_output, input, "grad_output", "input");
    TORCH_CHECK(reduction != kReductionNone ? grad_output.numel() == 1 : grad_output.sizes() == input.sizes(),
                "fastmlp.bce_with_logits_backward: grad_output of shape ", grad_output.sizes(),
                " does not match the loss");
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), y = target.contiguous();
    at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::Tensor();
    at::Tensor grad_target = output_mask[1] ? at::empty_like(x) : at::Tensor();
    Kernels::backward(grad_output.contiguous(), x, y, bce_pattern(weight), bce_pattern(pos_weight), reduction,
                      grad_input, grad_target);
    return {grad_input.defined() ? grad_input : at::empty({0}, x.options()),
            grad_target.defined() ? grad_target : at::empty({0}, x.options())};
  }
};

#define FASTMLP_REGISTER_BCE_OPS(m, Kernels)                                        \
  do {                                                                              \
    (m).impl("bce_with_logits", &::fastmlp::BceOps<Kernels>::forward);              \
    (m).impl("bce_with_logits_backward", &::fastmlp::BceOps<Kernels>::backward);    \
  } while (0)

}  // namespace fastmlp
