// Registers the CUDA kernel of fastmlp::mlp_bce_step (the whole training step's math).
#include <torch/library.h>

#include "common/mlp_bce_ops.h"
#include "cuda/bce_backend.cuh"
#include "cuda/layer_backend.cuh"

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("mlp_bce_step", &fastmlp::MlpBceOps<fastmlp::cuda::CudaKernels, fastmlp::cuda::CudaBceKernels>::step);
}
