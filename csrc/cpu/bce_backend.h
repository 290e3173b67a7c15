// CPU kernels of binary cross-entropy with logits: the loss and, for a reduced
// loss, d loss / d input in the same pass; an elementwise backward.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/bce_ops.h"
#include "common/math.h"
#include "cpu/simd.h"  // FASTMLP_CPU_CLONES
#include "cpu/vec_math.h"

namespace fastmlp::cpu {

// Elements per chunk of the loss reduction: fixed, so the summation order does
// not depend on the thread count.
constexpr int64_t kBceChunk = 1024;

// A weight / pos_weight pattern: `period` values repeating along the input.
template <typename scalar_t> struct BcePattern {
  const scalar_t* data = nullptr;
  int64_t period = 1;
  explicit BcePattern(const at::Tensor& t) {
    if (t.defined()) {
      data = t.const_data_ptr<scalar_t>();
      period = t.numel();
    }
  }
  at::opmath_type<scalar_t> operator()(int64_t i) const {
    return data ? static_cast<at::opmath_type<scalar_t>>(data[period == 1 ? 0 : i % period])
                : at::opmath_type<scalar_t>(1);
  }
};

template <typename scalar_t> inline scalar_t* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// A weight / pos_weight pattern read a vector (vec::Lanes<T>) at a time:
// `ext` holds the pattern followed by its first kLanes values again, so the
// values from any offset are contiguous; the offset walks the pattern as the
// input advances.
template <typename T> struct VecPattern {
  static constexpr int kLanes = vec::Lanes<T>::count;
  const T* ext = nullptr;  // nullptr: all ones
  int64_t period = 1;

  int64_t offset(int64_t i) const { return ext ? i % period : 0; }
  int64_t advance(int64_t o) const {
    if (!ext) return 0;
    o += kLanes;
    return o < period ? o : o % period;
  }
  typename vec::Lanes<T>::vec at(int64_t o) const { return ext ? vec::load(ext + o) : vec::splat(T(1)); }
  T scalar(int64_t i) const { return ext ? ext[i % period] : T(1); }
};

// `t`'s pattern extended for VecPattern (held by `storage`).
template <typename T> VecPattern<T> vec_pattern(const at::Tensor& t, std::vector<T>& storage) {
  VecPattern<T> p;
  if (!t.defined()) return p;
  const T* data = t.const_data_ptr<T>();
  p.period = t.numel();
  storage.resize(p.period + VecPattern<T>::kLanes);
  for (int64_t j = 0; j < p.period + VecPattern<T>::kLanes; ++j) storage[j] = data[j % p.period];
  p.ext = storage.data();
  return p;
}

// The loss terms of elements [begin, end), a vector at a time (vec_math.h),
// the tail in scalar code. Writes the per-element loss (loss_out) and/or the
// scaled input gradient (grad_out) when given; returns the sum of the loss
// terms, lanes added in a fixed order.
template <typename T>
FASTMLP_ALWAYS_INLINE double bce_forward_lanes(const T* x, const T* y, const VecPattern<T>& w, const VecPattern<T>& pw,
                                               T* loss_out, T* grad_out, T grad_scale, int64_t begin, int64_t end) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int kLanes = Lanes<T>::count;
  V acc = splat(T(0));
  int64_t i = begin;
  int64_t wo = w.offset(begin), pwo = pw.offset(begin);
  for (; i + kLanes <= end; i += kLanes, wo = w.advance(wo), pwo = pw.advance(pwo)) {
    const V xv = load(x + i), yv = load(y + i);
    const V wv = w.at(wo), pwv = pw.at(pwo);
    const V ax = select(xv < T(0), -xv, xv);
    const V e = exp_nonpositive(-ax);
    const V sp = select(xv < T(0), -xv, splat(T(0))) + log1p_unit(e);  // softplus(-x)
    const V lw = (pwv - T(1)) * yv + T(1);
    const V loss = wv * ((T(1) - yv) * xv + lw * sp);
    acc += loss;
    if (loss_out) store(loss_out + i, loss);
    if (grad_out) {
      const V sig_neg = select(xv >= T(0), e, splat(T(1))) / (e + T(1));  // sigmoid(-x)
      store(grad_out + i, wv * ((T(1) - yv) - lw * sig_neg) * grad_scale);
    }
  }
  double sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += acc[lane];
  for (; i < end; ++i) {
    const auto t = bce_terms<T>(x[i], y[i], w.scalar(i), pw.scalar(i));
    if (loss_out) loss_out[i] = t.loss;
    if (grad_out) grad_out[i] = t.grad_input * grad_scale;
    sum += t.loss;
  }
  return sum;
}

