// Register-blocked GEMMs for narrow layers (e.g. 784 -> 30 or 1000 -> 100; up
// to kNarrowForwardMax outputs forward, kNarrowMax for the weight gradient),
// where BLAS pays more in packing and blocking than the products cost:
//   forward  y[b, :] = sum_k x[b, k] * wt[k, :]   outer products: R rows x NV
//            vectors of outputs stay in registers, the weights are packed
//            transposed once per call ([K, NV * lanes] in panels of at most
//            4 vectors, zero padded)
//   forward  y[b, n] = x[b, :] . w[n, :]          dot products, for small
//            batches and a handful of outputs (N = 1 would waste all but one
//            lane of the outer form)
//   weights  dW[n, k0:k0+4 lanes] += g[b, n] * x[b, k0:...], summed over b
// Every output element is a sum in a fixed order (k for the outer form; k per
// lane, then the lanes by Simd::sum, for the dot form; b for the weight
// gradient) whatever the row/column blocking, so the result does not depend on
// how rows or columns are split over threads.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/math.h"
#include "cpu/simd.h"

namespace fastmlp::cpu {

// Multiply-adds below which a parallel task is not worth a thread wake-up (a
// few µs with OpenMP): measured here, batch-1 weight gradients of 1000 -> 100
// took 21 µs on two threads and 11 µs on one.
constexpr int64_t kMinTaskMacs = 262144;

// The widest layer these kernels serve. Measured against BLAS (MKL) here, on
// two threads: 1000 -> 100 forward 1.07-1.35x and weight gradient 1.2-1.5x at
// 8 to 2048 rows (once the outer form splits wide outputs into panels and the
// weight gradient's last features are vectors too). Up to 256 outputs the
// forward still wins (784 -> 256: 1.03-1.9x, 20 -> 200: 1.2-1.8x) but the
// weight gradient loses to BLAS from 129 (200 -> 129: 0.87-0.97x; 20 -> 200:
// 0.74-0.92x, too few features to split over threads).
constexpr int64_t kNarrowMax = 128;
constexpr int64_t kNarrowForwardMax = 256;

constexpr int64_t kCacheLine = 64;  // bytes
constexpr int64_t kKeptPackBytes = 4 << 20;      // packed weights kept per thread up to this size
// A narrow chain's forward runs tiles of the fewest rows worth a task
// (kMinTaskMacs), up to about this many.
constexpr int64_t kChainTileRows = 256;

// The vector width (bytes) of the kernels FASTMLP_ISA_ENTRY runs on this CPU.
inline int vector_bytes() {
  switch (detected_isa()) {
    case Isa::kAvx512: return 64;
    case Isa::kAvx2: return 32;
    default: return 16;
  }
}

// ---- forward, dot-product form -------------------------------------------------

template <typename T, int kBytes, int R, int C>
FASTMLP_ALWAYS_INLINE void dot_block(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t K, T (&out)[R][C]) {
  using S = Simd<T, kBytes>;
  using V = typename S::Vec;
  V acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V{};
  int64_t k = 0;
  for (; k + S::kLanes <= K; k += S::kLanes) {
    V xv[R], wv[C];
    for (int r = 0; r < R; ++r) xv[r] = S::load(x + r * ldx + k);
    for (int c = 0; c < C; ++c) wv[c] = S::load(w + c * ldw + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += xv[r] * wv[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      T sum = S::sum(acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[r * ldx + kk] * w[c * ldw + kk];
      out[r][c] = sum;
    }
}

template <typename T, int kBytes, int R, int C>
FASTMLP_ALWAYS_INLINE void dot_forward_block(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias,
                                             bool relu, T* out, int64_t N, int64_t K, int64_t b, int64_t n0) {
  T dots[R][C];
  dot_block<T, kBytes, R, C>(x + b * ldx, ldx, w + n0 * ldw, ldw, K, dots);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const T v = dots[r][c] + (bias ? bias[n0 + c] : T(0));
      out[(b + r) * N + n0 + c] = relu ? fastmlp::relu(v) : v;
    }
}

template <typename T, int kBytes, int R>
FASTMLP_ALWAYS_INLINE void dot_forward_row_block(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias,
                                                 bool relu, T* out, int64_t N, int64_t K, int64_t b) {
  int64_t n0 = 0;
  for (; n0 + 4 <= N; n0 += 4) dot_forward_block<T, kBytes, R, 4>(x, ldx, w, ldw, bias, relu, out, N, K, b, n0);
  for (; n0 < N; ++n0) dot_forward_block<T, kBytes, R, 1>(x, ldx, w, ldw, bias, relu, out, N, K, b, n0);
}

template <typename T, int kBytes>
FASTMLP_ALWAYS_INLINE void dot_forward_rows(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias,
                                            bool relu, T* out, int64_t N, int64_t K, int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + 4 <= end; b += 4) dot_forward_row_block<T, kBytes, 4>(x, ldx, w, ldw, bias, relu, out, N, K, b);
  for (; b < end; ++b) dot_forward_row_block<T, kBytes, 1>(x, ldx, w, ldw, bias, relu, out, N, K, b);
}

// ---- forward, outer-product form -----------------------------------------------

// Rows R of x times the packed weights, NV vectors of outputs per row. While
// it works, the next `prefetch_rows` rows of x are fetched one cache line ahead
// of use (the hardware prefetcher alone does not keep R streams fed from DRAM).
template <typename T, int kBytes, int R, int NV>
FASTMLP_ALWAYS_INLINE void outer_block(const T* x, int64_t ldx, const T* wt, const T* bias, bool relu, T* out,
                                       int64_t ldo, int64_t N, int64_t K, int64_t prefetch_rows) {
  using S = Simd<T, kBytes>;
  using V = typename S::Vec;
  constexpr int64_t kLine = kCacheLine / static_cast<int64_t>(sizeof(T));
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    if (k % kLine == 0) {
      for (int64_t r = 0; r < prefetch_rows; ++r) __builtin_prefetch(x + (R + r) * ldx + k);
    }
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = S::load(wt + (k * NV + j) * S::kLanes);
    for (int r = 0; r < R; ++r) {
      const T xv = x[r * ldx + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += wv[j] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    T row[NV * S::kLanes];
    for (int j = 0; j < NV; ++j) S::store(row + j * S::kLanes, acc[r][j]);
    T* o = out + r * ldo;
    for (int64_t n = 0; n < N; ++n) {
      const T v = row[n] + (bias ? bias[n] : T(0));
      o[n] = relu ? fastmlp::relu(v) : v;
    }
  }
}

// Rows per outer-form block with nv output vectors: as many accumulators as the
// register file holds, at most 12 rows.
constexpr int outer_block_rows(int vector_bytes, int64_t nv) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(12, accumulator_budget(vector_bytes) / nv)));
}

