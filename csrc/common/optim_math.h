// The optimizer updates of torch.optim.SGD and torch.optim.Adam / AdamW, one
// element at a time, shared by the CPU kernel, the CUDA kernel and the CUDA
// harness. Each line is one of torch's tensor ops (torch/optim/sgd.py, adam.py,
// the single-tensor path), in the same order and the same precision: the
// tensor's own dtype, with every Python scalar rounded to it first, as ATen's
// CPU kernels do for float and double. The per-step scalars (bias corrections,
// step size) are computed on the host in double, as torch computes them in
// Python, and handed in already rounded.
#pragma once
#include "common/math.h"

namespace fastmlp {

enum OptimizerKind : int64_t { kOptimSgd = 0, kOptimAdam = 1 };

// Per-parameter hyper-parameters as the op schema passes them (a float[] with a
// fixed stride per parameter). SGD: lr, momentum, dampening, weight_decay,
// nesterov, maximize. Adam: lr, beta1, beta2, eps, weight_decay, amsgrad,
// maximize, decoupled (AdamW).
constexpr int kHyperStride = 8;
// Adam keeps four state tensors per parameter (step, exp_avg, exp_avg_sq,
// max_exp_avg_sq: empty without amsgrad), SGD one (momentum_buffer: empty
// without momentum).
constexpr int kAdamStateStride = 4;
constexpr int kSgdStateStride = 1;

template <typename T> FASTMLP_HD T m_sqrt(T x);
template <> FASTMLP_HD float m_sqrt(float x) { return ::sqrtf(x); }
template <> FASTMLP_HD double m_sqrt(double x) { return ::sqrt(x); }

// The scalars of one parameter's SGD update, rounded to the parameter's dtype.
template <typename T> struct SgdScalars {
  T neg_lr;           // param.add_(grad, alpha=-lr)
  T momentum;         // buf.mul_(momentum); grad.add(buf, alpha=momentum)
  T one_minus_damp;   // buf.add_(grad, alpha=1 - dampening)
  T weight_decay;     // grad.add(param, alpha=weight_decay)
  bool has_momentum;  // momentum != 0 (the buffer exists: the first step is torch's own)
  bool has_weight_decay;
  bool nesterov;
  bool maximize;
};

// One element of torch's _single_tensor_sgd, after the momentum buffer exists.
template <typename T> FASTMLP_HD void sgd_update(T& param, T grad, T* momentum_buffer, const SgdScalars<T>& s) {
  T g = s.maximize ? -grad : grad;
  if (s.has_weight_decay) g = g + s.weight_decay * param;
  if (s.has_momentum) {
    const T buf = *momentum_buffer * s.momentum + s.one_minus_damp * g;
    *momentum_buffer = buf;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  param = param + s.neg_lr * g;
}

// The scalars of one parameter's Adam update for this step, rounded to its dtype.
template <typename T> struct AdamScalars {
  T lerp_weight;           // exp_avg.lerp_(grad, 1 - beta1)
  bool lerp_weight_small;  // ATen's lerp form for |weight| < 0.5
  T beta2;                 // exp_avg_sq.mul_(beta2)
  T one_minus_beta2;       // .addcmul_(grad, grad, value=1 - beta2)
  T bias_correction2_sqrt;
  T eps;
  T neg_step_size;  // param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
  T weight_decay;   // Adam: grad.add(param, alpha=weight_decay)
  T decay_factor;   // AdamW: param.mul_(1 - lr * weight_decay)
  bool has_weight_decay;
  bool decoupled;
  bool amsgrad;
  bool maximize;
};

// One element of torch's _single_tensor_adam (capturable=False, differentiable=False).
template <typename T>
FASTMLP_HD void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq, const AdamScalars<T>& s) {
  T g = s.maximize ? -grad : grad;
  T p = param;
  if (s.has_weight_decay) {
    if (s.decoupled) {
      p = p * s.decay_factor;
    } else {
      g = g + s.weight_decay * p;
    }
  }
  // at::lerp: start + weight * (end - start) for a small weight, else end - (end - start) * (1 - weight).
  const T m = s.lerp_weight_small ? exp_avg + s.lerp_weight * (g - exp_avg)
                                  : g - (g - exp_avg) * (T(1) - s.lerp_weight);
  exp_avg = m;
  const T v = exp_avg_sq * s.beta2 + s.one_minus_beta2 * g * g;
  exp_avg_sq = v;
  T second = v;
  if (s.amsgrad) {
    second = nan_max(*max_exp_avg_sq, v);
    *max_exp_avg_sq = second;
  }
  const T denom = m_sqrt(second) / s.bias_correction2_sqrt + s.eps;
  param = p + s.neg_step_size * m / denom;
}

// One parameter's update as the kernels take it: its tensors' data and its
// scalars (in the accumulation type: the dtype itself for float and double).
template <typename T> struct SgdSlot {
  T* param;
  T* grad;  // written back only when clipping scales it (CUDA)
  T* momentum_buffer;  // null without momentum
  int64_t numel;
  SgdScalars<acc_t<T>> s;
};

// Adam's step-dependent scalars, as torch.optim computes them from the step
// count in Python floats (double): -lr / (1 - beta1^step) and
// sqrt(1 - beta2^step) (as `** 0.5`). On the host for a CPU step count, in the
// kernel for one kept on the device.
struct AdamBiasCorrection {
  double neg_step_size;
  double bias_correction2_sqrt;
};

FASTMLP_HD AdamBiasCorrection adam_bias_correction(double step, double lr, double beta1, double beta2) {
  const double bias_correction1 = 1 - ::pow(beta1, step);
  const double bias_correction2 = 1 - ::pow(beta2, step);
  return {-(lr / bias_correction1), ::pow(bias_correction2, 0.5)};
}

// A step count on the device (torch's state["step"] with capturable=True or
// fused=True on CUDA: float32, float64 under a float64 default dtype): the
// update kernels advance it and compute the bias corrections from it, so
// nothing is read on the host and a CUDA graph replays the real count.
struct DeviceStep {
  float* f32 = nullptr;  // exactly one of the two is set
  double* f64 = nullptr;
  double lr = 0, beta1 = 0, beta2 = 0;
};

template <typename T> struct AdamSlot {
  T* param;
  T* grad;  // written back only when clipping scales it (CUDA)
  T* exp_avg;
  T* exp_avg_sq;
  T* max_exp_avg_sq;  // null without amsgrad
  int64_t numel;
  AdamScalars<acc_t<T>> s;  // neg_step_size and bias_correction2_sqrt from `step` when it is on the device
  DeviceStep step;
};

}  // namespace fastmlp
