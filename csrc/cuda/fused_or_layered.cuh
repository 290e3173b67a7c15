// The choice between the fused chain kernel and the layer path (cuBLAS GEMMs
// through ATen, or gemm_kernel) for a narrow chain on CUDA.
//
// Heuristic (fused_chain_preferred, cuda/fused_chain.cuh): the fused kernel
// while the first layer's GEMM is below kCublasMinMacs multiply-adds
// (launches dominate there, and the fused kernel is one or two of them) and no
// block of its grid does more than kFusedMaxBlockMacs of it; the layer path
// otherwise (cuBLAS's GEMMs beat the fused kernel's SIMT tiles on big layers:
// on an H200 784-30-1 at 12396 rows is ~290M of them).
// With autotuning on (common/autotune.h) the first call of a shape times both
// with CUDA events on the current stream instead, except while a CUDA graph is
// being captured (the timing synchronizes): then a decision made before the
// capture, else the heuristic.
// Host code, nvcc only.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <functional>
#include <vector>

#include "common/autotune.h"
#include "cuda/fused_chain.cuh"

namespace fastmlp::cuda {

// Seconds `fn`'s launches take on the current stream (the runtime's events:
// the same code under torch 2.11 to 2.14).
inline double cuda_event_seconds(const std::function<void()>& fn) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaEvent_t start = nullptr, stop = nullptr;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  float ms = 0;
  C10_CUDA_CHECK(cudaEventRecord(start, stream));
  fn();
  C10_CUDA_CHECK(cudaEventRecord(stop, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(stop));
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return static_cast<double>(ms) / 1e3;
}

// Runs `fused` or `layered` for the chain; returns 0 for fused, 1 for layered.
// `fused_preferred`: the heuristic (fused_chain_preferred on the plan); `key_extra`:
// the decision key's options beyond the shapes (chain_autotune_key).
template <class Fused, class Layered>
int run_fused_or_layered(const char* op, const at::Tensor& input, at::TensorList weights, bool fused_preferred,
                         const Fused& fused, const Layered& layered, const std::vector<int64_t>& key_extra = {}) {
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  return Autotuner::instance().run([&] { return chain_autotune_key(op, input, weights, key_extra); },
                                   fused_preferred ? 0 : 1, fused, layered, cuda_event_seconds, !capturing);
}

}  // namespace fastmlp::cuda
