// CUDA kernels of fastmlp::optimizer_step (cuda/optim.cuh), and the training
// step / epoch ops built on it (common/train_ops.h). A step is the backend's
// mlp_bce_step (the fused chain kernel and its gradient reduction for a narrow
// chain), then at most three launches for the update: the clipping norm's two
// (when clipping) and one for every parameter's update. Adam's step count is
// torch's CPU scalar, read on the host, or (capturable=True, fused=True) a
// tensor on the GPU that one more launch advances: no device synchronisation
// either way, and only the latter replays correctly in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/train_ops.h"
#include "cuda/optim.cuh"

namespace fastmlp::cuda {
namespace {

template <class Slot> SlotBatch<Slot> batch_of(const std::vector<Slot>& slots) {
  TORCH_CHECK(slots.size() <= static_cast<size_t>(kOptimMaxSlots), "fastmlp.optimizer_step: the CUDA kernel takes at most ",
              kOptimMaxSlots, " parameters per call, got ", slots.size());
  SlotBatch<Slot> b;
  for (const Slot& s : slots) add_slot(b, s);
  return b;
}

// Clipping (when asked) into a workspace of `like`'s device; returns the
// device pointer of the coefficient, or null.
template <typename T, class Slot>
const acc_t<T>* clip(const SlotBatch<Slot>& b, std::optional<double> max_grad_norm, const at::Tensor& like,
                     at::Tensor& workspace, cudaStream_t stream) {
  if (!max_grad_norm.has_value()) return nullptr;
  workspace = at::empty({clip_workspace_elems(b)}, like.options().dtype(c10::CppTypeToScalarType<acc_t<T>>::value));
  acc_t<T>* ws = workspace.data_ptr<acc_t<T>>();
  launch_clip_coef<T>(b, *max_grad_norm, ws, stream);
  return ws + b.first_chunk[b.count];
}

struct CudaOptimKernels {
  using Guard = c10::cuda::CUDAGuard;
  // capturable=True / fused=True keep Adam's step count on the parameter's GPU.
  static bool step_on_device(const at::Tensor& step, const at::Tensor& param) {
    return step.is_cuda() && step.device() == param.device();
  }

  template <typename T>
  static void sgd(const std::vector<SgdSlot<T>>& slots, std::optional<double> max_grad_norm, const at::Tensor& like) {
    const SlotBatch<SgdSlot<T>> b = batch_of(slots);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor workspace;
    launch_sgd<T>(b, clip<T>(b, max_grad_norm, like, workspace, stream), stream);
  }

  template <typename T>
  static void adam(const std::vector<AdamSlot<T>>& slots, std::optional<double> max_grad_norm, const at::Tensor& like) {
    const SlotBatch<AdamSlot<T>> b = batch_of(slots);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor workspace;
    launch_adam<T>(b, clip<T>(b, max_grad_norm, like, workspace, stream), stream);
  }
};

}  // namespace
}  // namespace fastmlp::cuda

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) { FASTMLP_REGISTER_TRAIN_OPS(m, fastmlp::cuda::CudaOptimKernels); }
