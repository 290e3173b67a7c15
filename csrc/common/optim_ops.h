// fastmlp::optimizer_step for every backend: gradient clipping (optional) and
// one SGD or Adam/AdamW update of a list of parameters, with the optimizer's
// state in torch.optim's own tensors. This file checks the arguments, advances
// Adam's step counts, computes each parameter's per-step scalars on the host as
// torch.optim does (in double, then rounded to the parameter's dtype) and hands
// typed slots to the backend; a step count the backend keeps on the device
// (Kernels::step_on_device) is advanced, and its bias corrections computed, by
// the backend's kernels instead. A backend supplies
//   Kernels::Guard, Kernels::step_on_device(step, param)
//   Kernels::template sgd<T>(slots, max_grad_norm, like) / adam<T>(...): when max_grad_norm is
//     given, first the gradients clipped in place with torch.nn.utils.clip_grad_norm_'s formula; then
//     one pass over every element of every slot (`like`: a parameter, for workspace options)
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/optim_math.h"

namespace fastmlp {

// A state tensor that must be there, with its parameter's shape, dtype and device.
inline void check_state_like(const at::Tensor& t, const at::Tensor& param, size_t i, const char* name) {
  TORCH_CHECK(t.defined() && t.sizes() == param.sizes() && t.is_contiguous(), "fastmlp.optimizer_step: ", name,
              " of parameter ", i, " must be a contiguous tensor of shape ", param.sizes(), ", got ",
              t.defined() ? t.sizes() : c10::IntArrayRef{});
  check_same(t, param, name, "param");
}

inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

template <class Kernels> struct OptimOps {
  static void step(at::TensorList params, at::TensorList grads, at::TensorList state, int64_t optimizer,
                   c10::ArrayRef<double> hyper, std::optional<double> max_grad_norm) {
    check_args(params, grads, state, optimizer, hyper);
    if (params.empty()) return;
    const at::Tensor& first = params[0];
    typename Kernels::Guard guard(first.device());
    BelowAutograd below_autograd;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "fastmlp_optimizer_step", [&] {
      if (optimizer == kOptimSgd) {
        Kernels::template sgd<scalar_t>(sgd_slots<scalar_t>(params, grads, state, hyper), max_grad_norm, first);
      } else {
        Kernels::template adam<scalar_t>(adam_slots<scalar_t>(params, grads, state, hyper), max_grad_norm, first);
      }
    });
    bump_versions(params, grads, state, max_grad_norm.has_value());
  }

