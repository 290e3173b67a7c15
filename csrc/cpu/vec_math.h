// Vectorised float exp / log1p for the BCE kernel, on GCC vector types (one
// 512-bit vector, split by the compiler for narrower ISAs). Scalar libm calls
// do not vectorise without -ffast-math, which would break NaN semantics.
// Accuracy: a few ulp over the ranges the BCE kernel uses (exp of x <= 0,
// log1p of e in [0, 1]); checked against torch in tests/test_bce.py.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors only cross always-inlined calls
#endif

namespace fastmlp::cpu::vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline __attribute__((always_inline)) f32x16 splat(float v) { return f32x16{} + v; }

inline __attribute__((always_inline)) f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

inline __attribute__((always_inline)) f32x16 select(i32x16 mask, f32x16 a, f32x16 b) {  // mask lanes are 0 or -1
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

// log1p(e) for e in [0, 1]: log(1 + e) plus the rounding error of 1 + e,
// corrected to first order, so tiny e keep full relative accuracy.
inline __attribute__((always_inline)) f32x16 log1p_unit(f32x16 e) {
  const f32x16 u = e + 1.0f;
  const f32x16 lost = e - (u - 1.0f);
  return log_1_to_2(u) + lost / u;
}

}  // namespace fastmlp::cpu::vec