// Rows [b, end) in blocks of R; the rest in blocks of 8, 4, 2 and 1 rows (a
// one-row block reads a weight vector per multiply-add: slow if used much).
template <typename T, int kBytes, int NV, int R>
FASTMLP_ALWAYS_INLINE int64_t outer_blocks_of(const T* x, int64_t ldx, const T* wt, const T* bias, bool relu, T* out,
                                              int64_t ldo, int64_t N, int64_t K, int64_t b, int64_t end,
                                              int64_t rows_total) {
  for (; b + R <= end; b += R) {
    const int64_t ahead = std::clamp<int64_t>(rows_total - b - R, 0, R);
    outer_block<T, kBytes, R, NV>(x + b * ldx, ldx, wt, bias, relu, out + b * ldo, ldo, N, K, ahead);
  }
  return b;
}

// One panel of NV output vectors (N real columns of an output with row stride
// ldo) for rows [begin, end).
template <typename T, int kBytes, int NV>
FASTMLP_ALWAYS_INLINE void outer_rows(const T* x, int64_t ldx, const T* wt, const T* bias, bool relu, T* out,
                                      int64_t ldo, int64_t N, int64_t K, int64_t begin, int64_t end,
                                      int64_t rows_total) {
  constexpr int R = outer_block_rows(kBytes, NV);
#define FASTMLP_OUTER_BLOCKS(ROWS) \
  outer_blocks_of<T, kBytes, NV, ROWS>(x, ldx, wt, bias, relu, out, ldo, N, K, b, end, rows_total)
  int64_t b = begin;
  b = FASTMLP_OUTER_BLOCKS(R);
  if constexpr (R > 8) b = FASTMLP_OUTER_BLOCKS(8);
  if constexpr (R > 4) b = FASTMLP_OUTER_BLOCKS(4);
  if constexpr (R > 2) b = FASTMLP_OUTER_BLOCKS(2);
  if constexpr (R > 1) b = FASTMLP_OUTER_BLOCKS(1);
#undef FASTMLP_OUTER_BLOCKS
}

