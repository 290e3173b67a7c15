// Registers the CUDA kernels of fastmlp::mse_forward / mse_backward and
// fastmlp::cross_entropy_forward / cross_entropy_backward.
#include <torch/library.h>

#include "cuda/loss_backend.cuh"

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  FASTMLP_REGISTER_MSE_OPS(m, fastmlp::cuda::CudaMseKernels);
  FASTMLP_REGISTER_CROSS_ENTROPY_OPS(m, fastmlp::cuda::CudaCrossEntropyKernels);
}
