// Register-blocked GEMMs for narrow layers (out_features <= 64, e.g. 784 -> 30),
// where BLAS pays more in packing and blocking than the products cost:
//   forward  y[b, n] = x[b, :] . w[n, :]         4 x 4 dot products along k
//   weights  dW[n, k0:k0+64] += g[b, n] * x[b, k0:k0+64], summed over b
// Plain loops with compile-time trip counts that the compiler vectorises for
// each ISA (target_clones picks AVX-512 / AVX2 / baseline at run time).
// The weight gradient is split over k across threads, each summing over the
// whole batch in order: deterministic for any thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTMLP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTMLP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTMLP_CPU_CLONES
#define FASTMLP_ALWAYS_INLINE inline
#endif

namespace fastmlp::cpu {

// Multiply-adds below which a parallel task is not worth a thread wake-up (a
// few µs with OpenMP): measured here, batch-1 weight gradients of 1000 -> 100
// took 21 µs on two threads and 11 µs on one.
constexpr int64_t kMinTaskMacs = 262144;

constexpr int64_t kNarrowMax = 64;  // widest layer served by the forward kernel
// At batches up to kWeightGradRows the weight-gradient kernel beats BLAS on
// wider layers too (a rank-B update with small B is BLAS's worst case):
// measured here, 1000 -> 100 at batch 8 and 64 (1.3-1.8x); from batch 256 on
// BLAS wins at that width.
constexpr int64_t kWeightGradNarrowMax = 128;


// A 64-byte vector (GCC vector extension): one zmm register, or two ymm / four
// xmm in the narrower clones. Explicit vectors keep the accumulators in registers.
template <typename T> struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
};

template <typename T, typename V>
FASTMLP_ALWAYS_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, int R, int C>
FASTMLP_ALWAYS_INLINE void dot_block(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t K, T (&out)[R][C]) {
  using V = typename Vec64<T>::type;
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(T));
  V acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V{} ;
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    V xv[R], wv[C];
    for (int r = 0; r < R; ++r) xv[r] = load_vec<T, V>(x + r * ldx + k);
    for (int c = 0; c < C; ++c) wv[c] = load_vec<T, V>(w + c * ldw + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += xv[r] * wv[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      T sum = T(0);
      for (int v = 0; v < kLanes; ++v) sum += acc[r][c][v];
      for (int64_t kk = k; kk < K; ++kk) sum += x[r * ldx + kk] * w[c * ldw + kk];
      out[r][c] = sum;
    }
}

template <typename T, int R, int C>
FASTMLP_ALWAYS_INLINE void forward_block(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias, bool relu,
                                         T* out, int64_t N, int64_t K, int64_t b, int64_t n0) {
  T dots[R][C];
  dot_block<T, R, C>(x + b * ldx, ldx, w + n0 * ldw, ldw, K, dots);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const T v = dots[r][c] + (bias ? bias[n0 + c] : T(0));
      out[(b + r) * N + n0 + c] = relu ? fastmlp::relu(v) : v;
    }
}

template <typename T, int R>
FASTMLP_ALWAYS_INLINE void forward_rows_of(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias, bool relu,
                                           T* out, int64_t N, int64_t K, int64_t b) {
  int64_t n0 = 0;
  for (; n0 + 4 <= N; n0 += 4) forward_block<T, R, 4>(x, ldx, w, ldw, bias, relu, out, N, K, b, n0);
  for (; n0 < N; ++n0) forward_block<T, R, 1>(x, ldx, w, ldw, bias, relu, out, N, K, b, n0);
}

// out[b, 0:N] = act(x[b, :] . w[n, :] + bias[n]) for rows [begin, end).
template <typename T>
FASTMLP_CPU_CLONES void narrow_forward_rows(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias, bool relu,
                                            T* out, int64_t N, int64_t K, int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + 4 <= end; b += 4) forward_rows_of<T, 4>(x, ldx, w, ldw, bias, relu, out, N, K, b);
  for (; b < end; ++b) forward_rows_of<T, 1>(x, ldx, w, ldw, bias, relu, out, N, K, b);
}

// dW[n0 + r, k0 : k0 + NV * lanes] = sum_b g[b, n0 + r] * x[b, k0 : ...]: R
// gradient columns broadcast against NV vectors of input features, summed over
// the batch in order.
template <typename T, int NV, int R>
FASTMLP_ALWAYS_INLINE void weight_grad_block(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t K,
                                             int64_t B, int64_t n0, int64_t k0, bool accumulate) {
  using V = typename Vec64<T>::type;
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(T));
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = accumulate ? load_vec<T, V>(dw + (n0 + r) * K + k0 + j * kLanes) : V{};
  for (int64_t b = 0; b < B; ++b) {
    V xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = load_vec<T, V>(x + b * ldx + k0 + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const T gv = g[b * ldg + n0 + r];
      for (int j = 0; j < NV; ++j) acc[r][j] += xv[j] * gv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) std::memcpy(dw + (n0 + r) * K + k0 + j * kLanes, &acc[r][j], sizeof(V));
}

