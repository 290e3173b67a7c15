// Vectorised exp / log1p for the BCE kernel, float and double, on GCC vector
// types (one 512-bit vector, split by the compiler for narrower ISAs). Scalar
// libm calls do not vectorise without -ffast-math, which would break NaN
// semantics. Accuracy: a few ulp over the ranges the BCE kernel uses (exp of
// x <= 0, log1p of e in [0, 1]); checked against torch in tests/test_bce.py.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors only cross always-inlined calls
#endif

namespace fastmlp::cpu::vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int64_t i64x8 __attribute__((vector_size(64)));

// The 64-byte vector of T and its lane count.
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  using vec = f32x16;
  static constexpr int count = 16;
};
template <> struct Lanes<double> {
  using vec = f64x8;
  static constexpr int count = 8;
};

template <typename T> inline __attribute__((always_inline)) typename Lanes<T>::vec splat(T v) {
  return typename Lanes<T>::vec{} + v;
}

template <typename T> inline __attribute__((always_inline)) typename Lanes<T>::vec load(const T* p) {
  typename Lanes<T>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T> inline __attribute__((always_inline)) void store(T* p, typename Lanes<T>::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// mask lanes are 0 or -1 (a vector comparison's result)
template <typename M, typename V> inline __attribute__((always_inline)) V select(M mask, V a, V b) {
  return mask ? a : b;
}

// exp(x) for x <= 0 (Cody-Waite reduction, degree-6 polynomial on
// [-ln2/2, ln2/2]); flushes to 0 below -87.3 (exp's normal range). NaN -> NaN.
inline __attribute__((always_inline)) f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 lo = splat(-87.3f);
  const i32x16 under = x < lo;
  x = select(under, lo, x);
  const f32x16 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f + (-0.5f), i32x16), f32x16);
  // n = round(x / ln2) for x <= 0: truncation of (x/ln2 - 0.5) toward zero.
  f32x16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 ni = __builtin_convertvector(n, i32x16);
  i32x16 bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += ni << 23;  // p * 2^n
  f32x16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return select(under, splat(0.0f), out);
}

// log(u) for u in [1, 2] (Cephes logf reduction to [sqrt(1/2), sqrt(2)]).
inline __attribute__((always_inline)) f32x16 log_1_to_2(f32x16 u) {
  const i32x16 big = u > 1.41421356f;
  const f32x16 m = select(big, u * 0.5f, u);
  const f32x16 k = select(big, splat(1.0f), splat(0.0f));
  const f32x16 z = m - 1.0f;
  f32x16 p = splat(7.0376836292e-2f);
  p = p * z + -1.1514610310e-1f;
  p = p * z + 1.1676998740e-1f;
  p = p * z + -1.2420140846e-1f;
  p = p * z + 1.4249322787e-1f;
  p = p * z + -1.6668057665e-1f;
  p = p * z + 2.0000714765e-1f;
  p = p * z + -2.4999993993e-1f;
  p = p * z + 3.3333331174e-1f;
  const f32x16 z2 = z * z;
  f32x16 y = p * z * z2;
  y = y + k * -2.12194440e-4f;
  y = y - z2 * 0.5f;
  return z + y + k * 0.693359375f;
}


// exp(x) for x <= 0 in double (Cody-Waite reduction with ln2 in two parts,
// Taylor polynomial of degree 13 on [-ln2/2, ln2/2]: the next term is below
// 5e-18); flushes to 0 below -708 (past it the result leaves the normal range).
// NaN -> NaN.
inline __attribute__((always_inline)) f64x8 exp_nonpositive(f64x8 x) {
  const f64x8 lo = splat(-708.0);
  const i64x8 under = x < lo;
  x = select(under, lo, x);
  const f64x8 magic = splat(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
  const f64x8 t = x * 1.4426950408889634 + magic;
  const f64x8 n = t - magic;  // round(x / ln2)
  f64x8 r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  f64x8 p = splat(1.0 / 6227020800.0);  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  // p * 2^n: n (>= -1021 after the clamp) added to the exponent field; the low
  // bits of t hold n, as t and magic share their exponent.
  i64x8 t_bits, magic_bits, bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
  std::memcpy(&bits, &p, sizeof(bits));
  bits += (t_bits - magic_bits) << 52;
  f64x8 out;
  std::memcpy(&out, &bits, sizeof(out));
  out = select(x != x, x, out);  // NaN: t's payload bits would have landed in the exponent
  return select(under, splat(0.0), out);
}

// log(u) for u in [1, 2] in double: u reduced to m in [sqrt(1/2), sqrt(2)],
// log(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172: the odd series
// to s^23 (the next term is below 1e-18 of the sum).
inline __attribute__((always_inline)) f64x8 log_1_to_2(f64x8 u) {
  const i64x8 big = u > 1.4142135623730951;
  const f64x8 m = select(big, u * 0.5, u);
  const f64x8 k = select(big, splat(1.0), splat(0.0));
  const f64x8 s = (m - 1.0) / (m + 1.0);
  const f64x8 z = s * s;
  f64x8 p = splat(1.0 / 23);
  p = p * z + 1.0 / 21;
  p = p * z + 1.0 / 19;
  p = p * z + 1.0 / 17;
  p = p * z + 1.0 / 15;
  p = p * z + 1.0 / 13;
  p = p * z + 1.0 / 11;
  p = p * z + 1.0 / 9;
  p = p * z + 1.0 / 7;
  p = p * z + 1.0 / 5;
  p = p * z + 1.0 / 3;
  const f64x8 two_s = s + s;
  return k * 6.93147180369123816490e-01 + (two_s + two_s * z * p + k * 1.90821492927058770002e-10);
}

// log1p(e) for e in [0, 1] (float or double vectors): log(1 + e) plus the
// rounding error of 1 + e, corrected to first order, so tiny e keep full
// relative accuracy.
template <typename V> inline __attribute__((always_inline)) V log1p_unit(V e) {
  const V u = e + 1;
  const V lost = e - (u - 1);
  return log_1_to_2(u) + lost / u;
}

}  // namespace fastmlp::cpu::vec