// d loss / d input of elements [begin, end) times the incoming gradient (go[i],
// or go[0] for a reduced loss) and `scale`, a vector at a time.
template <typename T>
FASTMLP_ALWAYS_INLINE void bce_backward_lanes(const T* x, const T* y, const T* go, bool reduced,
                                              const VecPattern<T>& w, const VecPattern<T>& pw, T* grad_out, T scale,
                                              int64_t begin, int64_t end) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int kLanes = Lanes<T>::count;
  int64_t i = begin;
  int64_t wo = w.offset(begin), pwo = pw.offset(begin);
  for (; i + kLanes <= end; i += kLanes, wo = w.advance(wo), pwo = pw.advance(pwo)) {
    const V xv = load(x + i), yv = load(y + i);
    const V ax = select(xv < T(0), -xv, xv);
    const V e = exp_nonpositive(-ax);
    const V sig_neg = select(xv >= T(0), e, splat(T(1))) / (e + T(1));  // sigmoid(-x)
    const V lw = (pw.at(pwo) - T(1)) * yv + T(1);
    const V g = reduced ? splat(go[0]) : load(go + i);
    store(grad_out + i, w.at(wo) * ((T(1) - yv) - lw * sig_neg) * (g * scale));
  }
  for (; i < end; ++i) {
    grad_out[i] = bce_terms<T>(x[i], y[i], w.scalar(i), pw.scalar(i)).grad_input * (go[reduced ? 0 : i] * scale);
  }
}

// The entry points, compiled once per ISA (FASTMLP_CPU_CLONES).
FASTMLP_CPU_CLONES inline double bce_forward_vec(const float* x, const float* y, const VecPattern<float>& w,
                                                 const VecPattern<float>& pw, float* loss_out, float* grad_out,
                                                 float grad_scale, int64_t begin, int64_t end) {
  return bce_forward_lanes(x, y, w, pw, loss_out, grad_out, grad_scale, begin, end);
}
FASTMLP_CPU_CLONES inline double bce_forward_vec(const double* x, const double* y, const VecPattern<double>& w,
                                                 const VecPattern<double>& pw, double* loss_out, double* grad_out,
                                                 double grad_scale, int64_t begin, int64_t end) {
  return bce_forward_lanes(x, y, w, pw, loss_out, grad_out, grad_scale, begin, end);
}
FASTMLP_CPU_CLONES inline void bce_backward_vec(const float* x, const float* y, const float* go, bool reduced,
                                                const VecPattern<float>& w, const VecPattern<float>& pw,
                                                float* grad_out, float scale, int64_t begin, int64_t end) {
  bce_backward_lanes(x, y, go, reduced, w, pw, grad_out, scale, begin, end);
}
FASTMLP_CPU_CLONES inline void bce_backward_vec(const double* x, const double* y, const double* go, bool reduced,
                                                const VecPattern<double>& w, const VecPattern<double>& pw,
                                                double* grad_out, double scale, int64_t begin, int64_t end) {
  bce_backward_lanes(x, y, go, reduced, w, pw, grad_out, scale, begin, end);
}

