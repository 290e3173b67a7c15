// Scalar math of the MSE and softmax cross-entropy losses, shared by the CPU
// kernels, the CUDA kernels (and the CUDA emulation harness), and written as
// per-element / per-row pieces that a fused training-step kernel can call for
// the rows it owns: the loss terms and d loss / d logits of one row.
//
// Cross-entropy of one row x[0..C) (torch's definitions, LossNLL.cpp):
//   lse = log(sum_c exp(x_c)),  lsm_c = x_c - lse,  p_c = exp(lsm_c)
//   the row's loss is sum_c q_c * (lse - x_c) with, for a class index target t
//   (eps = label_smoothing, w = class weights or all ones):
//     q_c = (1 - eps) * w_t * [c == t] + eps / C * w_c
//   and for probability targets y:
//     q_c = w_c * ((1 - eps) * y_c + eps / C)     (eps = 0: q_c = w_c * y_c)
//   d loss / d x_j = Q * p_j - q_j,  Q = sum_c q_c
//     (index target: Q = (1 - eps) * w_t + eps / C * sum_c w_c).
//   For an index target with eps = 0 only c == t contributes (torch's NLL reads
//   only lsm_t, so -inf logits elsewhere give a finite loss); an ignored row
//   (t == ignore_index) has loss 0 and gradient 0.
//   mean: index targets divide by sum over non-ignored rows of w_t (NaN when
//   every row is ignored, as torch), probability targets by the row count.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/math.h"

