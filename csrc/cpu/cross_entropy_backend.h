// CPU kernels of the softmax cross-entropy (log-softmax and NLL in one pass):
// each row's loss and, for a reduced loss, d loss / d logits in the same pass
// over the row; a backward that recomputes the gradient scaled per row.
//
// float / double rows run on 64-byte vectors (vec_math.h's exp), one row at a
// time in three sweeps over the row, which stays in L1: max, exp and sum (the
// exps kept in the gradient's place), then the loss terms and the gradient.
// Half types run the scalar row functions of common/loss_math.h.
// Determinism: rows are summed per chunk of a size fixed by C (not by the
// thread count), chunks in order, in double.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cross_entropy_ops.h"
#include "common/loss_math.h"
#include "cpu/simd.h"  // FASTMLP_CPU_CLONES
#include "cpu/vec_math.h"

namespace fastmlp::cpu {

// Logits per chunk of rows (rows per chunk = max(1, kCeChunkElems / C)).
constexpr int64_t kCeChunkElems = 4096;

inline int64_t ce_rows_per_chunk(int64_t classes) {
  return classes >= kCeChunkElems ? 1 : kCeChunkElems / (classes > 0 ? classes : 1);
}

namespace cevec {

template <typename T> struct LaneInt;
template <> struct LaneInt<float> {
  using vec = vec::i32x16;
  using elem = int32_t;
};
template <> struct LaneInt<double> {
  using vec = vec::i64x8;
  using elem = int64_t;
};

// The lane indices 0, 1, ...
template <typename T> FASTMLP_ALWAYS_INLINE typename LaneInt<T>::vec iota() {
  typename LaneInt<T>::vec v{};
  for (int i = 0; i < vec::Lanes<T>::count; ++i) v[i] = i;
  return v;
}

// n (< lanes) values from p, `fill` in the other lanes. Reads the whole vector
// in place when it stays inside [p, end) (the rest of the tensor).
template <typename T>
FASTMLP_ALWAYS_INLINE typename vec::Lanes<T>::vec load_part(const T* p, int64_t n, const T* end, T fill) {
  using V = typename vec::Lanes<T>::vec;
  constexpr int kLanes = vec::Lanes<T>::count;
  const auto mask = iota<T>() < static_cast<typename LaneInt<T>::elem>(n);
  if (p + kLanes <= end) return vec::select(mask, vec::load(p), vec::splat(fill));
  V v = vec::splat(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

template <typename T> FASTMLP_ALWAYS_INLINE void store_part(T* p, typename vec::Lanes<T>::vec v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

template <typename V> FASTMLP_ALWAYS_INLINE V vmax(V a, V b) { return vec::select((a != a) | (a > b), a, b); }

// Horizontal max (NaN-propagating) and sum of a vector as a tree of halves
// (upper half into the lower, repeated): log2(lanes) dependent steps instead of
// a chain of lanes - 1, in the same order on every call.
template <typename T, int kBytes> FASTMLP_ALWAYS_INLINE T tree_max(typename Simd<T, kBytes>::Vec v) {
  if constexpr (Simd<T, kBytes>::kLanes == 1) {
    return v[0];
  } else {
    using Half = Simd<T, kBytes / 2>;
    typename Half::Vec lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return tree_max<T, kBytes / 2>(vmax(lo, hi));
  }
}

template <typename T> FASTMLP_ALWAYS_INLINE T hmax(typename vec::Lanes<T>::vec v) { return tree_max<T, 64>(v); }
template <typename T> FASTMLP_ALWAYS_INLINE T hsum(typename vec::Lanes<T>::vec v) { return Simd<T, 64>::sum(v); }

}  // namespace cevec

// What a sweep over rows needs. weight: the class weights padded with zeros to
// a whole number of vectors (or nullptr).
template <typename T> struct CeRows {
  const T* x = nullptr;
  const T* x_end = nullptr;  // one past the last logit
  int64_t classes = 0;
  const int64_t* target_index = nullptr;  // class indices, or
  const T* target_prob = nullptr;         // probabilities [rows, classes]
  const T* y_end = nullptr;               // one past the last probability
  const T* weight = nullptr;
  CeConstants<T> k;
  int64_t ignore_index = -100;
  // the gradient of row r is scaled by scale * (grad_rows ? grad_rows[r] : 1)
  T scale = T(1);
  const T* grad_rows = nullptr;
  T* loss_rows = nullptr;  // per-row losses, or nullptr
  T* grad = nullptr;       // d loss / d x, or nullptr
};


// Rows of at most this many classes with class index targets run kLanes rows at
// a time (one row per lane), through a transposed copy of the block.
constexpr int64_t kCeBlockMaxClasses = 32;

namespace cevec {

// log(s) for s >= 1 (the softmax sum; NaN stays NaN): s = 2^k * u, u in [1, 2).
FASTMLP_ALWAYS_INLINE vec::f32x16 log_ge1(vec::f32x16 s) {
  vec::i32x16 bits;
  std::memcpy(&bits, &s, sizeof(bits));
  const vec::f32x16 k = __builtin_convertvector((bits >> 23) - 127, vec::f32x16);
  bits = (bits & 0x7fffff) | 0x3f800000;
  vec::f32x16 u;
  std::memcpy(&u, &bits, sizeof(u));
  const vec::f32x16 r = vec::log_1_to_2(u) + k * -2.12194440e-4f + k * 0.693359375f;
  return vec::select(s != s, s, r);
}
FASTMLP_ALWAYS_INLINE vec::f64x8 log_ge1(vec::f64x8 s) {
  vec::i64x8 bits;
  std::memcpy(&bits, &s, sizeof(bits));
  const vec::f64x8 k = __builtin_convertvector((bits >> 52) - 1023, vec::f64x8);
  bits = (bits & 0xfffffffffffffLL) | 0x3ff0000000000000LL;
  vec::f64x8 u;
  std::memcpy(&u, &bits, sizeof(u));
  const vec::f64x8 r = vec::log_1_to_2(u) + k * 1.90821492927058770002e-10 + k * 6.93147180369123816490e-01;
  return vec::select(s != s, s, r);
}

}  // namespace cevec

// Rows [r0, r0 + kLanes) with class index targets and at most
// kCeBlockMaxClasses classes, one row per lane; returns the sum of their losses.
template <typename T> FASTMLP_ALWAYS_INLINE double ce_index_block(const CeRows<T>& a, int64_t r0) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int L = Lanes<T>::count;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t C = a.classes;
  alignas(64) T xt[kCeBlockMaxClasses * L];  // xt[c * L + j] = x[r0 + j, c]
  alignas(64) T et[kCeBlockMaxClasses * L];  // exp(x - max), then the gradient
  alignas(64) T lane_wt[L], lane_xt[L], lane_scale[L];
  int64_t lane_t[L];
  const T* x = a.x + r0 * C;
  for (int j = 0; j < L; ++j) {
    for (int64_t c = 0; c < C; ++c) xt[c * L + j] = x[j * C + c];
  }
  for (int j = 0; j < L; ++j) {
    const int64_t t = a.target_index[r0 + j];
    const bool ignored = t == a.ignore_index;
    lane_t[j] = ignored ? -1 : t;
    lane_wt[j] = ignored ? T(0) : (a.weight ? a.weight[t] : T(1));
    lane_xt[j] = ignored ? T(0) : x[j * C + t];
    lane_scale[j] = ignored ? T(0) : a.scale * (a.grad_rows ? a.grad_rows[r0 + j] : T(1));
  }
  V m = splat(-kInf);
  for (int64_t c = 0; c < C; ++c) m = cevec::vmax(m, load(xt + c * L));
  V sum = splat(T(0));
  for (int64_t c = 0; c < C; ++c) {
    const V e = exp_nonpositive(load(xt + c * L) - m);
    sum += e;
    store(et + c * L, e);
  }
  const V lse = m + cevec::log_ge1(sum);
  const V wt = load(lane_wt);
  const bool smoothing = a.k.smoothing > T(0);
  V loss = wt * (T(1) - a.k.smoothing) * (lse - load(lane_xt));
  if (smoothing) {
    V smooth = splat(T(0));
    for (int64_t c = 0; c < C; ++c) smooth += (a.weight ? a.weight[c] : T(1)) * (lse - load(xt + c * L));
    loss += smooth * a.k.smooth_per_class;
  }
  // ignored lanes: loss 0 (their w_t and scale are 0, but x may hold inf / NaN)
  V ignored_mask_src{};
  for (int j = 0; j < L; ++j) ignored_mask_src[j] = lane_t[j] < 0 ? T(1) : T(0);
  const auto ignored = ignored_mask_src != T(0);
  loss = select(ignored, splat(T(0)), loss);
  if (a.loss_rows)
    for (int j = 0; j < L; ++j) a.loss_rows[r0 + j] = loss[j];
  if (a.grad) {
    const V row_scale = load(lane_scale);
    const V qsum = wt * (T(1) - a.k.smoothing) + a.k.smooth_per_class * a.k.weight_sum;
    const V p_scale = qsum * row_scale / sum;
    for (int64_t c = 0; c < C; ++c) {
      const T w_c = a.weight ? a.weight[c] : T(1);
      const V gv = load(et + c * L) * p_scale - row_scale * (a.k.smooth_per_class * w_c);
      store(et + c * L, select(ignored, splat(T(0)), gv));  // ignored rows: exactly 0
    }
    T* g = a.grad + r0 * C;
    for (int j = 0; j < L; ++j) {
      for (int64_t c = 0; c < C; ++c) g[j * C + c] = et[c * L + j];
      if (lane_t[j] >= 0) g[j * C + lane_t[j]] -= lane_scale[j] * (T(1) - a.k.smoothing) * lane_wt[j];
    }
  }
  return static_cast<double>(Simd<T, 64>::sum(loss));
}

// Rows [rb, re): writes what `a` asks for, returns the sum of the row losses.
template <typename T> FASTMLP_ALWAYS_INLINE double ce_rows_lanes(const CeRows<T>& a, int64_t rb, int64_t re) {
  using namespace vec;
  using V = typename Lanes<T>::vec;
  constexpr int kLanes = Lanes<T>::count;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t C = a.classes;
  const bool index = a.target_index != nullptr;
  const bool smoothing = a.k.smoothing > T(0);
  double total = 0;
  int64_t r = rb;
  if (index && C <= kCeBlockMaxClasses) {
    for (; r + kLanes <= re; r += kLanes) total += ce_index_block(a, r);
  }
  for (; r < re; ++r) {
    const T* x = a.x + r * C;
    T* g = a.grad ? a.grad + r * C : nullptr;
    const int64_t t = index ? a.target_index[r] : 0;
    if (index && t == a.ignore_index) {
      if (a.loss_rows) a.loss_rows[r] = T(0);
      if (g) for (int64_t c = 0; c < C; ++c) g[c] = T(0);
      continue;
    }
    const T* y = index ? nullptr : a.target_prob + r * C;
    // sweep 1: the max
    V vm = splat(-kInf);
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) vm = cevec::vmax(vm, load(x + c));
    if (c < C) vm = cevec::vmax(vm, cevec::load_part(x + c, C - c, a.x_end, -kInf));
    const T m = cevec::hmax<T>(vm);
    // sweep 2: exp(x - m), its sum (and Q for probability targets); the exps go
    // where the gradient will be
    V vs = splat(T(0)), vq = splat(T(0));
    for (c = 0; c < C; c += kLanes) {
      const int64_t n = C - c < kLanes ? C - c : kLanes;
      const auto mask = cevec::iota<T>() < static_cast<typename cevec::LaneInt<T>::elem>(n);
      const V xv = n == kLanes ? load(x + c) : cevec::load_part(x + c, n, a.x_end, T(0));
      const V e = select(mask, exp_nonpositive(xv - m), splat(T(0)));
      vs += e;
      if (!index) {
        const V w = a.weight ? load(a.weight + c) : splat(T(1));
        const V yv = n == kLanes ? load(y + c) : cevec::load_part(y + c, n, a.y_end, T(0));
        const V q = smoothing ? w * (yv * (T(1) - a.k.smoothing) + a.k.smooth_per_class) : w * yv;
        vq += select(mask, q, splat(T(0)));
      }
      if (g) {
        if (n == kLanes) store(g + c, e); else cevec::store_part(g + c, e, n);
      }
    }
    const T sum = cevec::hsum<T>(vs);
    const T lse = m + std::log(sum);
    const T w_t = index ? (a.weight ? a.weight[t] : T(1)) : T(0);
    const T qsum = index ? ce_index_qsum(a.k, w_t) : cevec::hsum<T>(vq);
    const T row_scale = a.scale * (a.grad_rows ? a.grad_rows[r] : T(1));
    const T p_scale = qsum * row_scale / sum;  // gradient = p_scale * e - row_scale * q
    // sweep 3: the loss terms and the gradient
    T loss = index ? (T(1) - a.k.smoothing) * w_t * (lse - x[t]) : T(0);
    if (index && !smoothing) {
      if (g) {
        for (c = 0; c + kLanes <= C; c += kLanes) store(g + c, load(g + c) * p_scale);
        for (; c < C; ++c) g[c] *= p_scale;
        g[t] -= row_scale * w_t;
      }
    } else {
      V vl = splat(T(0));
      for (c = 0; c < C; c += kLanes) {
        const int64_t n = C - c < kLanes ? C - c : kLanes;
        const auto mask = cevec::iota<T>() < static_cast<typename cevec::LaneInt<T>::elem>(n);
        const V xv = n == kLanes ? load(x + c) : cevec::load_part(x + c, n, a.x_end, T(0));
        const V w = a.weight ? load(a.weight + c) : splat(T(1));
        V q;
        if (index) {
          q = w * a.k.smooth_per_class;
        } else {
          const V yv = n == kLanes ? load(y + c) : cevec::load_part(y + c, n, a.y_end, T(0));
          q = smoothing ? w * (yv * (T(1) - a.k.smoothing) + a.k.smooth_per_class) : w * yv;
        }
        vl += select(mask, q * (lse - xv), splat(T(0)));
        if (g) {
          const V e = n == kLanes ? load(g + c) : cevec::load_part(g + c, n, g + n, T(0));
          const V gv = e * p_scale - q * row_scale;
          if (n == kLanes) store(g + c, gv); else cevec::store_part(g + c, gv, n);
        }
      }
      loss += cevec::hsum<T>(vl);
      if (index && g) g[t] -= row_scale * (T(1) - a.k.smoothing) * w_t;
    }
    if (a.loss_rows) a.loss_rows[r] = loss;
    total += loss;
  }
  return total;
}

FASTMLP_CPU_CLONES inline double ce_rows_vec(const CeRows<float>& a, int64_t rb, int64_t re) {
  return ce_rows_lanes(a, rb, re);
}
FASTMLP_CPU_CLONES inline double ce_rows_vec(const CeRows<double>& a, int64_t rb, int64_t re) {
  return ce_rows_lanes(a, rb, re);
}

// Half types: the scalar row functions, float math.
template <typename scalar_t>
double ce_rows_scalar(const CeRows<scalar_t>& a, const CeConstants<float>& k, int64_t rb, int64_t re) {
  const int64_t C = a.classes;
  double total = 0;
  for (int64_t r = rb; r < re; ++r) {
    const scalar_t* x = a.x + r * C;
    scalar_t* g = a.grad ? a.grad + r * C : nullptr;
    float loss = 0;
    if (a.target_index != nullptr && a.target_index[r] == a.ignore_index) {
      if (g) for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(0);
    } else {
      const float row_scale = static_cast<float>(a.scale) * (a.grad_rows ? static_cast<float>(a.grad_rows[r]) : 1.0f);
      loss = a.target_index != nullptr
                 ? ce_index_row<float>(x, C, a.target_index[r], a.weight, k, row_scale, g)
                 : ce_prob_row<float>(x, C, a.target_prob + r * C, a.weight, k, row_scale, g);
    }
    if (a.loss_rows) a.loss_rows[r] = static_cast<scalar_t>(loss);
    total += loss;
  }
  return total;
}

// The sum of the class weights (C without weights), in double: CeConstants' weight_sum.
template <typename scalar_t> double ce_weight_sum(const at::Tensor& weight, int64_t classes) {
  if (!weight.defined()) return static_cast<double>(classes);
  double sum = 0;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  for (int64_t c = 0; c < classes; ++c) sum += static_cast<double>(w[c]);
  return sum;
}

// The class weights as the vector sweeps read them (float / double): padded with
// zeros to whole vectors, held by `padded`.
template <typename T> const T* ce_padded_weight(const at::Tensor& weight, int64_t classes, std::vector<T>& padded) {
  constexpr int kLanes = vec::Lanes<T>::count;
  const T* w = weight.const_data_ptr<T>();
  padded.assign((classes + kLanes - 1) / kLanes * kLanes, T(0));
  for (int64_t c = 0; c < classes; ++c) padded[c] = w[c];
  return padded.data();
}

// The CPU backend of CrossEntropyOps (see common/cross_entropy_ops.h).
struct CpuCrossEntropyKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  // Checks the class indices and returns the mean's denominator: the sum of
  // w_t over the rows not ignored (index targets), the row count (probabilities).
  template <typename scalar_t>
  static double denominator(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight,
                            int64_t ignore_index) {
    return denominator<scalar_t>(x.size(0), x.size(1), target, weight, ignore_index);
  }

