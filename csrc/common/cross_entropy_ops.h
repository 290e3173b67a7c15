// The softmax cross-entropy ops, written once for every backend. A backend supplies
//   Kernels::Guard
//   Kernels::forward(x, target, weight, reduction, ignore_index, smoothing, loss, grad)
//       loss: [] or [B]; grad: like x or undefined
//   Kernels::backward(grad_loss, x, target, weight, reduction, ignore_index, smoothing, grad_input)
// on contiguous tensors: x [B, C]; target int64 [B] (class indices, checked by
// the kernels against C) or x's dtype [B, C] (probabilities); weight undefined
// or [C]. This file adds the checks, layouts and output allocation.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/checks.h"

namespace fastmlp {

// Whether `target` holds class indices (else probabilities of x's shape).
inline bool ce_index_target(const at::Tensor& target) { return target.scalar_type() == at::kLong; }

inline void check_ce_args(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                          int64_t reduction, double smoothing) {
  TORCH_CHECK(input.dim() == 2, "fastmlp.cross_entropy: expected input of shape [batch, classes], got ",
              input.sizes());
  check_floating(input, "input");
  TORCH_CHECK(input.size(1) > 0 || input.size(0) == 0, "fastmlp.cross_entropy: input has no classes: ",
              input.sizes());
  if (ce_index_target(target)) {
    TORCH_CHECK(target.device() == input.device(), "fastmlp: expected target and input to be on the same device, ",
                "but got ", target.device(), " and ", input.device());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0),
                "fastmlp.cross_entropy: expected class index target of shape [", input.size(0), "], got ",
                target.sizes());
  } else {
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "fastmlp.cross_entropy: expected int64 class indices or floating point class probabilities "
                "as target, got ",
                target.scalar_type());
    check_same(target, input, "target", "input");
    TORCH_CHECK(target.sizes() == input.sizes(), "fastmlp.cross_entropy: expected probability target of shape ",
                input.sizes(), ", got ", target.sizes());
  }
  if (weight.has_value() && weight->defined()) {
    check_same(*weight, input, "weight", "input");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == input.size(1),
                "fastmlp.cross_entropy: weight tensor should be defined either for all ", input.size(1),
                " classes or no classes but got weight tensor of shape: ", weight->sizes());
  }
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "fastmlp.cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(smoothing >= 0.0 && smoothing <= 1.0, "label_smoothing must be between 0.0 and 1.0. Got: ", smoothing);
}

inline at::Tensor ce_weight(const c10::optional<at::Tensor>& w) {
  return w.has_value() && w->defined() ? w->contiguous() : at::Tensor();
}

template <class Kernels> struct CrossEntropyOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& weight, int64_t reduction,
                                                    int64_t ignore_index, double label_smoothing, bool input_grad) {
    check_ce_args(input, target, weight, reduction, label_smoothing);
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), t = target.contiguous();
    const bool reduced = reduction != 0;
    at::Tensor loss = reduced ? at::empty({}, x.options()) : at::empty({x.size(0)}, x.options());
    at::Tensor grad = reduced && input_grad ? at::empty_like(x) : at::Tensor();
    Kernels::forward(x, t, ce_weight(weight), reduction, ignore_index, label_smoothing, loss, grad);
    return {loss, grad.defined() ? grad : at::empty({0}, x.options())};
  }

  static at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                             double label_smoothing) {
    check_ce_args(input, target, weight, reduction, label_smoothing);
    check_same(grad_output, input, "grad_output", "input");
    TORCH_CHECK(reduction != 0 ? grad_output.numel() == 1
                               : (grad_output.dim() == 1 && grad_output.size(0) == input.size(0)),
                "fastmlp.cross_entropy_backward: grad_output of shape ", grad_output.sizes(),
                " does not match the loss");
    typename Kernels::Guard guard(input.device());
    BelowAutograd below_autograd;
    const at::Tensor x = input.contiguous(), t = target.contiguous();
    at::Tensor grad_input = at::empty_like(x);
    Kernels::backward(grad_output.contiguous(), x, t, ce_weight(weight), reduction, ignore_index, label_smoothing,
                      grad_input);
    return grad_input;
  }
};

#define FASTMLP_REGISTER_CROSS_ENTROPY_OPS(m, Kernels)                                \
  do {                                                                                \
    (m).impl("cross_entropy_forward", &::fastmlp::CrossEntropyOps<Kernels>::forward);   \
    (m).impl("cross_entropy_backward", &::fastmlp::CrossEntropyOps<Kernels>::backward); \
  } while (0)

}  // namespace fastmlp