namespace fastmlp {

FASTMLP_HD float loss_log(float x) { return ::logf(x); }
FASTMLP_HD double loss_log(double x) { return ::log(x); }

// ---- MSE ------------------------------------------------------------------
// loss = (x - y)^2, d loss / d x = 2 (x - y), d loss / d y = -2 (x - y).
template <typename T> struct MseTerms {
  T loss;
  T grad_input;
};

template <typename T> FASTMLP_HD MseTerms<T> mse_terms(T x, T y) {
  const T d = x - y;
  MseTerms<T> r;
  r.loss = d * d;
  r.grad_input = T(2) * d;
  return r;
}

// ---- softmax cross-entropy ----------------------------------------------------

// Running softmax statistics of part of a row: its max and sum of exp(x - max).
// An empty part is {-inf, 0}.
template <typename T> struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T> FASTMLP_HD SoftmaxStats<T> softmax_stats_empty() {
  SoftmaxStats<T> s;
  s.max = -INFINITY;
  s.sum = T(0);
  return s;
}

// `s` rescaled to the larger max m (a zero sum stays 0, also when its max is -inf).
template <typename T> FASTMLP_HD T softmax_rescaled(T sum, T max, T m) {
  return sum == T(0) ? T(0) : sum * m_exp(max - m);
}

// Adds one logit (online softmax). A -inf logit adds nothing; +inf or NaN makes
// the sum NaN, as torch's log_softmax does.
template <typename T> FASTMLP_HD SoftmaxStats<T> softmax_stats_push(SoftmaxStats<T> s, T x) {
  const T m = nan_max(s.max, x);
  SoftmaxStats<T> r;
  r.max = m;
  r.sum = softmax_rescaled(s.sum, s.max, m) + (x == -INFINITY ? T(0) : m_exp(x - m));
  return r;
}

template <typename T> FASTMLP_HD SoftmaxStats<T> softmax_stats_merge(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  const T m = nan_max(a.max, b.max);
  SoftmaxStats<T> r;
  r.max = m;
  r.sum = softmax_rescaled(a.sum, a.max, m) + softmax_rescaled(b.sum, b.max, m);
  return r;
}

// log(sum_c exp(x_c)) from the statistics (-inf - -inf = NaN downstream for a
// row of -inf, as torch).
template <typename T> FASTMLP_HD T softmax_lse(SoftmaxStats<T> s) { return s.max + loss_log(s.sum); }

// The constants of one cross-entropy call, in the accumulation type.
template <typename T> struct CeConstants {
  T smoothing = T(0);       // label_smoothing (eps)
  T smooth_per_class = T(0);  // eps / C
  T weight_sum = T(0);      // sum_c w_c (C without weights)
};

template <typename T> FASTMLP_HD CeConstants<T> ce_constants(T smoothing, int64_t classes, T weight_sum) {
  CeConstants<T> k;
  k.smoothing = smoothing;
  k.smooth_per_class = smoothing / static_cast<T>(classes);
  k.weight_sum = weight_sum;
  return k;
}

// Index target t with class weight w_t (not ignored): q_c of class c with weight w_c.
template <typename T> FASTMLP_HD T ce_index_q(const CeConstants<T>& k, bool is_target, T w_target, T w_c) {
  return (is_target ? (T(1) - k.smoothing) * w_target : T(0)) + k.smooth_per_class * w_c;
}

// Index target: whether class c enters the loss sum (every class with smoothing,
// only the target without: torch's NLL does not read the other log-probabilities).
template <typename T> FASTMLP_HD bool ce_index_term_used(const CeConstants<T>& k, bool is_target) {
  return is_target || k.smoothing > T(0);
}

// Index target: Q = sum_c q_c.
template <typename T> FASTMLP_HD T ce_index_qsum(const CeConstants<T>& k, T w_target) {
  return (T(1) - k.smoothing) * w_target + k.smooth_per_class * k.weight_sum;
}

// Probability target y_c of class c with weight w_c: q_c.
template <typename T> FASTMLP_HD T ce_prob_q(const CeConstants<T>& k, T y_c, T w_c) {
  return k.smoothing > T(0) ? w_c * ((T(1) - k.smoothing) * y_c + k.smooth_per_class) : w_c * y_c;
}

// One class's loss term q_c * (lse - x_c) and gradient Q * p_c - q_c (times scale).
template <typename T> FASTMLP_HD T ce_loss_term(T q, T lse, T x) { return q * (lse - x); }
template <typename T> FASTMLP_HD T ce_grad_term(T q, T qsum, T lse, T x, T scale) {
  return (qsum * m_exp(x - lse) - q) * scale;
}

// A whole row (stride 1) with a class index target, scalar code: returns the
// loss and, when grad != nullptr, writes d loss / d x times `scale`. `weight` is
// the class weights or nullptr. The caller handles ignored rows and checks t.
template <typename acc, typename scalar_t>
FASTMLP_HD acc ce_index_row(const scalar_t* x, int64_t classes, int64_t t, const scalar_t* weight,
                            const CeConstants<acc>& k, acc scale, scalar_t* grad) {
  SoftmaxStats<acc> s = softmax_stats_empty<acc>();
  for (int64_t c = 0; c < classes; ++c) s = softmax_stats_push(s, static_cast<acc>(x[c]));
  const acc lse = softmax_lse(s);
  const acc w_t = weight ? static_cast<acc>(weight[t]) : acc(1);
  const acc qsum = ce_index_qsum(k, w_t);
  acc loss = acc(0);
  for (int64_t c = 0; c < classes; ++c) {
    const acc xc = static_cast<acc>(x[c]);
    const acc q = ce_index_q(k, c == t, w_t, weight ? static_cast<acc>(weight[c]) : acc(1));
    if (ce_index_term_used(k, c == t)) loss += ce_loss_term(q, lse, xc);
    if (grad) grad[c] = static_cast<scalar_t>(ce_grad_term(q, qsum, lse, xc, scale));
  }
  return loss;
}

// A whole row with probability targets y (stride 1); as ce_index_row.
template <typename acc, typename scalar_t>
FASTMLP_HD acc ce_prob_row(const scalar_t* x, int64_t classes, const scalar_t* y, const scalar_t* weight,
                           const CeConstants<acc>& k, acc scale, scalar_t* grad) {
  SoftmaxStats<acc> s = softmax_stats_empty<acc>();
  acc qsum = acc(0);
  for (int64_t c = 0; c < classes; ++c) {
    s = softmax_stats_push(s, static_cast<acc>(x[c]));
    qsum += ce_prob_q(k, static_cast<acc>(y[c]), weight ? static_cast<acc>(weight[c]) : acc(1));
  }
  const acc lse = softmax_lse(s);
  acc loss = acc(0);
  for (int64_t c = 0; c < classes; ++c) {
    const acc xc = static_cast<acc>(x[c]);
    const acc q = ce_prob_q(k, static_cast<acc>(y[c]), weight ? static_cast<acc>(weight[c]) : acc(1));
    loss += ce_loss_term(q, lse, xc);
    if (grad) grad[c] = static_cast<scalar_t>(ce_grad_term(q, qsum, lse, xc, scale));
  }
  return loss;
}

}  // namespace fastmlp
