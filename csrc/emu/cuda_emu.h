// CUDA on the CPU, for tests: include this first, then the kernel headers
// (csrc/cuda/*.cuh) compile as plain C++ and launch_kernel() (cuda/launch.cuh)
// runs them with CUDA's execution semantics: every CUDA thread is a fiber,
// __syncthreads() and the warp intrinsics are real rendezvous, and misuse
// (divergent barriers, exited lanes in a warp mask) raises an error.
// The engine is emu_runtime.h; see there for the design.
//
// Memory checking (out-of-bounds, writes to inputs, shared-memory races,
// uninitialized reads) needs the TU compiled with
//   -DFASTMLP_EMU_MEMCHECK=1 -fsanitize=thread --param=tsan-instrument-func-entry-exit=0
// (compile flags only: GCC then calls our __tsan_read/write callbacks on every
// access; no sanitizer runtime is linked) and the device buffers registered
// with fastmlp_emu::BufferScope around the launches.
//
// What kernels must respect to run here (all valid CUDA):
// - dynamic shared memory: `extern __shared__ __align__(16) unsigned char smem[];`
//   in a kernel of namespace fastmlp::cuda (element type unsigned char, name
//   smem; cast to the type needed). Another namespace or name needs a
//   FASTMLP_EMU_DYNAMIC_SMEM(ns, name) line in the harness TU before the kernel
//   header (and -fno-extern-tls-init or FASTMLP_EMU_TLS_INIT_STUB, see below);
//   anonymous namespaces are not supported.
// - __syncthreads(), __syncwarp() and the warp intrinsics are macros here: call
//   them, don't take their address or qualify them (::__syncthreads()).
// - warp intrinsics exchange trivially copyable values of at most 8 bytes.
// - no __CUDA_ARCH__-only code paths (it is not defined), no inline PTX.
// - assert() in a kernel aborts the whole process here (use __trap(), which
//   raises the launch error); printf works.
// - the emulated device is an H100: 1024 threads and 48 KiB of dynamic shared
//   memory per block unless cudaFuncSetAttribute(...MaxDynamicSharedMemorySize)
//   opts in (up to 227 KiB); cudaDevAttrMultiProcessorCount =
//   fastmlp_emu::options().sm_count (132).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc compiles the kernels natively"
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <chrono>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu_runtime.h"

#define FASTMLP_CUDA_EMU 1

// ---- execution-space and storage qualifiers --------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
// thread_local, not static: `extern __shared__ T x[]` must stay valid, and
// `extern thread_local` is (`extern static` is not). Blocks of one launch run
// one at a time per OS thread, so a thread_local is exactly "per block".
#define __shared__ thread_local

// ---- types -------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define FASTMLP_EMU_VEC2(T, name, align)             \
  struct __attribute__((aligned(align))) name {      \
    T x, y;                                          \
  };                                                 \
  inline name make_##name(T x, T y) { return {x, y}; }
#define FASTMLP_EMU_VEC4(T, name, align)                      \
  struct __attribute__((aligned(align))) name {               \
    T x, y, z, w;                                             \
  };                                                          \
  inline name make_##name(T x, T y, T z, T w) { return {x, y, z, w}; }
