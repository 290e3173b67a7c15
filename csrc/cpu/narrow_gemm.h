// Register-blocked GEMMs for narrow layers (out_features <= 64, e.g. 784 -> 30),
// where BLAS is far from peak: the output row fits a few vector registers, so
//   forward  y[b, :]  = sum_k x[b, k] * W^T[k, :]      (W^T packed to [K, NP])
//   weights  dW^T[k, :] = sum_b x[b, k] * g[b, :]     (g packed to [B, NP])
// are both "broadcast a scalar of x, FMA a row vector" loops that the compiler
// vectorises for each ISA (target_clones picks AVX-512 / AVX2 at run time).
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

constexpr int64_t kNarrowMax = 64;  // widest layer served by these kernels

inline int64_t narrow_pad(int64_t n) { return n <= 16 ? 16 : (n <= 32 ? 32 : 64); }

// acc[r][0:NP] += sum_k a[r * lda + k * a_k_stride] * bt[k * ldb + 0:NP], k in
// [0, K): R scalars of a broadcast against one row of bt. The body of both GEMMs.
// Always inlined: an out-of-line copy would be compiled for the baseline ISA
// only, not for the caller's target clone.
template <typename T, int NP, int R>
FASTMLP_ALWAYS_INLINE void rank_update(T (&acc)[R][NP], const T* a, int64_t lda, int64_t a_k_stride, const T* bt, int64_t ldb,
                        int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const T* brow = bt + k * ldb;
    for (int r = 0; r < R; ++r) {
      const T av = a[r * lda + k * a_k_stride];
      for (int j = 0; j < NP; ++j) acc[r][j] += av * brow[j];
    }
  }
}

// out[b, 0:N] = act(x[b, :] . W^T + bias) for rows [begin, end).
template <typename T, int NP>
FASTMLP_CPU_CLONES void narrow_forward_rows(const T* x, int64_t ldx, const T* wt, const T* bias, bool relu, T* out,
                                            int64_t N, int64_t K, int64_t begin, int64_t end) {
  constexpr int R = NP <= 32 ? 4 : 2;
  int64_t b = begin;
  for (; b + R <= end; b += R) {
    T acc[R][NP] = {};
    rank_update<T, NP, R>(acc, x + b * ldx, ldx, 1, wt, NP, K);
    for (int r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) {
        T v = acc[r][n] + (bias ? bias[n] : T(0));
        out[(b + r) * N + n] = relu ? fastmlp::relu(v) : v;
      }
  }
  for (; b < end; ++b) {
    T acc[1][NP] = {};
    rank_update<T, NP, 1>(acc, x + b * ldx, ldx, 1, wt, NP, K);
    for (int64_t n = 0; n < N; ++n) {
      T v = acc[0][n] + (bias ? bias[n] : T(0));
      out[b * N + n] = relu ? fastmlp::relu(v) : v;
    }
  }
}

// dW[n0:n0+R, k0:k0+KW] = sum_b g[b, n] * x[b, k]: R gradient columns broadcast
// against KW contiguous input columns, summed over the batch in order.
template <typename T, int KW, int R>
FASTMLP_ALWAYS_INLINE void weight_grad_block(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t K, int64_t B,
                              int64_t n0, int64_t k0) {
  T acc[R][KW] = {};
  rank_update<T, KW, R>(acc, g + n0, 1, ldg, x + k0, ldx, B);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < KW; ++j) dw[(n0 + r) * K + k0 + j] = acc[r][j];
}

// dW[:, k] for the column blocks [kb_begin, kb_end) of 64 input features (the
// last block takes the tail in 16-wide steps, then one column at a time).
template <typename T>
FASTMLP_CPU_CLONES void narrow_weight_grad_blocks(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw,
                                                  int64_t N, int64_t K, int64_t B, int64_t kb_begin,
                                                  int64_t kb_end) {
  constexpr int R = 4;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t k_end = std::min(K, (kb + 1) * 64);
    int64_t n0 = 0;
    for (; n0 + R <= N; n0 += R) {
      int64_t k0 = kb * 64;
      for (; k0 + 64 <= k_end; k0 += 64) weight_grad_block<T, 64, R>(x, ldx, g, ldg, dw, K, B, n0, k0);
      for (; k0 + 16 <= k_end; k0 += 16) weight_grad_block<T, 16, R>(x, ldx, g, ldg, dw, K, B, n0, k0);
      for (; k0 < k_end; ++k0) weight_grad_block<T, 1, R>(x, ldx, g, ldg, dw, K, B, n0, k0);
    }
    for (; n0 < N; ++n0) {
      int64_t k0 = kb * 64;
      for (; k0 + 64 <= k_end; k0 += 64) weight_grad_block<T, 64, 1>(x, ldx, g, ldg, dw, K, B, n0, k0);
      for (; k0 + 16 <= k_end; k0 += 16) weight_grad_block<T, 16, 1>(x, ldx, g, ldg, dw, K, B, n0, k0);
      for (; k0 < k_end; ++k0) weight_grad_block<T, 1, 1>(x, ldx, g, ldg, dw, K, B, n0, k0);
    }
  }
}

template <typename T, int NP>
void narrow_forward_np(const at::Tensor& x, const at::Tensor& w, const T* bias, bool relu, at::Tensor& out) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  // W^T packed [K, NP], zero padded. A plain loop: at a small batch, tensor ops
  // (zeros + strided copy) would cost more than the packing itself.
  std::vector<T> wt(static_cast<size_t>(K * NP), T(0));
  const T* wp = w.const_data_ptr<T>();
  const int64_t w_rs = w.stride(0), w_cs = w.stride(1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wt[k * NP + n] = wp[n * w_rs + k * w_cs];
  const T* xp = x.const_data_ptr<T>();
  const T* wtp = wt.data();
  T* op = out.data_ptr<T>();
  // ~4K multiply-adds of NP lanes per task: enough to amortise a task, fine enough for 2+ threads at batch 64.
  const int64_t grain = std::max<int64_t>(4, 4096 / std::max<int64_t>(K, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    narrow_forward_rows<T, NP>(xp, x.stride(0), wtp, bias, relu, op, N, K, begin, end);
  });
}

// Whether a layer takes the narrow path: a narrow output, float/double, and an
// input with unit stride along features.
inline bool narrow_eligible(const at::Tensor& x, int64_t out_features) {
  const auto st = x.scalar_type();
  return out_features <= kNarrowMax && (st == at::kFloat || st == at::kDouble) && x.stride(1) == 1 &&
         x.size(0) > 0;
}

template <typename T>
void narrow_forward(const at::Tensor& x, const at::Tensor& w, const T* bias, bool relu, at::Tensor& out) {
  switch (narrow_pad(w.size(0))) {
    case 16: return narrow_forward_np<T, 16>(x, w, bias, relu, out);
    case 32: return narrow_forward_np<T, 32>(x, w, bias, relu, out);
    default: return narrow_forward_np<T, 64>(x, w, bias, relu, out);
  }
}

// g: [B, N] masked output gradient (row stride g.stride(0), unit column
// stride); dw: [N, K] contiguous. Parallel over blocks of 64 input features.
template <typename T>
void narrow_weight_grad(const at::Tensor& x, const at::Tensor& g, at::Tensor& dw) {
  const int64_t B = x.size(0), K = x.size(1), N = dw.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  const int64_t blocks = (K + 63) / 64;
  const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(B * N / 256, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    narrow_weight_grad_blocks<T>(xp, x.stride(0), gp, g.stride(0), dwp, N, K, B, begin, end);
  });
}

}  // namespace fastmlp::cpu
