// CPU kernels of the mean squared error: the loss and, for a reduced loss,
// d loss / d input in the same pass; an elementwise backward that also gives the
// target gradient.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/loss_math.h"
#include "common/mse_ops.h"
#include "cpu/simd.h"  // FASTMLP_CPU_CLONES
#include "cpu/vec_math.h"

namespace fastmlp::cpu {

// Elements per chunk of the loss reduction: fixed, so the summation order does
// not depend on the thread count (a multiple of every vector width).
constexpr int64_t kMseChunk = 1024;

// The squared errors of elements [begin, end), a vector at a time, the tail in
// scalar code. Writes the per-element loss (loss_out) and/or the scaled input
// gradient (grad_out) when given; returns the sum, lanes added in a fixed order.
template <typename T>
FASTMLP_ALWAYS_INLINE double mse_forward_lanes(const T* x, const T* y, T* loss_out, T* grad_out, T grad_scale,
                                               int64_t begin, int64_t end) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int kLanes = Lanes<T>::count;
  V acc = splat(T(0));
  int64_t i = begin;
  const T two_scale = T(2) * grad_scale;
  for (; i + kLanes <= end; i += kLanes) {
    const V d = load(x + i) - load(y + i);
    const V loss = d * d;
    acc += loss;
    if (loss_out) store(loss_out + i, loss);
    if (grad_out) store(grad_out + i, d * two_scale);
  }
  double sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += acc[lane];
  for (; i < end; ++i) {
    const auto t = mse_terms<T>(x[i], y[i]);
    if (loss_out) loss_out[i] = t.loss;
    if (grad_out) grad_out[i] = t.grad_input * grad_scale;
    sum += t.loss;
  }
  return sum;
}

// d loss / d input (gi) and / or d loss / d target (gt) of elements [begin, end)
// times the incoming gradient (go[i], or go[0] for a reduced loss) and `scale`.
template <typename T>
FASTMLP_ALWAYS_INLINE void mse_backward_lanes(const T* x, const T* y, const T* go, bool reduced, T* gi, T* gt,
                                              T scale, int64_t begin, int64_t end) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int kLanes = Lanes<T>::count;
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const V d = load(x + i) - load(y + i);
    const V g = reduced ? splat(go[0]) : load(go + i);
    const V grad = d * T(2) * (g * scale);
    if (gi) store(gi + i, grad);
    if (gt) store(gt + i, -grad);
  }
  for (; i < end; ++i) {
    const T grad = mse_terms<T>(x[i], y[i]).grad_input * (go[reduced ? 0 : i] * scale);
    if (gi) gi[i] = grad;
    if (gt) gt[i] = -grad;
  }
}

// The entry points, compiled once per ISA (FASTMLP_CPU_CLONES).
FASTMLP_CPU_CLONES inline double mse_forward_vec(const float* x, const float* y, float* loss_out, float* grad_out,
                                                 float grad_scale, int64_t begin, int64_t end) {
  return mse_forward_lanes(x, y, loss_out, grad_out, grad_scale, begin, end);
}
FASTMLP_CPU_CLONES inline double mse_forward_vec(const double* x, const double* y, double* loss_out,
                                                 double* grad_out, double grad_scale, int64_t begin, int64_t end) {
  return mse_forward_lanes(x, y, loss_out, grad_out, grad_scale, begin, end);
}
FASTMLP_CPU_CLONES inline void mse_backward_vec(const float* x, const float* y, const float* go, bool reduced,
                                                float* gi, float* gt, float scale, int64_t begin, int64_t end) {
  mse_backward_lanes(x, y, go, reduced, gi, gt, scale, begin, end);
}
FASTMLP_CPU_CLONES inline void mse_backward_vec(const double* x, const double* y, const double* go, bool reduced,
                                                double* gi, double* gt, double scale, int64_t begin, int64_t end) {
  mse_backward_lanes(x, y, go, reduced, gi, gt, scale, begin, end);
}

