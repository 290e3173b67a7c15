// Deliberately broken kernels: each is a template on kBug, and kBug = false is
// the correct version of the same code. The tests check that the harness
// reports every bug and passes every fix. Plain CUDA.
#pragma once
#include <stdint.h>

#include "cuda/launch.cuh"

namespace fastmlp::cuda {

constexpr int kBrokenThreads = 128;

// Off-by-one bound: `i <= n` reads x[n], one past the end.
// out[b] = per-block partial sum (one thread per block does the loop).
template <bool kBug> __global__ void broken_sum_off_by_one(const float* x, int64_t n, float* out) {
  if (threadIdx.x != 0) return;
  float acc = 0.0f;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kBrokenThreads;
  const int64_t end = begin + kBrokenThreads < n ? begin + kBrokenThreads : n;
  for (int64_t i = begin; kBug ? i <= end : i < end; ++i) acc += x[i];
  out[blockIdx.x] = acc;
}

// Off-by-one write: the last block writes y[n].
template <bool kBug> __global__ void broken_copy_write_past_end(const float* x, float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
  if (kBug && i == n) y[i] = 0.0f;
}

// Missing __syncthreads() in a Hillis-Steele scan: thread t reads s[t - off]
// while thread t - off updates it in the same barrier interval (a race).
template <bool kBug> __global__ void broken_scan_missing_sync(const float* x, float* y, int64_t n) {
  __shared__ float s[kBrokenThreads];
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int off = 1; off < kBrokenThreads; off *= 2) {
    const float add = t >= off ? s[t - off] : 0.0f;
    if (!kBug) __syncthreads();  // everyone has read before anyone writes
    s[t] += add;
    __syncthreads();
  }
  if (i < n) y[i] = s[t];
}

// Missing __syncthreads() between staging a chunk and reading it reversed:
// thread 0 reads s[last] before its owner stored it (uninitialized read).
template <bool kBug> __global__ void broken_reverse_missing_sync(const float* x, float* y, int64_t n) {
  __shared__ float s[kBrokenThreads];
  const int t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBrokenThreads;
  const int valid = static_cast<int>(n - base < kBrokenThreads ? n - base : kBrokenThreads);
  if (t < valid) s[t] = x[base + t];
  if (!kBug) __syncthreads();
  if (t < valid) y[base + t] = s[valid - 1 - t];
}

// Divergent barrier: threads past the end return early, the others then wait
// at __syncthreads() for them (hangs or corrupts on a GPU).
template <bool kBug> __global__ void broken_early_return_barrier(const float* x, float* y, int64_t n) {
  __shared__ float s[kBrokenThreads];
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads + t;
  if (kBug && i >= n) return;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  const float next = s[(t + 1) % kBrokenThreads];
  if (i < n) y[i] = s[t] + next;
}

// Barriers at two different call sites (an if/else with a __syncthreads() in
// each branch).
template <bool kBug> __global__ void broken_two_barrier_sites(const float* x, float* y, int64_t n) {
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads + t;
  const float v = i < n ? x[i] : 0.0f;
  if (kBug && t % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  if (i < n) y[i] = v;
}

// Full-mask warp reduction after an early return: exited lanes in the mask.
template <bool kBug> __global__ void broken_shuffle_exited_lanes(const float* x, float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kBug && i >= n) return;
  float v = i < n ? x[i] : 0.0f;
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (i < n) y[i] = v;
}

// Every block writes its partial into out[0] instead of out[blockIdx.x]: a
// global write/write race between blocks.
template <bool kBug> __global__ void broken_partials_same_slot(const float* x, int64_t n, float* out) {
  if (threadIdx.x != 0) return;
  float acc = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads;
       i < n && i < static_cast<int64_t>(blockIdx.x + 1) * kBrokenThreads; ++i) {
    acc += x[i];
  }
  out[kBug ? 0 : blockIdx.x] = acc;
}

// Reads one element past the dynamic shared memory the launch requested.
template <bool kBug> __global__ void broken_dynamic_smem_overrun(const float* x, float* y, int64_t n) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  const float extra = kBug && t == 0 ? s[kBrokenThreads] : 0.0f;
  if (i < n) y[i] = s[t] + extra;
}

// Warp-synchronous exchange through shared memory: lanes read their
// neighbour's slot, which needs a __syncwarp() (not a __syncthreads()) after
// the stores: independent thread scheduling gives no implicit warp lockstep.
template <bool kBug> __global__ void broken_warp_exchange_missing_syncwarp(const float* x, float* y, int64_t n) {
  __shared__ float s[kBrokenThreads];
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBrokenThreads + t;
  s[t] = i < n ? x[i] : 0.0f;
  if (!kBug) __syncwarp();
  if (i < n) y[i] = s[t ^ 1];
}

// A warp shuffle whose mask leaves out the calling lanes 16-31.
template <bool kBug> __global__ void broken_shuffle_mask_misses_lanes(const float* x, float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : 0.0f;
  const float other = __shfl_xor_sync(kBug ? 0x0000ffffu : 0xffffffffu, v, 16);
  if (i < n) y[i] = v + other;
}

// Writes into an input.
template <bool kBug> __global__ void broken_writes_input(float* x, float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    y[i] = 2.0f * x[i];
    if (kBug) x[i] = 0.0f;
  }
}

}  // namespace fastmlp::cuda
