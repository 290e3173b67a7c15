// Portable SIMD for the CPU kernels: GCC vector extensions sized per ISA, and a
// run-time choice of ISA (AVX-512, AVX2, baseline) made once per process.
//
// A register-blocked kernel needs to know its vector width at compile time, to
// size its accumulator tile to the register file (32 zmm with AVX-512, 16 ymm
// with AVX2): one template, instantiated per ISA by FASTMLP_ISA_ENTRY, and the
// instantiation picked at run time. FASTMLP_CPU_ISA=avx2|baseline forces a
// narrower path (tests use it to check every path on one machine).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

// The kernels' vector helpers are always inlined into code compiled for their
// ISA; GCC's note that their ABI would differ across ISAs does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTMLP_X86_DISPATCH 1
#define FASTMLP_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTMLP_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
// For simple loops the compiler vectorises on its own: one clone per ISA.
#define FASTMLP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMLP_TARGET_AVX512
#define FASTMLP_TARGET_AVX2
#define FASTMLP_CPU_CLONES
#endif

#if defined(__GNUC__)
#define FASTMLP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTMLP_ALWAYS_INLINE inline
#endif

namespace fastmlp::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// Accumulators a kernel keeps in registers, leaving room for its operands: 32
// vector registers with AVX-512, 16 otherwise.
constexpr int accumulator_budget(int vector_bytes) { return vector_bytes == 64 ? 24 : 12; }

// The widest ISA this CPU runs, unless FASTMLP_CPU_ISA asks for a narrower one.
inline Isa detected_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#ifdef FASTMLP_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      best = Isa::kAvx512;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      best = Isa::kAvx2;
    }
#endif
    const char* forced = std::getenv("FASTMLP_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return Isa::kBaseline;
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

// Vectors of kBytes bytes: a zmm (64), ymm (32) or xmm (16) register.
template <typename T, int kBytes> struct Simd {
  typedef T Vec __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
  // Accumulators a kernel keeps in registers, leaving room for its operands:
  // 32 vector registers with AVX-512, 16 otherwise.
  static constexpr int kAccumulators = kBytes == 64 ? 24 : 12;

  static FASTMLP_ALWAYS_INLINE Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static FASTMLP_ALWAYS_INLINE void store(T* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
  static FASTMLP_ALWAYS_INLINE Vec splat(T s) { return Vec{} + s; }

  // The sum of the lanes as a tree of halves (upper half added to the lower,
  // repeated): log2(lanes) vector adds instead of a chain of lanes - 1 scalar
  // ones, and the same order wherever it is used.
  static FASTMLP_ALWAYS_INLINE T sum(Vec v) {
    if constexpr (kLanes == 1) {
      return v[0];
    } else {
      using Half = Simd<T, kBytes / 2>;
      typename Half::Vec lo, hi;
      std::memcpy(&lo, &v, sizeof(lo));
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
      return Half::sum(lo + hi);
    }
  }
};

}  // namespace fastmlp::cpu

// Defines `name<T>(args...)` that runs the always-inline kernel template
// `impl<T, kBytes>(args...)` compiled for the best ISA of this CPU: 64-byte
// vectors with AVX-512, 32 with AVX2, 16 otherwise.
#ifdef FASTMLP_X86_DISPATCH
#define FASTMLP_ISA_ENTRY(name, impl)                                                                  \
  template <typename T, typename... Args> FASTMLP_TARGET_AVX512 void name##_avx512(Args... args) {     \
    impl<T, 64>(args...);                                                                            \
  }                                                                                                  \
  template <typename T, typename... Args> FASTMLP_TARGET_AVX2 void name##_avx2(Args... args) {         \
    impl<T, 32>(args...);                                                                            \
  }                                                                                                  \
  template <typename T, typename... Args> void name##_baseline(Args... args) { impl<T, 16>(args...); } \
  template <typename T, typename... Args> void name(Args... args) {                                  \
    switch (::fastmlp::cpu::detected_isa()) {                                                        \
      case ::fastmlp::cpu::Isa::kAvx512: return name##_avx512<T>(args...);                           \
      case ::fastmlp::cpu::Isa::kAvx2: return name##_avx2<T>(args...);                               \
      default: return name##_baseline<T>(args...);                                                   \
    }                                                                                                \
  }
#else
#define FASTMLP_ISA_ENTRY(name, impl) \
  template <typename T, typename... Args> void name(Args... args) { impl<T, 16>(args...); }
#endif
