// Linear(+ReLU) layer kernels whose GEMMs are ATen's: at::addmm / at::mm, which
// run cuBLAS(Lt) on CUDA (the library eager itself uses: tensor cores for half
// and bf16, its tuned fp32 kernels for wide layers) and BLAS on CPU. The
// epilogues are ATen ops too: bias + ReLU as at::_addmm_activation (cuBLASLt's
// fused bias-ReLU epilogue on CUDA), the backward's ReLU mask as torch's own
// threshold_backward (the gradient passes where the output is not <= 0, NaN
// included: common/math.h's relu_passes), the bias gradient as a column sum
// (a fixed-order reduction, no atomics). Nothing here is device-specific, so
// the CPU tests run the very composition the CUDA backend runs for its wide
// layers (tests/emu: LayerOps over these kernels).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastmlp {

// out[B, N] = act(x[B, K] . w[N, K]^T + bias)
inline void aten_linear_act_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias, bool relu) {
  if (bias.has_value() && bias->defined()) {
    if (relu) {
      at::_addmm_activation_out(out, *bias, x, w.t(), 1, 1, /*use_gelu=*/false);
    } else {
      at::addmm_out(out, *bias, x, w.t());
    }
    return;
  }
  at::mm_out(out, x, w.t());
  if (relu) out.relu_();
}

// (dx, dw, db) of y = act(x . w^T + b) for d loss / d y = g; undefined where not wanted.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> aten_layer_backward(const at::Tensor& g, const at::Tensor& x,
                                                                          const at::Tensor& w, const at::Tensor& y,
                                                                          bool relu, bool want_x, bool want_w,
                                                                          bool want_b) {
  const at::Tensor gm = relu ? at::threshold_backward(g, y, 0) : g;
  return {want_x ? at::mm(gm, w) : at::Tensor(), want_w ? at::mm(gm.t(), x) : at::Tensor(),
          want_b ? gm.sum(0) : at::Tensor()};
}

}  // namespace fastmlp
