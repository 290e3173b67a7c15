// Registers the CUDA kernels of the Linear(+ReLU) ops.
#include <torch/library.h>

#include "cuda/layer_backend.cuh"

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) { FASTMLP_REGISTER_LAYER_OPS(m, fastmlp::cuda::CudaKernels); }
