// CUDA backend of the BCE-with-logits ops (kernels in bce.cuh).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/bce_ops.h"
#include "cuda/kernel_params.h"

namespace fastmlp::cuda {

struct CudaBceKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& pw,
                      int64_t reduction, at::Tensor& loss, at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_bce_cuda", [&] {
      using acc = acc_t<scalar_t>;
      BceParams<scalar_t> p = bce_params_of<scalar_t>(x, y, w, pw, reduction);
      p.loss = loss.data_ptr<scalar_t>();
      p.grad_input = ptr_or_null<scalar_t>(grad);
      at::Tensor workspace =
          at::empty({bce_workspace_elems(p.n)}, x.options().dtype(c10::CppTypeToScalarType<acc>::value));
      launch_bce_forward(p, workspace.data_ptr<acc>(), at::cuda::getCurrentCUDAStream());
    });
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                       const at::Tensor& pw, int64_t reduction, at::Tensor& grad_input, at::Tensor& grad_target) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_bce_bwd_cuda", [&] {
      BceParams<scalar_t> p = bce_params_of<scalar_t>(x, y, w, pw, reduction);
      p.grad_output = grad_loss.const_data_ptr<scalar_t>();
      p.grad_input = ptr_or_null<scalar_t>(grad_input);
      p.grad_target = ptr_or_null<scalar_t>(grad_target);
      launch_bce_backward(p, at::cuda::getCurrentCUDAStream());
    });
  }
};

}  // namespace fastmlp::cuda