// The outer form splits wide outputs into panels of at most this many vectors
// (64 floats with AVX-512): a block then reuses each weight vector it loads for
// 6+ rows, instead of 3 rows of 7 vectors for 100 outputs, which read the
// packed weights from L2 faster than L2 delivers them.
constexpr int64_t kPanelVectors = 4;

// Output vectors per row for the outer form, or 0 where the dot form serves
// better: from half a vector of outputs on (any number of vectors: they run in
// panels of kPanelVectors).
inline int64_t outer_vectors(int64_t N, int64_t lanes) { return 2 * N >= lanes ? (N + lanes - 1) / lanes : 0; }

// The forward's form for a layer over B rows: the outer form's vectors (see
// outer_vectors), or 0 for the dot form, whichever costs fewer cycles per
// output by a rough model: the dot form does K / lanes multiply-adds, ~8
// operations to sum its lanes and K % lanes scalar ones; the outer form
// K * nv / N (its padding included), plus each of ~2 workers packing the
// weights (~0.6 cycle an element) over its share of the outputs. It puts the
// switch for 784 -> 30 at ~256 rows (measured: the forms are even there) and
// takes the outer form for short rows at any batch (100 -> 128 at 64 rows: the
// dot form spent more on its lane sums than on its 7 multiply-adds an output).
inline int64_t forward_form(int64_t N, int64_t K, int64_t B, int64_t lanes) {
  const int64_t nv = outer_vectors(N, lanes);
  if (nv == 0) return 0;
  const double dot = static_cast<double>(K / lanes) + 8.0 + static_cast<double>(K % lanes);
  const double outer = static_cast<double>(K * nv) / static_cast<double>(N) +
                       0.6 * 2.0 * static_cast<double>(K * nv * lanes) / static_cast<double>(B * N);
  return outer < dot ? nv : 0;
}

// out[b, 0:N] = act(x[b, :] @ w.T + bias) for rows [begin, end). `wt` is the
// packed weights for the outer form (nv vectors per row, in panels: see
// pack_panels) or null for the dot form.
template <typename T, int kBytes>
FASTMLP_ALWAYS_INLINE void narrow_forward_rows_impl(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* wt,
                                                    int64_t nv, const T* bias, bool relu, T* out, int64_t N,
                                                    int64_t K, int64_t begin, int64_t end, int64_t rows_total) {
  if (nv == 0) return dot_forward_rows<T, kBytes>(x, ldx, w, ldw, bias, relu, out, N, K, begin, end);
  constexpr int64_t kLanes = Simd<T, kBytes>::kLanes;
  for (int64_t v0 = 0; v0 < nv; v0 += kPanelVectors) {
    const int64_t n0 = v0 * kLanes, cols = std::min(N - n0, kPanelVectors * kLanes);
    const T* panel = wt + K * n0;
    const T* panel_bias = bias ? bias + n0 : nullptr;
    switch (std::min(kPanelVectors, nv - v0)) {
#define FASTMLP_OUTER_CASE(V)                                                                                 \
  case V:                                                                                                     \
    outer_rows<T, kBytes, V>(x, ldx, panel, panel_bias, relu, out + n0, N, cols, K, begin, end, rows_total); \
    break;
      FASTMLP_OUTER_CASE(1)
      FASTMLP_OUTER_CASE(2)
      FASTMLP_OUTER_CASE(3)
      FASTMLP_OUTER_CASE(4)
#undef FASTMLP_OUTER_CASE
      default: break;
    }
  }
}
FASTMLP_ISA_ENTRY(narrow_forward_rows, narrow_forward_rows_impl)

