// Registers the CPU kernels of fastmlp::optimizer_step (cpu/optim_kernels.h)
// and the training step / epoch ops built on them (common/train_ops.h).
#include <torch/library.h>

#include "common/train_ops.h"
#include "cpu/optim_kernels.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_TRAIN_OPS(m, fastmlp::cpu::CpuOptimKernels); }
