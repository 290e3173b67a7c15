// CPU kernels of binary cross-entropy with logits: the loss and, for a reduced
// loss, d loss / d input in the same pass; an elementwise backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/math.h"

namespace fastmlp::cpu {
namespace {

// Elements per chunk of the loss reduction: fixed, so the summation order does
// not depend on the thread count.
constexpr int64_t kChunk = 4096;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// A weight / pos_weight pattern: P values repeating along the flattened input.
template <typename scalar_t> struct Pattern {
  const scalar_t* data = nullptr;
  int64_t period = 1;
  scalar_t fallback;
  scalar_t operator()(int64_t i) const { return data ? data[i % period] : fallback; }
};

template <typename scalar_t>
Pattern<scalar_t> pattern_of(const at::Tensor& t, scalar_t fallback) {
  Pattern<scalar_t> p;
  p.fallback = fallback;
  if (t.defined()) {
    p.data = t.const_data_ptr<scalar_t>();
    p.period = t.numel();
  }
  return p;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits(const at::Tensor& input, const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& weight,
                                                   const c10::optional<at::Tensor>& pos_weight,
                                                   int64_t reduction, bool input_grad) {
  check_bce_args(input, target, weight, pos_weight, reduction);
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight), pw = contiguous_or_undefined(pos_weight);
  const int64_t n = x.numel();
  const bool reduced = reduction != kNone;
  const bool want_grad = reduced && input_grad;
  at::Tensor loss = reduced ? at::empty({}, x.options()) : at::empty_like(x);
  at::Tensor grad = want_grad ? at::empty_like(x) : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_bce_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const auto wt = pattern_of<scalar_t>(w, scalar_t(1));
    const auto pwt = pattern_of<scalar_t>(pw, scalar_t(1));
    scalar_t* lp = reduced ? nullptr : loss.data_ptr<scalar_t>();
    scalar_t* gp = want_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const opmath_t scale = reduction == kMean ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(reduced ? chunks : 0, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        opmath_t acc = 0;
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; ++i) {
          const auto t = bce_terms<opmath_t>(xp[i], yp[i], wt(i), pwt(i));
          if (lp) lp[i] = static_cast<scalar_t>(t.loss);
          if (gp) gp[i] = static_cast<scalar_t>(t.grad_input * scale);
          acc += t.loss;
        }
        if (reduced) partial[chunk] = acc;
      }
    });
    if (reduced) {
      double total = 0;
      for (double p : partial) total += p;
      if (reduction == kMean) total /= static_cast<double>(n);
      loss.fill_(static_cast<scalar_t>(total));
    }
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
    int64_t reduction, std::array<bool, 2> output_mask) {
  check_bce_args(input, target, weight, pos_weight, reduction);
  check_same(grad_output, input, "grad_output", "input");
  const bool reduced = reduction != kNone;
  TORCH_CHECK(reduced ? grad_output.numel() == 1 : grad_output.sizes() == input.sizes(),
              "fastmlp.bce_with_logits_backward: grad_output of shape ", grad_output.sizes(),
              " does not match the loss");
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight), pw = contiguous_or_undefined(pos_weight);
  const at::Tensor go = grad_output.contiguous();
  const int64_t n = x.numel();
  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_target = output_mask[1] ? at::empty_like(x) : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_bce_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const auto wt = pattern_of<scalar_t>(w, scalar_t(1));
    const auto pwt = pattern_of<scalar_t>(pw, scalar_t(1));
    scalar_t* gip = output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = output_mask[1] ? grad_target.data_ptr<scalar_t>() : nullptr;
    const opmath_t mean_scale = reduction == kMean ? opmath_t(1) / static_cast<opmath_t>(n) : opmath_t(1);
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const opmath_t scale = static_cast<opmath_t>(gop[reduced ? 0 : i]) * mean_scale;
        if (gip) gip[i] = static_cast<scalar_t>(bce_terms<opmath_t>(xp[i], yp[i], wt(i), pwt(i)).grad_input * scale);
        if (gtp) gtp[i] = static_cast<scalar_t>(bce_grad_target<opmath_t>(xp[i], wt(i), pwt(i)) * scale);
      }
    });
  });
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("bce_with_logits", &bce_with_logits);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
}

}  // namespace fastmlp::cpu