// ---- weight gradient ----------------------------------------------------------

// dW is computed in blocks of kWeightGradCols features over chunks of
// kWeightGradRows rows of x (32 KB of floats: a chunk stays in L1 while every
// group of gradient rows reads it).
constexpr int64_t kWeightGradCols = 64;
constexpr int64_t kWeightGradRows = 128;

// dW[n0 + r, k0 : k0 + NV lanes] (+)= sum_b g[b, n0 + r] * x[b, k0 : ...]: R
// gradient columns broadcast against NV vectors of input features, summed over
// the batch in order. With `prefetch`, the same columns of the next
// kWeightGradRows rows are fetched while this chunk is summed.
template <typename T, int kBytes, int NV, int R>
FASTMLP_ALWAYS_INLINE void weight_grad_block(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t K,
                                             int64_t B, int64_t n0, int64_t k0, bool accumulate,
                                             int64_t prefetch_rows) {
  using S = Simd<T, kBytes>;
  using V = typename S::Vec;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? S::load(dw + (n0 + r) * K + k0 + j * S::kLanes) : V{};
  for (int64_t b = 0; b < B; ++b) {
    if (b < prefetch_rows) {
      for (int j = 0; j < NV; ++j) __builtin_prefetch(x + (b + B) * ldx + k0 + j * S::kLanes);
    }
    V xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = S::load(x + b * ldx + k0 + j * S::kLanes);
    for (int r = 0; r < R; ++r) {
      const T gv = g[b * ldg + n0 + r];
      for (int j = 0; j < NV; ++j) acc[r][j] += xv[j] * gv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) S::store(dw + (n0 + r) * K + k0 + j * S::kLanes, acc[r][j]);
}

// Every gradient row n of dW for NV vectors of features at k0: groups of kRows,
// then one group of the remaining rows.
template <typename T, int kBytes, int NV>
FASTMLP_ALWAYS_INLINE void weight_grad_columns(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t N,
                                               int64_t K, int64_t B, int64_t k0, bool accumulate,
                                               int64_t prefetch_rows) {
  constexpr int kRows = std::min(6, Simd<T, kBytes>::kAccumulators / NV);
  int64_t n0 = 0;
  // The first group prefetches the next chunk's rows for all the others.
  for (; n0 + kRows <= N; n0 += kRows) {
    const int64_t pf = n0 == 0 ? prefetch_rows : 0;
    weight_grad_block<T, kBytes, NV, kRows>(x, ldx, g, ldg, dw, K, B, n0, k0, accumulate, pf);
  }
  const int64_t pf = n0 == 0 ? prefetch_rows : 0;
  switch (N - n0) {
#define FASTMLP_GRAD_REST(REST)                                                                   \
  case REST:                                                                                      \
    if constexpr (REST < kRows) {                                                                 \
      weight_grad_block<T, kBytes, NV, REST>(x, ldx, g, ldg, dw, K, B, n0, k0, accumulate, pf);  \
    }                                                                                             \
    break;
    FASTMLP_GRAD_REST(1)
    FASTMLP_GRAD_REST(2)
    FASTMLP_GRAD_REST(3)
    FASTMLP_GRAD_REST(4)
    FASTMLP_GRAD_REST(5)
#undef FASTMLP_GRAD_REST
    default: break;
  }
}

// The last columns k0 .. K of dW, fewer than a vector: the vector kernel on
// zero-padded copies of those columns of x (B <= kWeightGradRows rows) and of
// dW (`scratch`: N * lanes). A scalar loop here cost as much as all the vector
// work for 1000 features (8 left over per 16-lane vector, for every n and b).
template <typename T, int kBytes>
FASTMLP_ALWAYS_INLINE void weight_grad_tail(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw, int64_t N,
                                            int64_t K, int64_t B, int64_t k0, bool accumulate, T* scratch) {
  constexpr int64_t kLanes = Simd<T, kBytes>::kLanes;
  const int64_t cols = K - k0;
  T xt[kWeightGradRows * kLanes];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < kLanes; ++j) xt[b * kLanes + j] = j < cols ? x[b * ldx + k0 + j] : T(0);
  if (accumulate) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < kLanes; ++j) scratch[n * kLanes + j] = j < cols ? dw[n * K + k0 + j] : T(0);
  }
  weight_grad_columns<T, kBytes, 1>(xt, kLanes, g, ldg, scratch, N, kLanes, B, int64_t(0), accumulate, int64_t(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < cols; ++j) dw[n * K + k0 + j] = scratch[n * kLanes + j];
}