  // The pieces of step() for a backend that runs the update itself, fused
  // into its own gradient pass: the checks of the arguments, the typed slots
  // (for Adam the step counts advance here: build them once the update cannot
  // fail any more), and the version bumps after the update.
  static void check_args(at::TensorList params, at::TensorList grads, at::TensorList state, int64_t optimizer,
                         c10::ArrayRef<double> hyper) {
    const size_t n = params.size();
    TORCH_CHECK(optimizer == kOptimSgd || optimizer == kOptimAdam,
                "fastmlp.optimizer_step: optimizer must be 0 (SGD) or 1 (Adam), got ", optimizer);
    const size_t stride = optimizer == kOptimAdam ? kAdamStateStride : kSgdStateStride;
    TORCH_CHECK(grads.size() == n, "fastmlp.optimizer_step: got ", n, " params but ", grads.size(), " grads");
    TORCH_CHECK(state.size() == stride * n, "fastmlp.optimizer_step: expected ", stride * n,
                " state tensors (", stride, " per parameter), got ", state.size());
    TORCH_CHECK(hyper.size() == kHyperStride * n, "fastmlp.optimizer_step: expected ", kHyperStride * n,
                " hyper-parameters (", kHyperStride, " per parameter), got ", hyper.size());
    if (n == 0) return;
    const at::Tensor& first = params[0];
    check_floating(first, "param");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(params[i].is_contiguous(), "fastmlp.optimizer_step: param ", i, " must be contiguous");
      check_same(params[i], first, "param", "params[0]");
      check_state_like(grads[i], params[i], i, "grad");
    }
  }

  // Every tensor the update writes counts as modified in place, as after
  // torch.optim's in-place ops: autograd then refuses a graph that saved one
  // of them before the step instead of using its new values.
  static void bump_versions(at::TensorList params, at::TensorList grads, at::TensorList state, bool clipped) {
    for (const at::Tensor& t : params) t.unsafeGetTensorImpl()->bump_version();
    for (const at::Tensor& t : state)
      if (present(t) || (t.defined() && t.dim() == 0)) t.unsafeGetTensorImpl()->bump_version();
    if (clipped)
      for (const at::Tensor& t : grads) t.unsafeGetTensorImpl()->bump_version();
  }

  template <typename T>
  static std::vector<SgdSlot<T>> sgd_slots(at::TensorList params, at::TensorList grads, at::TensorList state,
                                           c10::ArrayRef<double> hyper) {
    using A = acc_t<T>;
    std::vector<SgdSlot<T>> slots;
    slots.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const double* h = hyper.data() + i * kHyperStride;
      const double lr = h[0], momentum = h[1], dampening = h[2], weight_decay = h[3];
      SgdSlot<T> slot{params[i].data_ptr<T>(), grads[i].data_ptr<T>(), nullptr, params[i].numel(), {}};
      slot.s.neg_lr = static_cast<A>(-lr);
      slot.s.momentum = static_cast<A>(momentum);
      slot.s.one_minus_damp = static_cast<A>(1 - dampening);
      slot.s.weight_decay = static_cast<A>(weight_decay);
      slot.s.has_momentum = momentum != 0;
      slot.s.has_weight_decay = weight_decay != 0;
      slot.s.nesterov = h[4] != 0;
      slot.s.maximize = h[5] != 0;
      if (slot.s.has_momentum) {
        // The buffer is torch's from the first step (grad.clone()); later steps update it.
        check_state_like(state[i], params[i], i, "momentum_buffer");
        slot.momentum_buffer = state[i].data_ptr<T>();
      }
      slots.push_back(slot);
    }
    return slots;
  }

  template <typename T>
  static std::vector<AdamSlot<T>> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList state,
                                             c10::ArrayRef<double> hyper) {
    using A = acc_t<T>;
    std::vector<AdamSlot<T>> slots;
    slots.reserve(params.size());
    std::vector<bool> on_device(params.size());
    for (size_t i = 0; i < params.size(); ++i) {  // every check before the first step count moves
      const at::Tensor* st = state.data() + i * kAdamStateStride;
      on_device[i] = st[0].defined() && Kernels::step_on_device(st[0], params[i]);
      on_device[i] ? check_device_step(st[0], i) : check_step(st[0], i);
      check_state_like(st[1], params[i], i, "exp_avg");
      check_state_like(st[2], params[i], i, "exp_avg_sq");
      if (hyper[i * kHyperStride + 5] != 0) check_state_like(st[3], params[i], i, "max_exp_avg_sq");
    }
    for (size_t i = 0; i < params.size(); ++i) {
      const double* h = hyper.data() + i * kHyperStride;
      const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], weight_decay = h[4];
      const bool amsgrad = h[5] != 0;
      const at::Tensor* st = state.data() + i * kAdamStateStride;
      AdamSlot<T> slot{params[i].data_ptr<T>(),
                       grads[i].data_ptr<T>(),
                       st[1].data_ptr<T>(),
                       st[2].data_ptr<T>(),
                       amsgrad ? st[3].data_ptr<T>() : nullptr,
                       params[i].numel(),
                       {},
                       {}};
      if (on_device[i]) {  // the kernels advance it and compute the bias corrections
        if (st[0].scalar_type() == at::kFloat) {
          slot.step.f32 = st[0].data_ptr<float>();
        } else {
          slot.step.f64 = st[0].data_ptr<double>();
        }
        slot.step.lr = lr;
        slot.step.beta1 = beta1;
        slot.step.beta2 = beta2;
      } else {
        // torch/optim/adam.py, capturable=False: Python floats.
        const AdamBiasCorrection bc = adam_bias_correction(advance_step(st[0]), lr, beta1, beta2);
        slot.s.bias_correction2_sqrt = static_cast<A>(bc.bias_correction2_sqrt);
        slot.s.neg_step_size = static_cast<A>(bc.neg_step_size);
      }
      const A lerp_weight = static_cast<A>(1 - beta1);
      slot.s.lerp_weight = lerp_weight;
      slot.s.lerp_weight_small = (lerp_weight < 0 ? -lerp_weight : lerp_weight) < A(0.5);
      slot.s.beta2 = static_cast<A>(beta2);
      slot.s.one_minus_beta2 = static_cast<A>(1 - beta2);
      slot.s.eps = static_cast<A>(eps);
      slot.s.weight_decay = static_cast<A>(weight_decay);
      slot.s.decay_factor = static_cast<A>(1 - lr * weight_decay);
      slot.s.has_weight_decay = weight_decay != 0;
      slot.s.amsgrad = amsgrad;
      slot.s.maximize = h[6] != 0;
      slot.s.decoupled = h[7] != 0;
      slots.push_back(slot);
    }
    return slots;
  }

 private:
  // torch.optim's state["step"] with capturable=False and fused=False: a 0-dim
  // CPU tensor, float32 (float64 under a float64 default dtype).
  static void check_step(const at::Tensor& step, size_t i) {
    TORCH_CHECK(step.defined() && step.dim() == 0 && step.is_cpu() &&
                    (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                "fastmlp.optimizer_step: step of parameter ", i,
                " must be a 0-dim float32 or float64 CPU tensor (torch.optim's state['step'] with capturable=False)");
  }

  // torch.optim's state["step"] with capturable=True, or fused=True on CUDA: a
  // 0-dim float32 (float64) tensor on the parameter's device.
  static void check_device_step(const at::Tensor& step, size_t i) {
    TORCH_CHECK(step.dim() == 0 && (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                "fastmlp.optimizer_step: step of parameter ", i,
                " on the device must be a 0-dim float32 or float64 tensor (torch.optim's state['step'])");
  }

  // `state["step"] += 1`, then its value as torch.optim reads it with .item().
  static double advance_step(const at::Tensor& step) {
    if (step.scalar_type() == at::kFloat) {
      float* v = step.data_ptr<float>();
      *v = *v + 1.0f;
      return *v;
    }
    double* v = step.data_ptr<double>();
    *v = *v + 1.0;
    return *v;
  }
};

}  // namespace fastmlp
