// Kernel parameter structs of mse.cuh / cross_entropy.cuh filled from tensors.
// Shared by the CUDA backends and the CPU harness's test extension (tests/emu),
// so both launch the kernels with the same arguments. Include after launch.cuh's
// prerequisites (nvcc, or csrc/emu/cuda_emu.h).
#pragma once
#include <ATen/ATen.h>

#include "cuda/cross_entropy.cuh"
#include "cuda/mse.cuh"

namespace fastmlp::cuda {

template <typename T> T* loss_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// The inputs of both MSE kernels; outputs are left for the caller to set.
template <typename T> MseParams<T> mse_params_of(const at::Tensor& x, const at::Tensor& y, int64_t reduction) {
  MseParams<T> p;
  p.n = x.numel();
  p.input = x.const_data_ptr<T>();
  p.target = y.const_data_ptr<T>();
  p.reduction = reduction;
  return p;
}

// The inputs of the cross-entropy launches (x [B, C]; target int64 [B] or T
// [B, C]; weight undefined or [C]); outputs are left for the caller to set.
template <typename T>
CeParams<T> ce_params_of(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t reduction,
                         int64_t ignore_index, double smoothing) {
  CeParams<T> p;
  p.rows = x.size(0);
  p.classes = x.size(1);
  p.input = x.const_data_ptr<T>();
  if (target.scalar_type() == at::kLong) {
    p.target_index = target.const_data_ptr<int64_t>();
  } else {
    p.target_prob = target.const_data_ptr<T>();
  }
  p.weight = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  p.ignore_index = ignore_index;
  p.smoothing = static_cast<acc_t<T>>(smoothing);
  p.reduction = reduction;
  return p;
}

}  // namespace fastmlp::cuda
