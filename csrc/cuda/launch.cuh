// The one kernel launcher of the project. Under nvcc it is a real <<<>>> launch
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK(); compiled by a host compiler with
// csrc/emu/cuda_emu.h included first (the CPU test harness), it runs the very
// same kernel on the CPU with CUDA's execution semantics.
#pragma once
#include <stddef.h>

#include <map>
#include <mutex>
#include <utility>

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#elif !defined(FASTMLP_CUDA_EMU)
#error "launch.cuh needs nvcc, or csrc/emu/cuda_emu.h included first"
#endif

namespace fastmlp::cuda {

// Dynamic shared memory a kernel may use without opting in.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Opts `kernel` in to `bytes` of dynamic shared memory (above
// kDefaultDynamicSmem) on the current device. The driver call is made only
// when the kernel's allowance on that device has to grow.
template <typename... KernelArgs> inline void allow_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= current) return;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
#if defined(__CUDACC__)
  C10_CUDA_CHECK(err);
#else
  if (err != cudaSuccess) throw ::fastmlp_emu::Error("fastmlp_emu: cudaFuncSetAttribute failed");
#endif
  current = bytes;
}

template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // nothing to do (empty tensors)
#if defined(__CUDACC__)
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  ::fastmlp_emu::launch(kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
#endif
}

}  // namespace fastmlp::cuda