// dW[:, k] for the features [k_begin, k_end), in blocks of kWeightGradCols,
// the batch in chunks of kWeightGradRows rows, each chunk added onto dW in batch
// order (the same order for any thread count). Every column is a vector lane
// summing over b in order wherever it falls, so how the features are split over
// threads (at whole vectors) does not change the result.

template <typename T, int kBytes>
FASTMLP_ALWAYS_INLINE void narrow_weight_grad_cols_impl(const T* x, int64_t ldx, const T* g, int64_t ldg, T* dw,
                                                        int64_t N, int64_t K, int64_t B, int64_t k_begin,
                                                        int64_t k_end) {
  constexpr int64_t kLanes = Simd<T, kBytes>::kLanes;
  std::vector<T> tail_scratch(k_end % kLanes != 0 ? N * kLanes : 0);
  for (int64_t kb = k_begin; kb < k_end; kb += kWeightGradCols) {
    const int64_t kb_end = std::min(k_end, kb + kWeightGradCols);
    for (int64_t b0 = 0; b0 == 0 || b0 < B; b0 += kWeightGradRows) {  // once even for B == 0: writes zeros
      const int64_t rows = std::min(kWeightGradRows, B - b0);
      const int64_t ahead = std::clamp<int64_t>(B - b0 - rows, 0, kWeightGradRows);
      const T* xb = x + b0 * ldx;
      const T* gb = g + b0 * ldg;
      const bool accumulate = b0 > 0;
      int64_t k0 = kb;
      for (; k0 + 4 * kLanes <= kb_end; k0 += 4 * kLanes)
        weight_grad_columns<T, kBytes, 4>(xb, ldx, gb, ldg, dw, N, K, rows, k0, accumulate, ahead);
      switch ((kb_end - k0) / kLanes) {
#define FASTMLP_GRAD_VECTORS(NV)                                                                   \
  case NV:                                                                                         \
    weight_grad_columns<T, kBytes, NV>(xb, ldx, gb, ldg, dw, N, K, rows, k0, accumulate, ahead); \
    k0 += NV * kLanes;                                                                             \
    break;
        FASTMLP_GRAD_VECTORS(3)
        FASTMLP_GRAD_VECTORS(2)
        FASTMLP_GRAD_VECTORS(1)
#undef FASTMLP_GRAD_VECTORS
        default: break;
      }
      if (k0 < kb_end) {  // only at K's end: ranges start and end on whole vectors
        weight_grad_tail<T, kBytes>(xb, ldx, gb, ldg, dw, N, K, rows, k0, accumulate, tail_scratch.data());
      }
    }
  }
}
FASTMLP_ISA_ENTRY(narrow_weight_grad_cols, narrow_weight_grad_cols_impl)

