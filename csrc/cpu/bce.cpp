// Registers the CPU kernels of fastmlp::bce_with_logits and its backward.
#include <torch/library.h>

#include "cpu/bce_backend.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_BCE_OPS(m, fastmlp::cpu::CpuBceKernels); }
