// Registers the CPU kernel of fastmlp::mlp_bce_step (the whole training step's math).
#include <torch/library.h>

#include "common/mlp_bce_ops.h"
#include "cpu/bce_backend.h"
#include "cpu/layer_backend.h"

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_bce_step", &fastmlp::MlpBceOps<fastmlp::cpu::CpuKernels, fastmlp::cpu::CpuBceKernels>::step);
}
