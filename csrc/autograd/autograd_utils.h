// Shared pieces of the C++ autograd kernels (csrc/autograd/*.cpp): they give
// the fused ops their gradients without a Python autograd.Function, so a small
// batch pays no Python in backward and one op call in forward.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastmlp::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// Same error as the Python Functions' backward: create_graph=True would need
// gradients of gradients, which the fused kernels do not give.
inline void check_first_order() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "torch_fastmlp: double backward (create_graph=True) is not supported by the fused kernels; "
              "use the torch.nn modules for higher-order gradients");
}

// Whether an incoming loss gradient is exactly 1 (`loss.backward()`), so
// gradients computed in forward are the answer as they are. Read only from a
// real CPU scalar: no device sync, and nothing data-dependent while tracing.
inline bool is_unit_seed(const at::Tensor& grad) {
  return !grad.key_set().has(c10::DispatchKey::Python) && grad.device().is_cpu() && grad.dim() == 0 &&
         grad.item<double>() == 1.0;
}

// `grad * scale`, or grad itself for a unit scale; undefined when not `wanted`.
inline at::Tensor scaled(const at::Tensor& grad, const at::Tensor& scale, bool unit, bool wanted) {
  if (!wanted) return at::Tensor();
  return unit ? grad : grad * scale;
}

// `grads[i] * scale` for every wanted grads[i] (undefined where not wanted, or
// grads[i] itself for a unit scale). Several on the scale's device are one
// multi-tensor multiply (one launch on CUDA instead of one per gradient), the
// same products as `grad * scale`.
inline std::vector<at::Tensor> scaled_all(const std::vector<at::Tensor>& grads, const at::Tensor& scale, bool unit,
                                          const std::vector<bool>& wanted) {
  std::vector<at::Tensor> out(grads.size());
  std::vector<size_t> todo;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!wanted[i] || !grads[i].defined()) continue;
    if (unit) {
      out[i] = grads[i];
    } else {
      todo.push_back(i);
    }
  }
  const bool together = todo.size() > 1 && scale.dim() == 0 && !scale.key_set().has(c10::DispatchKey::Python) &&
                        std::all_of(todo.begin(), todo.end(), [&](size_t i) {
                          return grads[i].device() == scale.device() &&
                                 grads[i].scalar_type() == grads[todo[0]].scalar_type() &&
                                 !grads[i].key_set().has(c10::DispatchKey::Python);
                        });
  if (together) {
    std::vector<at::Tensor> list;
    list.reserve(todo.size());
    for (size_t i : todo) list.push_back(grads[i]);
    std::vector<at::Tensor> products = at::_foreach_mul(list, scale);
    for (size_t j = 0; j < todo.size(); ++j) out[todo[j]] = std::move(products[j]);
  } else {
    for (size_t i : todo) out[i] = grads[i] * scale;
  }
  return out;
}

// Whether autograd has any gradient to compute for these inputs (needs_input_grad
// is only defined for a node autograd records).
inline bool any_requires_grad(std::initializer_list<at::Tensor> tensors, at::TensorList a = {},
                              at::TensorList b = {}) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : tensors)
    if (t.defined() && t.requires_grad()) return true;
  for (at::TensorList list : {a, b})
    for (const auto& t : list)
      if (t.defined() && t.requires_grad()) return true;
  return false;
}

// torch's error for a loss weight that requires grad: BCE has no gradient for it.
inline void check_not_differentiable(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()),
              "The function 'binary_cross_entropy_with_logits' is not differentiable with respect to argument '",
              name, "'. This input cannot have requires_grad True.");
}

// A chain's biases as autograd tracks them: the present ones, in layer order
// (autograd's custom Functions take no undefined tensor), and which layers have one.
struct Biases {
  std::vector<at::Tensor> present;
  c10::List<bool> has;

  explicit Biases(const OptionalTensorList& biases) {
    for (const auto& entry : biases) {
      const std::optional<at::Tensor> b = entry;
      const bool defined = b.has_value() && b->defined();
      has.push_back(defined);
      if (defined) present.push_back(*b);
    }
  }

  // One tensor per layer from the present ones and the flags, undefined where absent.
  static std::vector<at::Tensor> expand_list(at::TensorList present, const c10::List<bool>& has) {
    std::vector<at::Tensor> out;
    size_t next = 0;
    for (const bool h : has) out.push_back(h ? present[next++] : at::Tensor());
    return out;
  }

  // Back to the op schema's Tensor?[] from the present ones and the flags.
  static OptionalTensorList expand(at::TensorList present, const c10::List<bool>& has) {
    OptionalTensorList out;
    for (const at::Tensor& b : expand_list(present, has)) {
      out.push_back(b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
    }
    return out;
  }
};

}  // namespace fastmlp::autograd

// Registers a differentiable op: `autograd_fn` under the Autograd key, and
// `plain_fn` (the result without gradients: inference mode, or code below
// autograd) for every device with kernels.
#ifdef FASTMLP_WITH_CUDA
#define FASTMLP_REGISTER_AUTOGRAD_OP(name, autograd_fn, plain_fn)                 \
  TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) { m.impl(name, &(autograd_fn)); } \
  TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { m.impl(name, &(plain_fn)); }         \
  TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) { m.impl(name, &(plain_fn)); }
#else
#define FASTMLP_REGISTER_AUTOGRAD_OP(name, autograd_fn, plain_fn)                 \
  TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) { m.impl(name, &(autograd_fn)); } \
  TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { m.impl(name, &(plain_fn)); }
#endif
