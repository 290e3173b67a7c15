// Kernel parameter structs of gemm.cuh / bce.cuh filled from tensors. Shared by
// the CUDA backends and the CPU harness's test extension (tests/emu), so both
// launch the kernels with the same arguments. Include after launch.cuh's
// prerequisites (nvcc, or csrc/emu/cuda_emu.h).
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "cuda/bce.cuh"
#include "cuda/fused_chain.cuh"
#include "cuda/gemm.cuh"

namespace fastmlp::cuda {

template <typename T> T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// A 2-D tensor (or its transpose) as a strided GEMM operand.
template <typename T> Strided<T> strided(const at::Tensor& t, bool transpose = false) {
  Strided<T> s;
  s.ptr = t.const_data_ptr<T>();
  s.row_stride = transpose ? t.stride(1) : t.stride(0);
  s.col_stride = transpose ? t.stride(0) : t.stride(1);
  return s;
}

// weight / pos_weight: undefined, or numel() values repeating along the input.
template <typename T> BcePattern<T> pattern_of(const at::Tensor& t) {
  BcePattern<T> p;
  if (t.defined()) {
    p.ptr = t.const_data_ptr<T>();
    p.period = t.numel();
  }
  return p;
}

// The inputs of both BCE kernels; outputs are left for the caller to set.
template <typename T> BceParams<T> bce_params_of(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                                                 const at::Tensor& pw, int64_t reduction) {
  BceParams<T> p;
  p.n = x.numel();
  p.input = x.const_data_ptr<T>();
  p.target = y.const_data_ptr<T>();
  p.weight = pattern_of<T>(w);
  p.pos_weight = pattern_of<T>(pw);
  p.reduction = reduction;
  return p;
}

// Whether a chain's shape is one for the fused kernels (cheap: decided before
// any copy; the plan may still turn it down for shared memory).
inline bool fused_chain_shape(const at::Tensor& input, at::TensorList weights) {
  if (weights.size() > static_cast<size_t>(kChainMaxLayers) || input.size(0) == 0 || input.size(1) == 0) return false;
  for (const at::Tensor& w : weights) {
    if (w.size(0) > kChainMaxWidth) return false;
  }
  return true;
}

// A chain's parameters, contiguous (the fused kernels index them densely).
struct ContiguousChain {
  std::vector<at::Tensor> weights;
  c10::List<c10::optional<at::Tensor>> biases;
  ContiguousChain(at::TensorList w, const c10::List<c10::optional<at::Tensor>>& b) {
    for (size_t l = 0; l < w.size(); ++l) {
      weights.push_back(w[l].contiguous());
      const c10::optional<at::Tensor> bias = b.get(l);
      biases.push_back(bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->contiguous())
                                                           : c10::nullopt);
    }
  }
};

// The chain's part of the fused kernels' parameters (at most kChainMaxLayers
// layers); outputs and the plan are left for the caller to set.
template <typename T> FusedChainParams<T> fused_chain_params_of(const at::Tensor& input, const ContiguousChain& chain,
                                                                bool last_relu) {
  TORCH_CHECK(chain.weights.size() <= static_cast<size_t>(kChainMaxLayers), "fastmlp: internal error, fused chain of ",
              chain.weights.size(), " layers");
  FusedChainParams<T> p;
  p.batch = input.size(0);
  p.in_features = input.size(1);
  p.layers = static_cast<int>(chain.weights.size());
  p.input = strided<T>(input);
  for (int l = 0; l < p.layers; ++l) {
    p.width[l] = static_cast<int>(chain.weights[l].size(0));
    p.weight[l] = chain.weights[l].const_data_ptr<T>();
    const c10::optional<at::Tensor> b = chain.biases.get(l);
    p.bias[l] = b.has_value() ? b->const_data_ptr<T>() : nullptr;
  }
  p.last_relu = last_relu;
  return p;
}

// The fused step's parameters: the chain's, the loss's (target contiguous).
template <typename T>
FusedChainParams<T> fused_step_params_of(const at::Tensor& input, const at::Tensor& target,
                                         const ContiguousChain& chain, bool last_relu, const at::Tensor& loss_weight,
                                         const at::Tensor& pos_weight, int64_t reduction) {
  FusedChainParams<T> p = fused_chain_params_of<T>(input, chain, last_relu);
  p.target = target.const_data_ptr<T>();
  p.loss_weight = pattern_of<T>(loss_weight);
  p.pos_weight = pattern_of<T>(pos_weight);
  p.scale = reduction == 1 ? acc_t<T>(1) / static_cast<acc_t<T>>(target.numel()) : acc_t<T>(1);
  return p;
}

// The fused step's outputs: those asked for allocated with
// alloc(shape, options), the others empty; p points at them and p.lowest is set.
struct FusedStepOutputs {
  at::Tensor loss, grad_input;
  std::vector<at::Tensor> grad_weight, grad_bias;
};

template <typename T, typename Alloc>
FusedStepOutputs fused_step_outputs(FusedChainParams<T>& p, const at::Tensor& input, at::TensorList weights,
                                    bool input_grad, const c10::List<bool>& weight_mask,
                                    const c10::List<bool>& bias_mask, const Alloc& alloc) {
  const at::TensorOptions opts = input.options();
  auto maybe = [&](bool wanted, at::IntArrayRef shape) { return wanted ? alloc(shape, opts) : at::empty({0}, opts); };
  FusedStepOutputs o;
  o.loss = alloc(at::IntArrayRef{}, opts);
  o.grad_input = maybe(input_grad, input.sizes());
  p.loss = o.loss.data_ptr<T>();
  p.grad_input = input_grad ? o.grad_input.data_ptr<T>() : nullptr;
  p.lowest = input_grad ? 0 : p.layers;
  for (int l = 0; l < p.layers; ++l) {
    o.grad_weight.push_back(maybe(weight_mask[l], weights[l].sizes()));
    o.grad_bias.push_back(maybe(bias_mask[l], {weights[l].size(0)}));
    p.grad_weight[l] = weight_mask[l] ? o.grad_weight[l].data_ptr<T>() : nullptr;
    p.grad_bias[l] = bias_mask[l] ? o.grad_bias[l].data_ptr<T>() : nullptr;
    if ((weight_mask[l] || bias_mask[l]) && l < p.lowest) p.lowest = l;
  }
  return o;
}

}  // namespace fastmlp::cuda