// The CPU backend of BceOps (see common/bce_ops.h).
struct CpuBceKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& pw,
                      int64_t reduction, at::Tensor& loss, at::Tensor& grad) {
    const int64_t n = x.numel();
    const bool reduced = reduction != kReductionNone;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_bce_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const BcePattern<scalar_t> wt(w), pwt(pw);
      scalar_t* lp = reduced ? nullptr : loss.data_ptr<scalar_t>();
      scalar_t* gp = ptr_or_null<scalar_t>(grad);
      const opmath_t scale = reduction == kReductionMean ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
      const int64_t chunks = (n + kBceChunk - 1) / kBceChunk;
      std::vector<double> partial(chunks, 0.0);
      // float / double: the vectorised loop (weight patterns copied once, extended for it).
      constexpr bool vectorised = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
      using lane_t = std::conditional_t<vectorised, scalar_t, float>;
      std::vector<lane_t> w_ext, pw_ext;
      VecPattern<lane_t> wv, pwv;
      if constexpr (vectorised) {
        wv = vec_pattern(w, w_ext);
        pwv = vec_pattern(pw, pw_ext);
      }
      // ~1 ns an element vectorised: below 16 chunks a second thread costs more than it saves.
      at::parallel_for(0, chunks, 16, [&](int64_t cb, int64_t ce) {
        for (int64_t chunk = cb; chunk < ce; ++chunk) {
          const int64_t end = std::min(n, (chunk + 1) * kBceChunk);
          if constexpr (vectorised) {  // lane_t is scalar_t: the casts are identities
            partial[chunk] = bce_forward_vec(reinterpret_cast<const lane_t*>(xp), reinterpret_cast<const lane_t*>(yp),
                                             wv, pwv, reinterpret_cast<lane_t*>(lp), reinterpret_cast<lane_t*>(gp),
                                             static_cast<lane_t>(scale), chunk * kBceChunk, end);
            continue;
          }
          double acc = 0;  // as torch's sum, closer than a float running sum
          for (int64_t i = chunk * kBceChunk; i < end; ++i) {
            const auto t = bce_terms<opmath_t>(xp[i], yp[i], wt(i), pwt(i));
            if (lp) lp[i] = static_cast<scalar_t>(t.loss);
            if (gp) gp[i] = static_cast<scalar_t>(t.grad_input * scale);
            acc += t.loss;
          }
          partial[chunk] = acc;
        }
      });
      if (reduced) {
        double total = 0;
        for (double p : partial) total += p;
        if (reduction == kReductionMean) total /= static_cast<double>(n);  // NaN for an empty input, as torch
        loss.fill_(static_cast<scalar_t>(total));
      }
    });
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                       const at::Tensor& pw, int64_t reduction, at::Tensor& grad_input, at::Tensor& grad_target) {
    const int64_t n = x.numel();
    const bool reduced = reduction != kReductionNone;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_bce_bwd_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* gop = grad_loss.const_data_ptr<scalar_t>();
      const BcePattern<scalar_t> wt(w), pwt(pw);
      scalar_t* gip = ptr_or_null<scalar_t>(grad_input);
      scalar_t* gtp = ptr_or_null<scalar_t>(grad_target);
      const opmath_t mean_scale =
          reduction == kReductionMean ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
      constexpr bool vectorised = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
      if constexpr (vectorised) {
        if (gtp == nullptr) {  // the input gradient alone: the vectorised loop
          using lane_t = std::conditional_t<vectorised, scalar_t, float>;  // scalar_t: the casts are identities
          std::vector<lane_t> w_ext, pw_ext;
          const VecPattern<lane_t> wv = vec_pattern(w, w_ext), pwv = vec_pattern(pw, pw_ext);
          // Whole chunks (multiples of the vector width): which elements take the
          // scalar tail must not depend on the thread count.
          const int64_t chunks = (n + kBceChunk - 1) / kBceChunk;
          at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
            bce_backward_vec(reinterpret_cast<const lane_t*>(xp), reinterpret_cast<const lane_t*>(yp),
                             reinterpret_cast<const lane_t*>(gop), reduced, wv, pwv, reinterpret_cast<lane_t*>(gip),
                             static_cast<lane_t>(mean_scale), cb * kBceChunk, std::min(n, ce * kBceChunk));
          });
          return;
        }
      }
      at::parallel_for(0, n, kBceChunk, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const opmath_t scale = static_cast<opmath_t>(gop[reduced ? 0 : i]) * mean_scale;
          if (gip) gip[i] = static_cast<scalar_t>(bce_terms<opmath_t>(xp[i], yp[i], wt(i), pwt(i)).grad_input * scale);
          if (gtp) gtp[i] = static_cast<scalar_t>(bce_grad_target<opmath_t>(xp[i], wt(i), pwt(i)) * scale);
        }
      });
    });
  }
};

}  // namespace fastmlp::cpu
