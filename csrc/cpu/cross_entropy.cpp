// Registers the CPU kernels of fastmlp::cross_entropy_forward and its backward.
#include <torch/library.h>

#include "cpu/cross_entropy_backend.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_CROSS_ENTROPY_OPS(m, fastmlp::cpu::CpuCrossEntropyKernels); }
