// Registers the CPU kernels of fastmlp::mse_forward and its backward.
#include <torch/library.h>

#include "cpu/mse_backend.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_MSE_OPS(m, fastmlp::cpu::CpuMseKernels); }
