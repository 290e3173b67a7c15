// CPU building blocks shared by the per-layer op (linear_act.cpp) and the
// whole-chain op (mlp.cpp): the fused bias+ReLU epilogue after a BLAS GEMM, and
// one layer's backward with the ReLU mask and bias gradient fused in one pass.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <vector>

#include "common/autotune.h"
#include "common/math.h"
#include "cpu/narrow_gemm.h"

namespace fastmlp::cpu {

// Rows per chunk of the bias-gradient reduction. Fixed (not derived from the
// thread count) so the summation order, hence the result, never changes.
constexpr int64_t kReduceChunkRows = 256;

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// out[b, n] = act(out[b, n] + bias[n]) in place, one pass over out.
inline void bias_act_(at::Tensor& out, const c10::optional<at::Tensor>& bias, bool relu) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (!has_bias && !relu) return;
  const int64_t rows = out.size(0), cols = out.size(1);
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastmlp_bias_act", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = o + r * cols;
        if (bp && relu) {
          for (int64_t c = 0; c < cols; ++c) row[c] = fastmlp::relu<scalar_t>(row[c] + bp[c]);
        } else if (bp) {
          for (int64_t c = 0; c < cols; ++c) row[c] = row[c] + bp[c];
        } else {
          for (int64_t c = 0; c < cols; ++c) row[c] = fastmlp::relu<scalar_t>(row[c]);
        }
      }
    });
  });
}

// y = act(x @ w.T + b) written into `out` ([B, N], contiguous).
inline void linear_act_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias, bool relu) {
  const bool has_bias = bias.has_value() && bias->defined();
  const auto blas = [&] {
    at::mm_out(out, x, w.t());
    bias_act_(out, bias, relu);
  };
  if (!narrow_eligible(x, w.size(0), kNarrowForwardMax)) return blas();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const auto narrow = [&] {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmlp_narrow_forward", [&] {
      narrow_forward<scalar_t>(x, w, has_bias ? b.const_data_ptr<scalar_t>() : nullptr, relu, out);
    });
  };
  // The narrow kernels unless a first-use timing found BLAS faster (common/autotune.h).
  Autotuner::instance().run([&] { return autotune_key("cpu_linear_act", {x.size(0), x.size(1), w.size(0)}, x); },
                            0, narrow, blas);
}

// One row of mask_and_colsum, one loop per case so each vectorises: m = g
// masked by the ReLU output y (kMask), written (kWrite), summed into acc (kSum).
template <typename scalar_t, typename opmath_t, bool kMask, bool kWrite, bool kSum>
inline void mask_row(const scalar_t* g, const scalar_t* y, scalar_t* m, opmath_t* acc, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    scalar_t v = g[c];
    if constexpr (kMask) v = fastmlp::relu_passes(y[c]) ? v : scalar_t(0);
    if constexpr (kWrite) m[c] = v;
    if constexpr (kSum) acc[c] += static_cast<opmath_t>(v);
  }
}

// One pass over grad_output: the ReLU-masked gradient and its column sums (the
// bias gradient), reduced deterministically in fixed row chunks. Returns
// (masked gradient, or grad_output itself when there is no mask to apply;
// column sums or undefined).
inline std::tuple<at::Tensor, at::Tensor> mask_and_colsum(const at::Tensor& grad_output, const at::Tensor& output,
                                                          bool relu, bool want_masked, bool want_colsum) {
  at::Tensor g = grad_output.contiguous();
  const bool write = want_masked && relu;
  if (!write && !want_colsum) return {g, at::Tensor()};
  const int64_t rows = g.size(0), cols = g.size(1);
  at::Tensor masked = write ? at::empty_like(g) : g;
  at::Tensor colsum = want_colsum ? at::empty({cols}, g.options()) : at::Tensor();
  at::Tensor out = relu ? output.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fastmlp_mask_colsum", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = write ? masked.data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = (rows + kReduceChunkRows - 1) / kReduceChunkRows;
    std::vector<opmath_t> partial(want_colsum ? chunks * cols : 0, opmath_t(0));
    opmath_t* pp = want_colsum ? partial.data() : nullptr;
    const int64_t grain = std::max<int64_t>(1, row_grain(cols) / kReduceChunkRows);
    at::parallel_for(0, chunks, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        opmath_t* acc = pp ? pp + chunk * cols : nullptr;
        const int64_t r_end = std::min(rows, (chunk + 1) * kReduceChunkRows);
        for (int64_t r = chunk * kReduceChunkRows; r < r_end; ++r) {
          const scalar_t* yrow = yp ? yp + r * cols : nullptr;
          scalar_t* mrow = mp ? mp + r * cols : nullptr;
          if (yrow && mrow && acc) {
            mask_row<scalar_t, opmath_t, true, true, true>(gp + r * cols, yrow, mrow, acc, cols);
          } else if (yrow && mrow) {
            mask_row<scalar_t, opmath_t, true, true, false>(gp + r * cols, yrow, mrow, acc, cols);
          } else if (yrow) {
            mask_row<scalar_t, opmath_t, true, false, true>(gp + r * cols, yrow, mrow, acc, cols);
          } else {
            mask_row<scalar_t, opmath_t, false, false, true>(gp + r * cols, yrow, mrow, acc, cols);
          }
        }
      }
    });
    if (want_colsum) {
      scalar_t* cs = colsum.data_ptr<scalar_t>();
      for (int64_t c = 0; c < cols; ++c) {
        opmath_t sum = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += pp[chunk * cols + c];
        cs[c] = static_cast<scalar_t>(sum);
      }
    }
  });
  return {masked, colsum};
}

// Backward of one layer y = act(x @ w.T + b). Returns (grad_x, grad_w, grad_b);
// gradients not wanted are undefined tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_backward(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& w, const at::Tensor& output,
    bool relu, bool want_input, bool want_weight, bool want_bias) {
  const int64_t n = w.size(0);
  auto [g, grad_b] = mask_and_colsum(grad_output, output, relu, want_input || want_weight, want_bias);
  at::Tensor grad_x = want_input ? at::mm(g, w) : at::Tensor();
  at::Tensor grad_w;
  if (want_weight && narrow_eligible(x, n)) {
    grad_w = at::empty({n, x.size(1)}, x.options());
    const auto narrow = [&] {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmlp_narrow_weight_grad",
                                 [&] { narrow_weight_grad<scalar_t>(x, g, grad_w); });
    };
    const auto blas = [&] { at::mm_out(grad_w, g.t(), x); };
    Autotuner::instance().run([&] { return autotune_key("cpu_weight_grad", {x.size(0), x.size(1), n}, x); }, 0, narrow,
                              blas);
  } else if (want_weight) {
    grad_w = at::mm(g.t(), x);
  }
  return {grad_x, grad_w, grad_b};
}

// The CPU backend of LayerOps (see common/layer_ops.h).
struct CpuKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  static void linear_act_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias, bool relu) {
    cpu::linear_act_into(out, x, w, bias, relu);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_backward(
      const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, bool relu,
      bool want_x, bool want_w, bool want_b) {
    return cpu::layer_backward(g, x, w, y, relu, want_x, want_w, want_b);
  }
};

}  // namespace fastmlp::cpu
