// CUDA backends of the MSE and cross-entropy ops (kernels in mse.cuh and
// cross_entropy.cuh): every launch on the current stream under the caller's
// device guard (MseOps / CrossEntropyOps hold it), checked by launch_kernel.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/cross_entropy_ops.h"
#include "common/mse_ops.h"
#include "cuda/loss_params.h"

namespace fastmlp::cuda {

struct CudaMseKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void forward(const at::Tensor& x, const at::Tensor& y, int64_t reduction, at::Tensor& loss,
                      at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_mse_cuda", [&] {
      using acc = acc_t<scalar_t>;
      MseParams<scalar_t> p = mse_params_of<scalar_t>(x, y, reduction);
      p.loss = loss.data_ptr<scalar_t>();
      p.grad_input = loss_ptr_or_null<scalar_t>(grad);
      at::Tensor workspace =
          at::empty({mse_workspace_elems(p.n)}, x.options().dtype(c10::CppTypeToScalarType<acc>::value));
      launch_mse_forward(p, workspace.data_ptr<acc>(), at::cuda::getCurrentCUDAStream());
    });
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, int64_t reduction,
                       at::Tensor& grad_input, at::Tensor& grad_target) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_mse_bwd_cuda", [&] {
      MseParams<scalar_t> p = mse_params_of<scalar_t>(x, y, reduction);
      p.grad_output = grad_loss.const_data_ptr<scalar_t>();
      p.grad_input = loss_ptr_or_null<scalar_t>(grad_input);
      p.grad_target = loss_ptr_or_null<scalar_t>(grad_target);
      launch_mse_backward(p, at::cuda::getCurrentCUDAStream());
    });
  }
};

struct CudaCrossEntropyKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void forward(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t reduction,
                      int64_t ignore_index, double smoothing, at::Tensor& loss, at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_ce_cuda", [&] {
      using acc = acc_t<scalar_t>;
      CeParams<scalar_t> p = ce_params_of<scalar_t>(x, target, weight, reduction, ignore_index, smoothing);
      p.loss = loss.data_ptr<scalar_t>();
      p.grad_input = loss_ptr_or_null<scalar_t>(grad);
      at::Tensor workspace = at::empty({ce_workspace_elems(p.rows, p.classes)},
                                       x.options().dtype(c10::CppTypeToScalarType<acc>::value));
      launch_cross_entropy(p, workspace.data_ptr<acc>(), at::cuda::getCurrentCUDAStream());
    });
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& weight, int64_t reduction, int64_t ignore_index, double smoothing,
                       at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmlp_ce_bwd_cuda", [&] {
      using acc = acc_t<scalar_t>;
      CeParams<scalar_t> p = ce_params_of<scalar_t>(x, target, weight, reduction, ignore_index, smoothing);
      p.grad_output = grad_loss.const_data_ptr<scalar_t>();
      p.grad_input = grad_input.data_ptr<scalar_t>();
      at::Tensor workspace = at::empty({ce_workspace_elems(p.rows, p.classes)},
                                       x.options().dtype(c10::CppTypeToScalarType<acc>::value));
      launch_cross_entropy(p, workspace.data_ptr<acc>(), at::cuda::getCurrentCUDAStream());
    });
  }
};

}  // namespace fastmlp::cuda
