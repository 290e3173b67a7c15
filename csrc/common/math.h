// Scalar math shared by the CPU kernels and the CUDA kernels (and the CUDA
// emulation harness), so every backend computes the same formulas.
#pragma once
#include <math.h>

#if defined(__CUDACC__)
#define FASTMLP_HD __host__ __device__ __forceinline__
#else
#define FASTMLP_HD inline
#endif

namespace fastmlp {

// The accumulation type: float for float and half types, double for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

FASTMLP_HD float m_exp(float x) { return ::expf(x); }
FASTMLP_HD double m_exp(double x) { return ::exp(x); }
FASTMLP_HD float m_log1p(float x) { return ::log1pf(x); }
FASTMLP_HD double m_log1p(double x) { return ::log1p(x); }
FASTMLP_HD float m_abs(float x) { return ::fabsf(x); }
FASTMLP_HD double m_abs(double x) { return ::fabs(x); }

// max that propagates NaN (either operand), as torch.maximum and torch's max reduction.
template <typename T> FASTMLP_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

// ReLU that keeps NaN, as torch.relu does (fmax(x, 0) would turn NaN into 0).
template <typename T> FASTMLP_HD T relu(T x) { return x > T(0) ? x : (x != x ? x : T(0)); }

// The ReLU backward mask read from the saved output, as torch's threshold_backward
// does (`output <= 0 ? 0 : grad`): a NaN output lets the gradient through.
template <typename T> FASTMLP_HD bool relu_passes(T output) { return !(output <= T(0)); }

// Numerically stable softplus(-x) = log(1 + exp(-x)) = max(-x, 0) + log1p(exp(-|x|)).
template <typename T> FASTMLP_HD T softplus_neg(T x) {
  return (x < T(0) ? -x : T(0)) + m_log1p(m_exp(-m_abs(x)));
}

// Binary cross-entropy with logits, one element. w: weight, pw: pos_weight.
//   loss     = w * ((1 - y) * x + (1 + (pw - 1) * y) * softplus(-x))
//   dloss/dx = w * ((1 - y) - (1 + (pw - 1) * y) * sigmoid(-x))
//   dloss/dy = w * (pw * softplus(-x) - softplus(x))
//            (= w * (-x + (pw - 1) * softplus(-x)), which is inf - inf at x = -inf)
template <typename T> struct BceTerms {
  T loss;
  T grad_input;
};

template <typename T> FASTMLP_HD BceTerms<T> bce_terms(T x, T y, T w, T pw) {
  const T log_weight = T(1) + (pw - T(1)) * y;
  // softplus(-x) and sigmoid(-x) share one exp(-|x|) (the costly part).
  const T e = m_exp(-m_abs(x));
  const T sp = (x < T(0) ? -x : T(0)) + m_log1p(e);
  const T sig_neg = x >= T(0) ? e / (T(1) + e) : T(1) / (T(1) + e);
  BceTerms<T> r;
  r.loss = w * ((T(1) - y) * x + log_weight * sp);
  r.grad_input = w * ((T(1) - y) - log_weight * sig_neg);
  return r;
}

template <typename T> FASTMLP_HD T bce_grad_target(T x, T w, T pw) {
  return w * (pw * softplus_neg(x) - softplus_neg(-x));
}

}  // namespace fastmlp
