// Registers the CUDA kernels of fastmlp::bce_with_logits and its backward.
#include <torch/library.h>

#include "cuda/bce_backend.cuh"

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) { FASTMLP_REGISTER_BCE_OPS(m, fastmlp::cuda::CudaBceKernels); }
