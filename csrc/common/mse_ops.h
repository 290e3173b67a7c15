// The MSE ops, written once for every backend. A backend supplies
//   Kernels::Guard
//   Kernels::forward(x, y, reduction, loss, grad)        loss: [] or like x; grad: like x or undefined
//   Kernels::backward(grad_loss, x, y, reduction, grad_input, grad_target)   (either undefined)
// on contiguous tensors of one shape; this file adds the checks, layouts and
// output allocation. The target gradient is minus the input gradient, so the
// autograd op derives it from the stored input gradient of a reduced loss.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/checks.h"

namespace fastmlp {

inline void check_mse_args(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  check_floating(input, "input");
  check_same(target, input, "target", "input");
  TORCH_CHECK(target.sizes() == input.sizes(), "fastmlp.mse: expected target of the input's shape ", input.sizes(),
              ", got ", target.sizes(), " (torch_fastmlp.functional.mse_loss hands broadcasting to torch)");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastmlp.mse: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

template <class Kernels> struct MseOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                                    int64_t reduction, bool input_grad) {
    check_mse_args(input, target, reduction);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), y = target.contiguous();
    const bool reduced = reduction != 0;
    at::Tensor loss = reduced ? at::empty({}, x.options()) : at::empty_like(x);
    // As for BCE: the input gradient in the same pass only for a reduced loss.
    at::Tensor grad = reduced && input_grad ? at::empty_like(x) : at::Tensor();
    Kernels::forward(x, y, reduction, loss, grad);
    return {loss, grad.defined() ? grad : at::empty({0}, x.options())};
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const at::Tensor& target, int64_t reduction,
                                                     std::array<bool, 2> output_mask) {
    check_mse_args(input, target, reduction);
    check_same(grad_output, input, "grad_output", "input");
    TORCH_CHECK(reduction != 0 ? grad_output.numel() == 1 : grad_output.sizes() == input.sizes(),
                "fastmlp.mse_backward: grad_output of shape ", grad_output.sizes(), " does not match the loss");
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), y = target.contiguous();
    at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::Tensor();
    at::Tensor grad_target = output_mask[1] ? at::empty_like(x) : at::Tensor();
    Kernels::backward(grad_output.contiguous(), x, y, reduction, grad_input, grad_target);
    return {grad_input.defined() ? grad_input : at::empty({0}, x.options()),
            grad_target.defined() ? grad_target : at::empty({0}, x.options())};
  }
};

#define FASTMLP_REGISTER_MSE_OPS(m, Kernels)                         \
  do {                                                               \
    (m).impl("mse_forward", &::fastmlp::MseOps<Kernels>::forward);   \
    (m).impl("mse_backward", &::fastmlp::MseOps<Kernels>::backward); \
  } while (0)

}  // namespace fastmlp