// ---- entry points ---------------------------------------------------------------

// Whether a layer takes the narrow path: a narrow output, float/double, and an
// input with unit stride along features.
inline bool narrow_eligible(const at::Tensor& x, int64_t out_features, int64_t max_features = kNarrowMax) {
  const auto st = x.scalar_type();
  return out_features <= max_features && (st == at::kFloat || st == at::kDouble) && x.stride(1) == 1 && x.size(0) > 0;
}

// The outer form's weights: w [N, K] (contiguous) transposed into panels of
// kPanelVectors vectors of outputs, panel p ([K, its width], the columns past N
// zeros) at wt + K * (first output of p). K * nv * lanes elements in all.
template <typename T> void pack_panels(const T* w, int64_t N, int64_t K, int64_t nv, int64_t lanes, T* wt) {
  for (int64_t v0 = 0; v0 < nv; v0 += kPanelVectors) {
    const int64_t n0 = v0 * lanes, width = std::min(kPanelVectors, nv - v0) * lanes;
    const int64_t cols = std::min(N - n0, width);
    T* panel = wt + K * n0;
    // 16 features at a time: each row of w is read a cache line at a time, and
    // the 16 panel rows being written stay in L1 (a feature at a time read a
    // line per output, ~13% of a 256-row forward of 1000 -> 100).
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kk = std::min<int64_t>(16, K - k0);
      for (int64_t n = 0; n < cols; ++n) {
        const T* src = w + (n0 + n) * K + k0;
        for (int64_t j = 0; j < kk; ++j) panel[(k0 + j) * width + n] = src[j];
      }
      for (int64_t j = 0; j < kk; ++j)
        for (int64_t n = cols; n < width; ++n) panel[(k0 + j) * width + n] = T(0);
    }
  }
}

// The packed weights of a chain's outer-form layers (nv[l] > 0; layer l's at
// pack_at[l], pack_at.back() elements in all), or null when there are none. The
// buffer is kept by the calling thread up to kKeptPackBytes (allocating ~100 KB
// costs ~7 µs), else `once` holds it. `layers[l]` has w (contiguous [N, K]), N, K.
template <typename T, typename Layers>
const T* pack_outer_weights(const Layers& layers, const std::vector<int64_t>& nv, const std::vector<int64_t>& pack_at,
                            int64_t lanes, std::vector<T>& once) {
  if (pack_at.back() == 0) return nullptr;
  thread_local std::vector<T> kept;
  std::vector<T>& buffer = pack_at.back() * static_cast<int64_t>(sizeof(T)) <= kKeptPackBytes ? kept : once;
  buffer.resize(pack_at.back());
  for (size_t l = 0; l < nv.size(); ++l) {
    if (nv[l] > 0) pack_panels<T>(layers[l].w, layers[l].N, layers[l].K, nv[l], lanes, buffer.data() + pack_at[l]);
  }
  return buffer.data();
}

// One layer of a narrow chain: out[B, N] = act(in @ w.T + bias), w contiguous [N, K].
template <typename T> struct NarrowLayer {
  const T* w = nullptr;
  const T* bias = nullptr;  // or nullptr
  T* out = nullptr;         // contiguous [B, N]: the next layer's input
  int64_t N = 0, K = 0;
  bool relu = false;
};