  template <typename scalar_t>
  static double denominator(int64_t rows, int64_t classes, const at::Tensor& target, const at::Tensor& weight,
                            int64_t ignore_index) {
    if (!ce_index_target(target)) return static_cast<double>(rows);
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    constexpr int64_t kChunk = 4096;
    const int64_t chunks = (rows + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks, 0.0);
    at::parallel_for(0, chunks, 16, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        double acc = 0;
        for (int64_t r = chunk * kChunk; r < std::min(rows, (chunk + 1) * kChunk); ++r) {
          const int64_t cls = t[r];
          if (cls == ignore_index) continue;
          TORCH_CHECK_INDEX(cls >= 0 && cls < classes, "Target ", cls, " is out of bounds.");
          acc += w ? static_cast<double>(w[cls]) : 1.0;
        }
        partial[chunk] = acc;
      }
    });
    double total = 0;
    for (double p : partial) total += p;
    return total;
  }

  // One sweep over every row; returns the sum of the row losses.
  template <typename scalar_t>
  static double sweep(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                      double smoothing, double scale, const scalar_t* grad_rows, scalar_t* loss_rows,
                      scalar_t* grad) {
    const int64_t rows = x.size(0), classes = x.size(1);
    if (rows == 0) return 0.0;
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool vectorised = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    const double weight_sum = ce_weight_sum<scalar_t>(weight, classes);
    CeRows<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.x_end = a.x + x.numel();
    a.classes = classes;
    const bool index = ce_index_target(target);
    a.target_index = index ? target.const_data_ptr<int64_t>() : nullptr;
    a.target_prob = index ? nullptr : target.const_data_ptr<scalar_t>();
    a.y_end = index ? nullptr : a.target_prob + target.numel();
    a.ignore_index = ignore_index;
    a.scale = static_cast<scalar_t>(scale);
    a.grad_rows = grad_rows;
    a.loss_rows = loss_rows;
    a.grad = grad;
    std::vector<scalar_t> padded;
    if (weight.defined()) {
      if constexpr (vectorised) {
        a.weight = ce_padded_weight(weight, classes, padded);
      } else {
        a.weight = weight.const_data_ptr<scalar_t>();
      }
    }
    const CeConstants<opmath_t> k =
        ce_constants<opmath_t>(static_cast<opmath_t>(smoothing), classes, static_cast<opmath_t>(weight_sum));
    const int64_t per_chunk = ce_rows_per_chunk(classes);
    const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
    std::vector<double> partial(chunks, 0.0);
    // ~2 ns a logit: a second thread pays off from ~16K logits
    const int64_t grain = std::max<int64_t>(1, (16 * 1024) / (per_chunk * classes));
    at::parallel_for(0, chunks, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t rb = chunk * per_chunk, re = std::min(rows, rb + per_chunk);
        if constexpr (vectorised) {
          CeRows<scalar_t> local = a;
          local.k = k;
          partial[chunk] = ce_rows_vec(local, rb, re);
        } else {
          partial[chunk] = ce_rows_scalar(a, k, rb, re);
        }
      }
    });
    double total = 0;
    for (double p : partial) total += p;
    return total;
  }

  static void forward(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t reduction,
                      int64_t ignore_index, double smoothing, at::Tensor& loss, at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_ce_cpu", [&] {
      const double denom = denominator<scalar_t>(x, target, weight, ignore_index);
      const double scale = reduction == 1 ? 1.0 / denom : 1.0;
      const double total =
          sweep<scalar_t>(x, target, weight, ignore_index, smoothing, scale, nullptr,
                          reduction == 0 ? loss.data_ptr<scalar_t>() : nullptr,
                          grad.defined() ? grad.data_ptr<scalar_t>() : nullptr);
      // mean over no (weight of) rows: 0 / 0 = NaN, as torch
      // (a fresh 0-D CPU tensor: written in place, no fill_ dispatch)
      if (reduction != 0) *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(reduction == 1 ? total / denom : total);
    });
  }

  static void backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& weight, int64_t reduction, int64_t ignore_index, double smoothing,
                       at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastmlp_ce_bwd_cpu", [&] {
      const double denom = denominator<scalar_t>(x, target, weight, ignore_index);
      const scalar_t* go = grad_loss.const_data_ptr<scalar_t>();
      const double scale = reduction == 0 ? 1.0 : static_cast<double>(go[0]) / (reduction == 1 ? denom : 1.0);
      sweep<scalar_t>(x, target, weight, ignore_index, smoothing, scale, reduction == 0 ? go : nullptr, nullptr,
                      grad_input.data_ptr<scalar_t>());
    });
  }
};

}  // namespace fastmlp::cpu
