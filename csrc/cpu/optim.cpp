// Registers the CPU kernels of fastmlp::optimizer_step (cpu/optim_kernels.h)
// and the training step / epoch ops built on them (common/train_ops.h).
#include <torch/library.h>

#include "common/train_ops.h"
#include "cpu/optim_kernels.h"

static_assert(fastmlp::has_fused_step<fastmlp::cpu::CpuOptimKernels>,
              "the CPU step runs its update inside the gradient reduction (cpu/train_step.h)");

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { FASTMLP_REGISTER_TRAIN_OPS(m, fastmlp::cpu::CpuOptimKernels); }