// The forward of a chain of narrow layers over x [B, K0] (row stride ldx, unit
// column stride): the rows are split evenly over the workers (every row is
// computed the same way whatever the split or thread count); each packs the
// weights once (outer form), then runs its rows through every layer a tile at
// a time, so a tile's activations are still in cache when the next layer reads them.
template <typename T>
void narrow_chain_forward(const T* x, int64_t ldx, int64_t B, const std::vector<NarrowLayer<T>>& layers) {
  const size_t L = layers.size();
  const int bytes = vector_bytes();
  const int64_t lanes = bytes / static_cast<int64_t>(sizeof(T));
  std::vector<int64_t> nv(L), pack_at(L + 1, 0);
  int64_t macs_per_row = 0;
  for (size_t l = 0; l < L; ++l) {
    nv[l] = forward_form(layers[l].N, layers[l].K, B, lanes);
    pack_at[l + 1] = pack_at[l] + layers[l].K * nv[l] * lanes;
    macs_per_row += layers[l].K * layers[l].N;
  }
  // Tiles of whole row blocks of the first layer with at least kMinTaskMacs
  // multiply-adds, the smallest share of rows a worker takes: waking a second
  // thread costs more than a smaller share of work saves (batch 1-8 run inline).
  // (24 rows: whole blocks of every panel width, 6, 8 or 12 rows with AVX-512.)
  const int64_t block = nv[0] > kPanelVectors ? 24 : nv[0] > 0 ? outer_block_rows(bytes, nv[0]) : 4;
  const int64_t min_rows = (kMinTaskMacs + macs_per_row - 1) / std::max<int64_t>(macs_per_row, 1);
  const int64_t tile = (std::clamp<int64_t>(min_rows, 1, kChainTileRows) + block - 1) / block * block;
  // Rows, not tiles, are split: 256 rows as 11 tiles of 24 gave the workers 6 and 5.
  at::parallel_for(0, B, tile, [&](int64_t begin, int64_t end) {
    // Each worker packs its own copy: reading one packed by another core
    // costs more than packing (~4 µs for 784 x 30).
    std::vector<T> once;
    const T* packed = pack_outer_weights<T>(layers, nv, pack_at, lanes, once);
    for (int64_t r0 = begin; r0 < end; r0 += tile) {
      const int64_t r1 = std::min(end, r0 + tile);
      const T* in = x;
      int64_t ld = ldx;
      for (size_t l = 0; l < L; ++l) {
        const NarrowLayer<T>& layer = layers[l];
        // Past this tile, a hidden layer's rows are not computed yet: no prefetch there.
        narrow_forward_rows<T>(in, ld, layer.w, layer.K, nv[l] > 0 ? packed + pack_at[l] : nullptr, nv[l], layer.bias,
                               layer.relu, layer.out, layer.N, layer.K, r0, r1, l == 0 ? end : r1);
        in = layer.out;
        ld = layer.N;
      }
    }
  });
}

template <typename T>
void narrow_forward(const at::Tensor& x, const at::Tensor& w, const T* bias, bool relu, at::Tensor& out) {
  const at::Tensor wc = w.contiguous();
  NarrowLayer<T> layer;
  layer.w = wc.const_data_ptr<T>();
  layer.bias = bias;
  layer.out = out.data_ptr<T>();
  layer.N = w.size(0);
  layer.K = w.size(1);
  layer.relu = relu;
  narrow_chain_forward<T>(x.const_data_ptr<T>(), x.stride(0), x.size(0), {layer});
}

// g: [B, N] masked output gradient (row stride g.stride(0), unit column
// stride); dw: [N, K] contiguous. Parallel over ranges of whole cache lines of
// input features, so the threads get equal shares: 784 features as 64-wide
// blocks split 7 : 6 over two threads (448 : 336 features), one thread waiting
// a quarter of the time.
template <typename T>
void narrow_weight_grad(const at::Tensor& x, const at::Tensor& g, at::Tensor& dw) {
  const int64_t B = x.size(0), K = x.size(1), N = dw.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  constexpr int64_t kUnit = kCacheLine / static_cast<int64_t>(sizeof(T));  // whole vectors on every ISA
  const int64_t units = (K + kUnit - 1) / kUnit;
  // At least kMinTaskMacs multiply-adds per task, as in the forward.
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(B * N * kUnit, 1));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    narrow_weight_grad_cols<T>(xp, x.stride(0), gp, g.stride(0), dwp, N, K, B, begin * kUnit,
                               std::min(K, end * kUnit));
  });
}

}  // namespace fastmlp::cpu
