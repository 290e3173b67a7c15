// CUDA backend of the Linear(+ReLU) ops. A layer's GEMMs run on cuBLAS through
// ATen (common/aten_layers.h: the library eager uses, tensor cores for half /
// bf16) when gemm_on_cublas says so (gemm.cuh: half types, and float / double
// layers of at least kCublasMinMacs multiply-adds per GEMM); smaller float /
// double layers run the fused tiled kernel of gemm.cuh (bias + ReLU epilogue
// forward; ReLU mask and bias gradient fused into the backward GEMMs), one
// launch per GEMM where the ATen form takes two or three.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/aten_layers.h"
#include "common/layer_ops.h"
#include "cuda/kernel_params.h"

namespace fastmlp::cuda {

// Runs one GEMM: picks split-K for this device and allocates its workspace.
template <typename scalar_t> inline void run_gemm(GemmParams<scalar_t>& p, const at::Tensor& like) {
  choose_splits(p.M, p.N, p.K, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, &p.splits, &p.k_chunk);
  const int64_t ws_elems = gemm_workspace_elems(p);
  at::Tensor workspace;
  acc_t<scalar_t>* ws = nullptr;
  if (ws_elems > 0) {
    workspace = at::empty({ws_elems}, like.options().dtype(c10::CppTypeToScalarType<acc_t<scalar_t>>::value));
    ws = workspace.data_ptr<acc_t<scalar_t>>();
  }
  launch_gemm(p, ws, at::cuda::getCurrentCUDAStream());
}

// Whether the layer y[B, N] = x[B, K] . w[N, K]^T runs on cuBLAS: its three
// GEMMs (forward, input and weight gradients) all have B * N * K multiply-adds.
inline bool layer_on_cublas(const at::Tensor& x, const at::Tensor& w) {
  const bool half_type = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  return gemm_on_cublas(x.size(0), w.size(0), x.size(1), half_type);
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  // out[B, N] = act(x[B, K] . w[N, K]^T + bias)
  static void linear_act_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias, bool relu) {
    TORCH_CHECK(out.is_contiguous(), "fastmlp: internal error, output must be contiguous");
    if (layer_on_cublas(x, w)) return aten_linear_act_into(out, x, w, bias, relu);
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmlp_linear_act_cuda", [&] {
      GemmParams<scalar_t> p;
      p.M = x.size(0);
      p.N = w.size(0);
      p.K = x.size(1);
      p.a = strided<scalar_t>(x);
      p.b = strided<scalar_t>(w, /*transpose=*/true);
      p.bias = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      p.relu = relu;
      p.c = out.data_ptr<scalar_t>();
      run_gemm(p, x);
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_backward(const at::Tensor& g, const at::Tensor& x,
                                                                       const at::Tensor& w, const at::Tensor& y,
                                                                       bool relu, bool want_x, bool want_w,
                                                                       bool want_b) {
    if (layer_on_cublas(x, w)) return aten_layer_backward(g, x, w, y, relu, want_x, want_w, want_b);
    at::Tensor grad_x, grad_w, grad_b;
    const int64_t batch = x.size(0), in_features = w.size(1), out_features = w.size(0);
    if (want_x) grad_x = at::empty({batch, in_features}, x.options());
    if (want_w) grad_w = at::empty({out_features, in_features}, x.options());
    if (want_b) grad_b = at::empty({out_features}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmlp_layer_backward_cuda", [&] {
      if (want_x) {  // grad_x[B, K] = (g * mask)[B, N] . w[N, K]
        GemmParams<scalar_t> p;
        p.M = batch;
        p.N = in_features;
        p.K = out_features;
        p.a = strided<scalar_t>(g);
        if (relu) p.a_mask = strided<scalar_t>(y);
        p.b = strided<scalar_t>(w);
        p.c = grad_x.data_ptr<scalar_t>();
        run_gemm(p, x);
      }
      if (want_w || want_b) {  // grad_w[N, K] = (g * mask)^T . x, grad_b = its row sums
        GemmParams<scalar_t> p;
        p.M = out_features;
        p.N = want_w ? in_features : 0;
        p.K = batch;
        p.a = strided<scalar_t>(g, /*transpose=*/true);
        if (relu) p.a_mask = strided<scalar_t>(y, /*transpose=*/true);
        p.b = strided<scalar_t>(x);
        p.c = want_w ? grad_w.data_ptr<scalar_t>() : nullptr;
        p.a_rowsum = want_b ? grad_b.data_ptr<scalar_t>() : nullptr;
        run_gemm(p, x);
      }
    });
    return {grad_x, grad_w, grad_b};
  }
};

}  // namespace fastmlp::cuda