template <typename scalar_t> inline scalar_t* mse_ptr(at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// The CPU backend of MseOps (see common/mse_ops.h).
struct CpuMseKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void forward(const at::Tensor& x, const at::Tensor& y, int64_t reduction, at::Tensor& loss,
                      at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_mse_cpu",
                                    [&] { forward_typed<scalar_t>(x, y, reduction, loss, grad); });
  }

  template <typename scalar_t>
  static void forward_typed(const at::Tensor& x, const at::Tensor& y, int64_t reduction, at::Tensor& loss,
                            at::Tensor& grad) {
    const int64_t n = x.numel();
    const bool reduced = reduction != 0;
    {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* lp = reduced ? nullptr : loss.data_ptr<scalar_t>();
      scalar_t* gp = mse_ptr<scalar_t>(grad);
      const opmath_t scale = reduction == 1 ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
      const int64_t chunks = (n + kMseChunk - 1) / kMseChunk;
      std::vector<double> partial(chunks, 0.0);
      // well under 1 ns an element: a second thread pays off from ~32 chunks
      at::parallel_for(0, chunks, 32, [&](int64_t cb, int64_t ce) {
        for (int64_t chunk = cb; chunk < ce; ++chunk) {
          const int64_t begin = chunk * kMseChunk, end = std::min(n, begin + kMseChunk);
          if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
            partial[chunk] = mse_forward_vec(xp, yp, lp, gp, scale, begin, end);
          } else {
            double acc = 0;  // half types: float math, a double sum as for float
            for (int64_t i = begin; i < end; ++i) {
              const auto t = mse_terms<opmath_t>(xp[i], yp[i]);
              if (lp) lp[i] = static_cast<scalar_t>(t.loss);
              if (gp) gp[i] = static_cast<scalar_t>(t.grad_input * scale);
              acc += t.loss;
            }
            partial[chunk] = acc;
          }
        }
      });
      if (reduced) {
        double total = 0;
        for (double p : partial) total += p;
        if (reduction == 1) total /= static_cast<double>(n);  // NaN for an empty input, as torch
        *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total);  // a fresh 0-D CPU tensor
      }
    }
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, int64_t reduction,
                       at::Tensor& grad_input, at::Tensor& grad_target) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_mse_bwd_cpu", [&] {
      backward_typed<scalar_t>(grad_loss, x, y, reduction, grad_input, grad_target);
    });
  }

  template <typename scalar_t>
  static void backward_typed(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                             int64_t reduction, at::Tensor& grad_input, at::Tensor& grad_target) {
    const int64_t n = x.numel();
    const bool reduced = reduction != 0;
    {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* gop = grad_loss.const_data_ptr<scalar_t>();
      scalar_t* gip = mse_ptr<scalar_t>(grad_input);
      scalar_t* gtp = mse_ptr<scalar_t>(grad_target);
      const opmath_t mean_scale = reduction == 1 ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
      // Whole chunks per task: which elements take the scalar tail must not
      // depend on the thread count.
      const int64_t chunks = (n + kMseChunk - 1) / kMseChunk;
      at::parallel_for(0, chunks, 32, [&](int64_t cb, int64_t ce) {
        const int64_t begin = cb * kMseChunk, end = std::min(n, ce * kMseChunk);
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
          mse_backward_vec(xp, yp, gop, reduced, gip, gtp, mean_scale, begin, end);
        } else {
          for (int64_t i = begin; i < end; ++i) {
            const opmath_t g = mse_terms<opmath_t>(xp[i], yp[i]).grad_input *
                               (static_cast<opmath_t>(gop[reduced ? 0 : i]) * mean_scale);
            if (gip) gip[i] = static_cast<scalar_t>(g);
            if (gtp) gtp[i] = static_cast<scalar_t>(-g);
          }
        }
      });
    }
  }
};

}  // namespace fastmlp::cpu