// The columns k0 .. k_end of dW that do not fill a vector: plain sums over b.
template <typename T>
FASTMLP_ALWAYS_INLINE void weight_grad_tail(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t K,
                                            int64_t B, int64_t n, int64_t k0, int64_t k_end, bool accumulate) {
  for (int64_t k = k0; k < k_end; ++k) {
    T sum = accumulate ? dw[n * K + k] : T(0);
    for (int64_t b = 0; b < B; ++b) sum += g[b * ldg + n] * x[b * ldx + k];
    dw[n * K + k] = sum;
  }
}

template <typename T, int R>
FASTMLP_ALWAYS_INLINE void weight_grad_rows(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t K,
                                            int64_t B, int64_t n0, int64_t k0, int64_t k_end, bool accumulate) {
  constexpr int kLanes = static_cast<int>(sizeof(typename Vec64<T>::type) / sizeof(T));
  for (; k0 + 4 * kLanes <= k_end; k0 += 4 * kLanes)
    weight_grad_block<T, 4, R>(x, ldx, g, ldg, dw, K, B, n0, k0, accumulate);
  for (; k0 + kLanes <= k_end; k0 += kLanes) weight_grad_block<T, 1, R>(x, ldx, g, ldg, dw, K, B, n0, k0, accumulate);
  for (int r = 0; r < R; ++r) weight_grad_tail<T>(x, ldx, g, ldg, dw, K, B, n0 + r, k0, k_end, accumulate);
}

// dW[:, k] for the column blocks [kb_begin, kb_end) of kWeightGradCols
// features. The batch is walked in chunks of kWeightGradRows rows, so a chunk of
// x (32 KB for floats) stays in L1 while every group of gradient columns uses
// it; each chunk adds onto dW in batch order (the same order for any thread count).
constexpr int64_t kWeightGradCols = 64;
constexpr int64_t kWeightGradRows = 128;

template <typename T>
FASTMLP_CPU_CLONES void narrow_weight_grad_blocks(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw,
                                                  int64_t N, int64_t K, int64_t B, int64_t kb_begin,
                                                  int64_t kb_end) {
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t k0 = kb * kWeightGradCols, k_end = std::min(K, k0 + kWeightGradCols);
    for (int64_t b0 = 0; b0 == 0 || b0 < B; b0 += kWeightGradRows) {  // once even for B == 0: writes zeros
      const int64_t rows = std::min(kWeightGradRows, B - b0);
      const T* xb = x + b0 * ldx;
      const T* gb = g + b0 * ldg;
      const bool accumulate = b0 > 0;
      int64_t n0 = 0;
      for (; n0 + 4 <= N; n0 += 4) weight_grad_rows<T, 4>(xb, ldx, gb, ldg, dw, K, rows, n0, k0, k_end, accumulate);
      for (; n0 < N; ++n0) weight_grad_rows<T, 1>(xb, ldx, gb, ldg, dw, K, rows, n0, k0, k_end, accumulate);
    }
  }
}

// Whether a layer takes the narrow path: a narrow output, float/double, and an
// input with unit stride along features.
inline bool narrow_eligible(const at::Tensor& x, int64_t out_features, int64_t max_features = kNarrowMax) {
  const auto st = x.scalar_type();
  return out_features <= max_features && (st == at::kFloat || st == at::kDouble) && x.stride(1) == 1 && x.size(0) > 0;
}

template <typename T>
void narrow_forward(const at::Tensor& x, const at::Tensor& w_in, const T* bias, bool relu, at::Tensor& out) {
  const at::Tensor w = w_in.stride(1) == 1 ? w_in : w_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  // At least kMinTaskMacs multiply-adds per task: waking a second thread costs
  // more than a smaller share of work saves (batch 1-8 run inline).
  const int64_t grain = std::max<int64_t>(4, kMinTaskMacs / std::max<int64_t>(K * N, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    narrow_forward_rows<T>(xp, x.stride(0), wp, w.stride(0), bias, relu, op, N, K, begin, end);
  });
}

// g: [B, N] masked output gradient (row stride g.stride(0), unit column
// stride); dw: [N, K] contiguous. Parallel over blocks of input features.
template <typename T>
void narrow_weight_grad(const at::Tensor& x, const at::Tensor& g, at::Tensor& dw) {
  const int64_t B = x.size(0), K = x.size(1), N = dw.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  const int64_t blocks = (K + kWeightGradCols - 1) / kWeightGradCols;
  // At least kMinTaskMacs multiply-adds per task, as in the forward.
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(B * N * kWeightGradCols, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    narrow_weight_grad_blocks<T>(xp, x.stride(0), gp, g.stride(0), dwp, N, K, B, begin, end);
  });
}

}  // namespace fastmlp::cpu
