// Registers the CPU kernels of the Linear(+ReLU) ops: fastmlp::linear_act,
// linear_act_backward, mlp_forward and mlp_backward.
#include <torch/library.h>

#include "common/layer_ops.h"
#include "cpu/layer_backend.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_LAYER_OPS(m, fastmlp::cpu::CpuKernels); }
