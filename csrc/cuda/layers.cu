// Registers the CUDA kernels of the Linear(+ReLU) ops. A narrow chain's forward
// runs as one fused kernel (cuda/fused_chain.cuh) unless its first layer is big
// enough for cuBLAS (cuda/fused_or_layered.cuh); everything else, and every
// backward, runs layer by layer (cuBLAS or the tiled GEMM, gemm_on_cublas).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/fused_or_layered.cuh"
#include "cuda/kernel_params.h"
#include "cuda/layer_backend.cuh"

namespace fastmlp::cuda {
namespace {

using Layers = LayerOps<CudaKernels>;

std::tuple<at::Tensor, at::Tensor> mlp_forward(const at::Tensor& input, at::TensorList weights,
                                               const c10::List<c10::optional<at::Tensor>>& biases, bool last_relu) {
  check_mlp_args(input, weights, biases);
  if (!fused_chain_shape(input, weights)) return Layers::mlp_forward(input, weights, biases, last_relu);
  c10::cuda::CUDAGuard guard(input.device());
  BelowAutograd below_autograd;
  const ContiguousChain chain(weights, biases);
  const int64_t batch = input.size(0);
  const std::vector<int64_t> offsets = hidden_offsets(batch, weights);
  at::Tensor hidden = at::empty({offsets.back()}, input.options());
  at::Tensor output = at::empty({batch, weights.back().size(0)}, input.options());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  std::tuple<at::Tensor, at::Tensor> result;
  bool planned = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastmlp_mlp_forward_cuda", [&] {
    FusedChainParams<scalar_t> p = fused_chain_params_of<scalar_t>(input, chain, last_relu);
    FusedChainPlan plan;
    if (!plan_fused_forward(p, props->multiProcessorCount, props->sharedMemPerBlockOptin, &plan)) return;
    planned = true;
    for (int l = 0; l + 1 < p.layers; ++l) p.activation[l] = hidden.data_ptr<scalar_t>() + offsets[l];
    p.activation[p.layers - 1] = output.data_ptr<scalar_t>();
    const auto fused = [&] {
      launch_fused_forward(p, plan, at::cuda::getCurrentCUDAStream());
      result = {output, hidden};
    };
    run_fused_or_layered("cuda_mlp_forward", input, weights, fused_chain_preferred(p, plan), fused,
                         [&] { result = Layers::mlp_forward(input, weights, biases, last_relu); });
  });
  return planned ? result : Layers::mlp_forward(input, weights, biases, last_relu);
}

}  // namespace
}  // namespace fastmlp::cuda

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("linear_act", &fastmlp::LayerOps<fastmlp::cuda::CudaKernels>::linear_act);
  m.impl("linear_act_backward", &fastmlp::LayerOps<fastmlp::cuda::CudaKernels>::linear_act_backward);
  m.impl("mlp_forward", &fastmlp::cuda::mlp_forward);
  m.impl("mlp_backward", &fastmlp::LayerOps<fastmlp::cuda::CudaKernels>::mlp_backward);
}