FASTMLP_EMU_VEC2(float, float2, 8)
FASTMLP_EMU_VEC4(float, float4, 16)
FASTMLP_EMU_VEC2(double, double2, 16)
FASTMLP_EMU_VEC4(double, double4, 32)
FASTMLP_EMU_VEC2(int, int2, 8)
FASTMLP_EMU_VEC4(int, int4, 16)
FASTMLP_EMU_VEC2(unsigned int, uint2, 8)
FASTMLP_EMU_VEC4(unsigned int, uint4, 16)
FASTMLP_EMU_VEC2(long long, longlong2, 16)
#undef FASTMLP_EMU_VEC2
#undef FASTMLP_EMU_VEC4
struct float3 {
  float x, y, z;
};
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// ---- runtime API subset ------------------------------------------------------
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = static_cast<int>(fastmlp_emu::kMaxThreadsPerBlock); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = static_cast<int>(fastmlp_emu::kDefaultSmemPerBlock); return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = fastmlp_emu::options().sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *v = static_cast<int>(fastmlp_emu::kMaxSmemPerBlockOptin);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F> cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > fastmlp_emu::kMaxSmemPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  fastmlp_emu::detail::smem_optin()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ---- built-in variables --------------------------------------------------------
namespace fastmlp_emu::detail {
inline uint3 to_uint3(Dim3 d) { return uint3{d.x, d.y, d.z}; }
inline dim3 to_dim3(Dim3 d) { return dim3(d.x, d.y, d.z); }
}  // namespace fastmlp_emu::detail
#define threadIdx (::fastmlp_emu::detail::to_uint3(::fastmlp_emu::detail::cur_thread_idx()))
#define blockIdx (::fastmlp_emu::detail::to_uint3(::fastmlp_emu::detail::cur_block_idx()))
#define blockDim (::fastmlp_emu::detail::to_dim3(::fastmlp_emu::detail::cur_block_dim()))
#define gridDim (::fastmlp_emu::detail::to_dim3(::fastmlp_emu::detail::cur_grid_dim()))
inline constexpr int warpSize = 32;

// ---- synchronization and warp intrinsics ---------------------------------------
namespace fastmlp_emu::detail {

template <typename T> uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp intrinsics exchange values of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Carries the call site of a warp intrinsic (for error messages).
struct WarpCall {
  Site site;
  uint64_t go(WarpOp op, unsigned mask, uint64_t v, uint8_t size, int arg = 0, int width = 32) const {
    return warp_rendezvous(site, op, mask, v, size, arg, width);
  }
  void syncwarp(unsigned mask = 0xffffffffu) const { go(WarpOp::kSync, mask, 0, 0); }
  template <typename T> T shfl(unsigned mask, T v, int src, int width = 32) const {
    return from_bits<T>(go(WarpOp::kShflIdx, mask, to_bits(v), sizeof(T), src, width));
  }
  template <typename T> T shfl_up(unsigned mask, T v, unsigned delta, int width = 32) const {
    return from_bits<T>(go(WarpOp::kShflUp, mask, to_bits(v), sizeof(T), static_cast<int>(delta), width));
  }
  template <typename T> T shfl_down(unsigned mask, T v, unsigned delta, int width = 32) const {
    return from_bits<T>(go(WarpOp::kShflDown, mask, to_bits(v), sizeof(T), static_cast<int>(delta), width));
  }
  template <typename T> T shfl_xor(unsigned mask, T v, int lane_mask, int width = 32) const {
    return from_bits<T>(go(WarpOp::kShflXor, mask, to_bits(v), sizeof(T), lane_mask, width));
  }
  unsigned ballot(unsigned mask, int pred) const {
    return static_cast<unsigned>(go(WarpOp::kBallot, mask, pred != 0, 4));
  }
  int all(unsigned mask, int pred) const { return static_cast<int>(go(WarpOp::kAll, mask, pred != 0, 4)); }
  int any(unsigned mask, int pred) const { return static_cast<int>(go(WarpOp::kAny, mask, pred != 0, 4)); }
  unsigned reduce_add(unsigned mask, unsigned v) const {
    return static_cast<unsigned>(go(WarpOp::kReduceAdd, mask, v, 4));
  }
  int reduce_add(unsigned mask, int v) const {
    return static_cast<int>(go(WarpOp::kReduceAdd, mask, static_cast<unsigned>(v), 4));
  }
  unsigned reduce_min(unsigned mask, unsigned v) const {
    return static_cast<unsigned>(go(WarpOp::kReduceMinU, mask, v, 4));
  }
  int reduce_min(unsigned mask, int v) const {
    return static_cast<int>(go(WarpOp::kReduceMinS, mask, static_cast<unsigned>(v), 4));
  }
  unsigned reduce_max(unsigned mask, unsigned v) const {
    return static_cast<unsigned>(go(WarpOp::kReduceMaxU, mask, v, 4));
  }
  int reduce_max(unsigned mask, int v) const {
    return static_cast<int>(go(WarpOp::kReduceMaxS, mask, static_cast<unsigned>(v), 4));
  }
  unsigned reduce_and(unsigned mask, unsigned v) const {
    return static_cast<unsigned>(go(WarpOp::kReduceAnd, mask, v, 4));
  }
  unsigned reduce_or(unsigned mask, unsigned v) const { return static_cast<unsigned>(go(WarpOp::kReduceOr, mask, v, 4)); }
  unsigned reduce_xor(unsigned mask, unsigned v) const {
    return static_cast<unsigned>(go(WarpOp::kReduceXor, mask, v, 4));
  }
  template <typename T> unsigned match_any(unsigned mask, T v) const {
    return static_cast<unsigned>(go(WarpOp::kMatchAny, mask, to_bits(v), sizeof(T)));
  }
  template <typename T> unsigned match_all(unsigned mask, T v, int* pred) const {
    const unsigned r = static_cast<unsigned>(go(WarpOp::kMatchAll, mask, to_bits(v), sizeof(T)));
    *pred = r != 0;
    return r;
  }
};

}  // namespace fastmlp_emu::detail

