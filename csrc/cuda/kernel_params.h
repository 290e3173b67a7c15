// Kernel parameter structs of gemm.cuh / bce.cuh filled from tensors. Shared by
// the CUDA backends and the CPU harness's test extension (tests/emu), so both
// launch the kernels with the same arguments. Include after launch.cuh's
// prerequisites (nvcc, or csrc/emu/cuda_emu.h).
#pragma once
#include <ATen/ATen.h>

#include "cuda/bce.cuh"
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

}  // namespace fastmlp::cuda