#define FASTMLP_EMU_SITE (::fastmlp_emu::detail::Site{__FILE__, __LINE__})
#define FASTMLP_EMU_WARP (::fastmlp_emu::detail::WarpCall{FASTMLP_EMU_SITE})
#define __syncthreads() \
  ((void)::fastmlp_emu::detail::block_barrier(FASTMLP_EMU_SITE, ::fastmlp_emu::detail::BarOp::kPlain, 0))
#define __syncthreads_count(p) \
  ::fastmlp_emu::detail::block_barrier(FASTMLP_EMU_SITE, ::fastmlp_emu::detail::BarOp::kCount, (p) != 0)
#define __syncthreads_and(p) \
  ::fastmlp_emu::detail::block_barrier(FASTMLP_EMU_SITE, ::fastmlp_emu::detail::BarOp::kAnd, (p) != 0)
#define __syncthreads_or(p) \
  ::fastmlp_emu::detail::block_barrier(FASTMLP_EMU_SITE, ::fastmlp_emu::detail::BarOp::kOr, (p) != 0)
#define __syncwarp(...) FASTMLP_EMU_WARP.syncwarp(__VA_ARGS__)
#define __shfl_sync(...) FASTMLP_EMU_WARP.shfl(__VA_ARGS__)
#define __shfl_up_sync(...) FASTMLP_EMU_WARP.shfl_up(__VA_ARGS__)
#define __shfl_down_sync(...) FASTMLP_EMU_WARP.shfl_down(__VA_ARGS__)
#define __shfl_xor_sync(...) FASTMLP_EMU_WARP.shfl_xor(__VA_ARGS__)
#define __ballot_sync(...) FASTMLP_EMU_WARP.ballot(__VA_ARGS__)
#define __all_sync(...) FASTMLP_EMU_WARP.all(__VA_ARGS__)
#define __any_sync(...) FASTMLP_EMU_WARP.any(__VA_ARGS__)
#define __reduce_add_sync(...) FASTMLP_EMU_WARP.reduce_add(__VA_ARGS__)
#define __reduce_min_sync(...) FASTMLP_EMU_WARP.reduce_min(__VA_ARGS__)
#define __reduce_max_sync(...) FASTMLP_EMU_WARP.reduce_max(__VA_ARGS__)
#define __reduce_and_sync(...) FASTMLP_EMU_WARP.reduce_and(__VA_ARGS__)
#define __reduce_or_sync(...) FASTMLP_EMU_WARP.reduce_or(__VA_ARGS__)
#define __reduce_xor_sync(...) FASTMLP_EMU_WARP.reduce_xor(__VA_ARGS__)
#define __match_any_sync(...) FASTMLP_EMU_WARP.match_any(__VA_ARGS__)
#define __match_all_sync(...) FASTMLP_EMU_WARP.match_all(__VA_ARGS__)
// Lanes of the warp that have not exited (the emulator has no finer notion of
// convergence).
inline unsigned __activemask() { return fastmlp_emu::detail::active_mask(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { fastmlp_emu::detail::device_fail("__trap() called"); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---- memory ------------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// Atomics: fibers never interleave inside one, so a plain read-modify-write is
// atomic. (They are not race-checked; their target is bounds-checked.)
#define FASTMLP_EMU_ATOMIC(name, T, expr)                 \
  inline T name(T* p, T v) {                              \
    fastmlp_emu::detail::check_atomic(p, sizeof(T));      \
    const T old = *p;                                     \
    *p = (expr);                                          \
    return old;                                           \
  }
#define FASTMLP_EMU_ATOMICS_INT(T)                                \
  FASTMLP_EMU_ATOMIC(atomicAdd, T, old + v)                       \
  FASTMLP_EMU_ATOMIC(atomicSub, T, old - v)                       \
  FASTMLP_EMU_ATOMIC(atomicExch, T, v)                            \
  FASTMLP_EMU_ATOMIC(atomicMin, T, v < old ? v : old)             \
  FASTMLP_EMU_ATOMIC(atomicMax, T, v > old ? v : old)             \
  FASTMLP_EMU_ATOMIC(atomicAnd, T, old & v)                       \
  FASTMLP_EMU_ATOMIC(atomicOr, T, old | v)                        \
  FASTMLP_EMU_ATOMIC(atomicXor, T, old ^ v)                       \
  inline T atomicCAS(T* p, T compare, T v) {                      \
    fastmlp_emu::detail::check_atomic(p, sizeof(T));              \
    const T old = *p;                                             \
    if (old == compare) *p = v;                                   \
    return old;                                                   \
  }
FASTMLP_EMU_ATOMICS_INT(int)
FASTMLP_EMU_ATOMICS_INT(unsigned int)
FASTMLP_EMU_ATOMICS_INT(unsigned long long)
FASTMLP_EMU_ATOMICS_INT(long long)
FASTMLP_EMU_ATOMIC(atomicAdd, float, old + v)
FASTMLP_EMU_ATOMIC(atomicAdd, double, old + v)
FASTMLP_EMU_ATOMIC(atomicExch, float, v)
#undef FASTMLP_EMU_ATOMICS_INT
#undef FASTMLP_EMU_ATOMIC
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  fastmlp_emu::detail::check_atomic(p, sizeof(unsigned));
  const unsigned old = *p;
  *p = old >= limit ? 0 : old + 1;
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  fastmlp_emu::detail::check_atomic(p, sizeof(unsigned));
  const unsigned old = *p;
  *p = (old == 0 || old > limit) ? limit : old - 1;
  return old;
}

// ---- math intrinsics -----------------------------------------------------------
// glibc already declares __expf, __logf, ... (its internal aliases), so the
// fast-math intrinsics of that form are macros onto the precise functions.
#define __expf(x) ::expf(x)
#define __exp10f(x) ::exp10f(x)
#define __logf(x) ::logf(x)
#define __log2f(x) ::log2f(x)
#define __log10f(x) ::log10f(x)
#define __sinf(x) ::sinf(x)
#define __cosf(x) ::cosf(x)
#define __tanf(x) ::tanf(x)
#define __powf(x, y) ::powf(x, y)
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return ::sqrtf(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : (a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a)); }
inline float rsqrtf(float a) { return 1.0f / ::sqrtf(a); }
inline double rsqrt(double a) { return 1.0 / ::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return ::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __float2int_rn(float a) { return static_cast<int>(::nearbyintf(a)); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline int __float2int_rd(float a) { return static_cast<int>(::floorf(a)); }
inline int __float2int_ru(float a) { return static_cast<int>(::ceilf(a)); }
inline int __double2int_rn(double a) { return static_cast<int>(::nearbyint(a)); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }
inline int __float_as_int(float a) { return fastmlp_emu::detail::from_bits<int>(fastmlp_emu::detail::to_bits(a)); }
inline unsigned __float_as_uint(float a) {
  return fastmlp_emu::detail::from_bits<unsigned>(fastmlp_emu::detail::to_bits(a));
}
inline float __int_as_float(int a) { return fastmlp_emu::detail::from_bits<float>(fastmlp_emu::detail::to_bits(a)); }
inline float __uint_as_float(unsigned a) {
  return fastmlp_emu::detail::from_bits<float>(fastmlp_emu::detail::to_bits(a));
}
inline long long __double_as_longlong(double a) {
  return fastmlp_emu::detail::from_bits<long long>(fastmlp_emu::detail::to_bits(a));
}
inline double __longlong_as_double(long long a) {
  return fastmlp_emu::detail::from_bits<double>(fastmlp_emu::detail::to_bits(a));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((1ull * a * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((1ll * a * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
// CUDA's global min/max overloads for integers (float ones come from fminf/fmaxf).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }

// ---- dynamic shared memory -----------------------------------------------------
// A kernel's `extern __shared__ __align__(16) unsigned char NAME[];` (in
// namespace NS) becomes `extern thread_local ... NS::NAME[]`; this defines that
// variable with the largest capacity a block may request. Its first smem_bytes
// bytes are poisoned (0xff) at each block start; accesses beyond smem_bytes are
// errors in memcheck builds.
#define FASTMLP_EMU_CAT2(a, b) a##b
#define FASTMLP_EMU_CAT(a, b) FASTMLP_EMU_CAT2(a, b)
#define FASTMLP_EMU_DYNAMIC_SMEM(ns, name)                                                                   \
  namespace ns {                                                                                             \
  inline thread_local __attribute__((aligned(256))) unsigned char name[::fastmlp_emu::kMaxSmemPerBlockOptin]; \
  }                                                                                                          \
  namespace fastmlp_emu::detail {                                                                            \
  inline const bool FASTMLP_EMU_CAT(dyn_smem_registered_, __COUNTER__) =                                     \
      register_dyn_smem([]() -> unsigned char* { return ::ns::name; }, #ns "::" #name);                      \
  }
// GCC (12) routes a block-scope `extern thread_local` through the variable's
// "TLS init function" _ZTH<mangled name> without seeing that our definition is
// constant-initialized, and only weakly references that function: with nothing
// defining it the kernel calls address 0. Either compile the harness TU with
// -fno-extern-tls-init, or define the (no-op) function with this macro, given
// the mangled name ("_ZTHN" <len><ns>... <len><name> "E").
#define FASTMLP_EMU_TLS_INIT_STUB(id, mangled)                                                   \
  extern "C" __attribute__((weak, visibility("hidden"))) void id() __asm__(mangled);             \
  extern "C" void id() {}
FASTMLP_EMU_DYNAMIC_SMEM(fastmlp::cuda, smem)
FASTMLP_EMU_TLS_INIT_STUB(fastmlp_emu_tls_init_fastmlp_cuda_smem, "_ZTHN7fastmlp4cuda4smemE")

// ---- the launch ------------------------------------------------------------------
namespace fastmlp_emu {

// Called by fastmlp::cuda::launch_kernel (cuda/launch.cuh). Arguments convert
// to the kernel's parameter types as in a CUDA launch; every emulated thread
// gets its own copy of them. Throws fastmlp_emu::Error (a std::runtime_error)
// on an invalid configuration or when a check fails.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KernelArgs) == sizeof...(Args), "wrong number of kernel arguments");
  using Params = std::tuple<std::decay_t<KernelArgs>...>;
  struct Ctx {
    void (*kernel)(KernelArgs...);
    const Params* params;
  };
  const Params params(std::forward<Args>(args)...);
  Ctx ctx{kernel, &params};
  detail::LaunchInfo info;
  info.kernel = reinterpret_cast<const void*>(kernel);
  info.signature = __PRETTY_FUNCTION__;
  info.grid = detail::Dim3{grid.x, grid.y, grid.z};
  info.block = detail::Dim3{block.x, block.y, block.z};
  info.smem = smem_bytes;
  info.ctx = &ctx;
  info.invoke = [](void* p) {
    // Runs on the fiber. Copy what the kernel needs onto this fiber's stack
    // before checking starts: the launch's own frame is no device memory.
    const Ctx& c = *static_cast<const Ctx*>(p);
    auto* const k = c.kernel;
    Params local(*c.params);
    detail::enter_kernel_body();
    std::apply(k, local);
  };
  detail::runtime().run_grid(info);
}

}  // namespace fastmlp_emu
