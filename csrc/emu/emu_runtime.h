// Engine of the CUDA CPU emulation (test-only): fibers, the block scheduler,
// barrier/warp-op rendezvous and the memory checker. Included by cuda_emu.h;
// everything is header-only so a test extension is one translation unit.
//
// Execution model
// - Blocks run one after another on the calling OS thread (x fastest, then y,
//   z): deterministic, and a block's static __shared__ arrays can simply be
//   thread_local variables.
// - Each CUDA thread of a block is a cooperative fiber with its own small
//   stack. The scheduler resumes every runnable fiber in linear thread order;
//   a fiber runs until it reaches __syncthreads(), a warp intrinsic, or the
//   end of the kernel. When no fiber can run, the scheduler completes the warp
//   rendezvous whose lanes have all arrived, then the block barrier. If neither
//   is possible the block is stuck (a divergent barrier / warp op): error.
// - Fibers switch with a 15-instruction x86-64 routine (~5 ns); elsewhere, or
//   with FASTMLP_EMU_UCONTEXT=1, with ucontext (~300 ns, a syscall per switch).
//
// Memory checker (only when the TU is built with FASTMLP_EMU_MEMCHECK and the
// flags in cuda_emu.h): GCC's ThreadSanitizer instrumentation turns every
// load/store of the TU into a call to __tsan_readN / __tsan_writeN(addr). We
// define those callbacks ourselves (no sanitizer runtime is linked): while
// kernel code runs on a fiber they classify the address as fiber stack, shared
// memory (the module's TLS block, where __shared__ variables live) or global
// memory (the registered buffers) and check it. An error stops the offending
// fiber and abandons the launch, which then throws std::runtime_error on the
// calling thread. What it catches and what it cannot: see tests/test_emu.py.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

// Runtime code that may execute on a fiber while kernel code is checked must
// not be instrumented itself (its own bookkeeping would look like wild accesses).
#define FASTMLP_EMU_NOSAN __attribute__((no_sanitize_thread, no_sanitize_address))

#if defined(__x86_64__) && defined(__linux__)
#define FASTMLP_EMU_ASM_SWITCH 1
// fastmlp_emu_switch_stack(void** save_sp, void* load_sp): push the callee-saved
// registers, store rsp in *save_sp, load load_sp, pop and return into the other
// context. A new fiber's stack is prepared so that this `ret` lands in the
// trampoline with the entry function in r12. Weak + hidden: every TU including
// this header emits it, the linker keeps one, and it never leaks out of the .so.
__asm__(
    ".text\n"
    ".weak fastmlp_emu_switch_stack\n"
    ".hidden fastmlp_emu_switch_stack\n"
    ".type fastmlp_emu_switch_stack,@function\n"
    ".p2align 4\n"
    "fastmlp_emu_switch_stack:\n"
    "  endbr64\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size fastmlp_emu_switch_stack, .-fastmlp_emu_switch_stack\n"
    ".weak fastmlp_emu_fiber_trampoline\n"
    ".hidden fastmlp_emu_fiber_trampoline\n"
    ".type fastmlp_emu_fiber_trampoline,@function\n"
    ".p2align 4\n"
    "fastmlp_emu_fiber_trampoline:\n"
    "  .cfi_startproc\n"
    "  .cfi_undefined rip\n"  // backtraces stop here: bottom of a fiber stack
    "  callq *%r12\n"
    "  ud2\n"
    "  .cfi_endproc\n"
    ".size fastmlp_emu_fiber_trampoline, .-fastmlp_emu_fiber_trampoline\n");
extern "C" void fastmlp_emu_switch_stack(void** save_sp, void* load_sp);
extern "C" void fastmlp_emu_fiber_trampoline();
#endif

namespace fastmlp_emu {

// Emulated device limits (an H100).
inline constexpr size_t kDefaultSmemPerBlock = 48 * 1024;  // without cudaFuncSetAttribute opt-in
inline constexpr size_t kMaxSmemPerBlockOptin = 232448;    // 227 KiB
inline constexpr unsigned kMaxThreadsPerBlock = 1024;

// Per-OS-thread switches of the checker (defaults from the environment:
// FASTMLP_EMU_RACECHECK=0, FASTMLP_EMU_INITCHECK=0, FASTMLP_EMU_BOUNDSCHECK=0).
struct Options {
  bool check_races = true;   // shared-memory races; global write/write conflicts
  bool check_uninit = true;  // reads of shared memory / kWriteFirst buffers never written
  bool check_bounds = true;  // global accesses outside every registered buffer
  int sm_count = 132;        // cudaDevAttrMultiProcessorCount
};

inline Options& options() {
  static thread_local Options o = [] {
    Options d;
    auto off = [](const char* var) {
      const char* v = std::getenv(var);
      return v != nullptr && std::strcmp(v, "0") == 0;
    };
    d.check_races = !off("FASTMLP_EMU_RACECHECK");
    d.check_uninit = !off("FASTMLP_EMU_INITCHECK");
    d.check_bounds = !off("FASTMLP_EMU_BOUNDSCHECK");
    return d;
  }();
  return o;
}

// How kernels may use a registered ("device") buffer.
enum class Access : uint8_t {
  kReadOnly,   // inputs: any write is an error
  kReadWrite,  // initialized by the host, read and written by kernels
  kWriteFirst  // outputs / workspaces from torch.empty: a read of a byte no kernel wrote is an error
};

struct BufferSpec {
  std::string name;
  const void* data = nullptr;
  size_t bytes = 0;
  size_t elem_size = 1;
  Access access = Access::kReadOnly;
};

// Counters, e.g. to check that the memory checker saw the kernels' accesses.
struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0, checked_accesses = 0;
};

// Always derived from std::runtime_error (torch surfaces it as RuntimeError).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct Site {
  const char* file;
  int line;
};

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone, kFailed };
enum class BarOp : uint8_t { kPlain, kCount, kAnd, kOr };
enum class WarpOp : uint8_t {
  kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAll, kAny, kReduceAdd, kReduceMinS, kReduceMinU,
  kReduceMaxS, kReduceMaxU, kReduceAnd, kReduceOr, kReduceXor, kMatchAny, kMatchAll
};

inline const char* warp_op_name(WarpOp op) {
  static const char* const names[] = {
      "__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
      "__all_sync", "__any_sync", "__reduce_add_sync", "__reduce_min_sync", "__reduce_min_sync",
      "__reduce_max_sync", "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync",
      "__match_any_sync", "__match_all_sync"};
  return names[static_cast<int>(op)];
}
inline const char* bar_op_name(BarOp op) {
  static const char* const names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                      "__syncthreads_or"};
  return names[static_cast<int>(op)];
}

struct Fiber {
  void* sp = nullptr;     // saved stack pointer (asm switch)
  ucontext_t* uc = nullptr;  // saved context (ucontext switch)
  uintptr_t stack_lo = 0, stack_hi = 0;
  unsigned linear = 0;
  Dim3 tid;
  State state = State::kDone;
  bool in_body = false;  // kernel code (not emulator code) is on this fiber: check its accesses
  Site site{};           // where it waits
  // block barrier
  BarOp bar_op = BarOp::kPlain;
  int pred = 0, bar_result = 0;
  // warp rendezvous
  WarpOp warp_op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint8_t size = 0;
  uint64_t value = 0, result = 0;
};

struct LaunchInfo {
  const void* kernel = nullptr;
  const char* signature = nullptr;  // __PRETTY_FUNCTION__ of the launch: kernel parameter types
  Dim3 grid, block;
  size_t smem = 0;
  void (*invoke)(void*) = nullptr;  // runs the kernel for the current fiber
  void* ctx = nullptr;
};

// Last write to one byte of a registered buffer: epoch (0 = never) and global thread id.
struct GlobalShadow {
  uint32_t epoch = 0, writer = 0;
};
// Last write and last read(s) of one byte of shared memory, with their sync
// interval (block barrier epoch; warp __syncwarp count).
struct SmemShadow {
  uint32_t w_epoch = 0, r_epoch = 0;
  uint16_t writer = 0, reader = 0, w_ws = 0, r_ws = 0;
};
inline constexpr uint16_t kManyReaders = 0xffff;

struct Buffer {
  BufferSpec spec;
  uintptr_t lo = 0, hi = 0;
  std::vector<GlobalShadow> shadow;  // writable buffers, memcheck builds
};

// Dynamic shared memory: the `extern __shared__ unsigned char name[]` arrays of
// the kernels resolve to thread_local buffers defined by
// FASTMLP_EMU_DYNAMIC_SMEM(ns, name); each registers a getter for its
// per-thread address.
using SmemGetter = unsigned char* (*)();
inline std::vector<std::pair<SmemGetter, const char*>>& dyn_smem_registry() {
  static std::vector<std::pair<SmemGetter, const char*>> r;
  return r;
}
inline bool register_dyn_smem(SmemGetter g, const char* name) {
  dyn_smem_registry().emplace_back(g, name);
  return true;
}

inline std::unordered_map<const void*, size_t>& smem_optin() {
  static thread_local std::unordered_map<const void*, size_t> m;
  return m;
}

inline std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string strprintf(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

inline std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && d != nullptr ? d : name;
  std::free(d);
  return s;
}

// "0-15,32,40-46:2" (a:b:s = a to b step s) from sorted ids.
inline std::string format_ids(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    const unsigned step = i + 1 < ids.size() ? ids[i + 1] - ids[i] : 1;
    while (j + 1 < ids.size() && ids[j + 1] - ids[j] == step) ++j;
    if (!s.empty()) s += ",";
    if (j == i || (step != 1 && j == i + 1)) {
      j = i;
      s += std::to_string(ids[i]);
    } else {
      s += std::to_string(ids[i]) + "-" + std::to_string(ids[j]) + (step == 1 ? "" : ":" + std::to_string(step));
    }
    i = j + 1;
  }
  return s;
}

inline std::string short_file(const char* f) {
  std::string s = f;
  const size_t p = s.rfind("csrc/");
  if (p != std::string::npos) return s.substr(p + 5);
  const size_t q = s.rfind('/');
  return q == std::string::npos ? s : s.substr(q + 1);
}

// Address of this module's TLS block in the calling thread, its size, its
// loaded segments, and (lazily) the names of its TLS symbols, to classify and
// name shared-memory addresses.
struct ModuleInfo {
  std::string path;
  uintptr_t tls_lo = 0, tls_hi = 0;
  std::vector<std::pair<uintptr_t, uintptr_t>> segments;
  bool symbols_loaded = false;
  uintptr_t load_bias = 0;
  struct Sym {
    uint64_t value, size;
    std::string name;  // mangled
  };
  std::vector<Sym> tls_symbols, func_symbols;

  void load(const void* any_code_address) {
    Dl_info info{};
    if (dladdr(any_code_address, &info) == 0) return;
    path = info.dli_fname != nullptr ? info.dli_fname : "";
    struct Ctx {
      uintptr_t addr;
      ModuleInfo* self;
    } ctx{reinterpret_cast<uintptr_t>(any_code_address), this};
    dl_iterate_phdr(
        [](dl_phdr_info* p, size_t, void* data) -> int {
          auto* c = static_cast<Ctx*>(data);
          bool mine = false;
          for (int i = 0; i < p->dlpi_phnum; ++i) {
            const auto& ph = p->dlpi_phdr[i];
            const uintptr_t lo = p->dlpi_addr + ph.p_vaddr;
            if (ph.p_type == PT_LOAD && c->addr >= lo && c->addr < lo + ph.p_memsz) mine = true;
          }
          if (!mine) return 0;
          c->self->load_bias = p->dlpi_addr;
          for (int i = 0; i < p->dlpi_phnum; ++i) {
            const auto& ph = p->dlpi_phdr[i];
            const uintptr_t lo = p->dlpi_addr + ph.p_vaddr;
            if (ph.p_type == PT_LOAD) c->self->segments.emplace_back(lo, lo + ph.p_memsz);
            if (ph.p_type == PT_TLS && p->dlpi_tls_data != nullptr) {
              c->self->tls_lo = reinterpret_cast<uintptr_t>(p->dlpi_tls_data);
              c->self->tls_hi = c->self->tls_lo + ph.p_memsz;
            }
          }
          return 1;
        },
        &ctx);
  }

  // Reads the ELF symbol table of the module file for STT_TLS symbols (their
  // st_value is the offset in the TLS block): names static __shared__ arrays.
  void load_symbols() {
    symbols_loaded = true;
    std::ifstream f(path, std::ios::binary);
    if (!f) return;
    std::vector<char> img((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (img.size() < sizeof(Elf64_Ehdr) || std::memcmp(img.data(), ELFMAG, SELFMAG) != 0) return;
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
    if (eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_shoff + eh->e_shnum * sizeof(Elf64_Shdr) > img.size()) return;
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
    for (int pass = 0; pass < 2 && func_symbols.empty(); ++pass) {
      const uint32_t want = pass == 0 ? SHT_SYMTAB : SHT_DYNSYM;
      for (int i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != want || sh[i].sh_link >= eh->e_shnum) continue;
        const auto& strs = sh[sh[i].sh_link];
        if (sh[i].sh_offset + sh[i].sh_size > img.size() || strs.sh_offset + strs.sh_size > img.size()) continue;
        const auto* syms = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
          const int type = ELF64_ST_TYPE(syms[k].st_info);
          if ((type != STT_TLS && type != STT_FUNC) || syms[k].st_name >= strs.sh_size) continue;
          (type == STT_TLS ? tls_symbols : func_symbols)
              .push_back({syms[k].st_value, syms[k].st_size, img.data() + strs.sh_offset + syms[k].st_name});
        }
      }
    }
  }

  // "gemm_kernel<float>(...)::a_tile + 68 bytes", or a TLS offset.
  std::string describe_tls(uintptr_t addr) {
    if (!symbols_loaded) load_symbols();
    const uint64_t off = addr - tls_lo;
    for (const auto& s : tls_symbols) {
      if (off >= s.value && off < s.value + std::max<uint64_t>(s.size, 1)) {
        return strprintf("%s + %llu bytes", demangle(s.name.c_str()).c_str(),
                         static_cast<unsigned long long>(off - s.value));
      }
    }
    return strprintf("static __shared__ memory at TLS offset %llu", static_cast<unsigned long long>(off));
  }
};

struct Runtime;
inline thread_local Runtime* t_runtime = nullptr;
// Non-null exactly while checked kernel code runs on a fiber: the one thing the
// memory-access callbacks look at before returning.
inline thread_local Runtime* t_check = nullptr;

[[noreturn]] inline void fiber_main_entry();

struct Runtime {
  bool use_ucontext = false;
  size_t stack_bytes = 64 * 1024;
  size_t page = 4096;
  // stacks: one mapping, [guard page | stack] per fiber, reused by every block
  char* stack_area = nullptr;
  size_t stack_slots = 0;
  std::vector<Fiber> fiber_vec;
  std::vector<ucontext_t> uc_vec;
  Fiber* fibers = nullptr;  // == fiber_vec.data(): raw pointer, usable from fiber code
  unsigned nthreads = 0;
  void* sched_sp = nullptr;
  ucontext_t sched_uc{};
  Fiber* current = nullptr;

  // the launch in flight
  const LaunchInfo* launch = nullptr;
  Dim3 block_idx;
  unsigned block_linear = 0;
  uint32_t epoch = 1;  // sync intervals: +1 per block start and per block barrier
  uint32_t block_start_epoch = 0, launch_start_epoch = 0;
  uint16_t warp_sync[32] = {};
  std::string fiber_error;  // set by a failing fiber

  // memory checker
  bool memcheck = false;
  ModuleInfo module;
  bool module_loaded = false;
  std::vector<SmemShadow> smem_shadow;
  std::vector<std::pair<uintptr_t, const char*>> dyn_smem;  // this thread's buffers
  std::vector<std::unique_ptr<Buffer>> buffers;
  Stats stats;

  Runtime() {
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (const char* kb = std::getenv("FASTMLP_EMU_STACK_KB")) stack_bytes = std::max<size_t>(16, std::atoi(kb)) * 1024;
    stack_bytes = (stack_bytes + page - 1) / page * page;
#if defined(FASTMLP_EMU_ASM_SWITCH)
    const char* uc = std::getenv("FASTMLP_EMU_UCONTEXT");
    use_ucontext = uc != nullptr && std::strcmp(uc, "0") != 0;
#else
    use_ucontext = true;
#endif
#if defined(FASTMLP_EMU_MEMCHECK)
    memcheck = true;
#endif
  }
  ~Runtime() {
    if (stack_area != nullptr) munmap(stack_area, stack_slots * (stack_bytes + page));
  }

  // ---- fibers -------------------------------------------------------------
  void ensure_fibers(unsigned n) {
    if (n > stack_slots) {
      if (stack_area != nullptr) munmap(stack_area, stack_slots * (stack_bytes + page));
      const size_t slots = std::max<size_t>(n, 32);
      void* p = mmap(nullptr, slots * (stack_bytes + page), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw Error("fastmlp_emu: cannot map fiber stacks");
      stack_area = static_cast<char*>(p);
      stack_slots = slots;
      for (size_t i = 0; i < slots; ++i) {  // guard page below each stack: overflow faults instead of corrupting
        mprotect(stack_area + i * (stack_bytes + page), page, PROT_NONE);
      }
      fiber_vec.assign(slots, Fiber{});
      uc_vec.assign(use_ucontext ? slots : 0, ucontext_t{});
      for (size_t i = 0; i < slots; ++i) {
        Fiber& f = fiber_vec[i];
        f.stack_lo = reinterpret_cast<uintptr_t>(stack_area + i * (stack_bytes + page) + page);
        f.stack_hi = f.stack_lo + stack_bytes;
        f.uc = use_ucontext ? &uc_vec[i] : nullptr;
      }
      fibers = fiber_vec.data();
    }
  }

  void reset_fiber(Fiber& f, unsigned linear) {
    const Dim3& b = launch->block;
    f.linear = linear;
    f.tid = Dim3{linear % b.x, (linear / b.x) % b.y, linear / (b.x * b.y)};
    f.state = State::kReady;
    f.in_body = false;
    if (use_ucontext) {
      getcontext(f.uc);
      f.uc->uc_stack.ss_sp = reinterpret_cast<void*>(f.stack_lo);
      f.uc->uc_stack.ss_size = stack_bytes;
      f.uc->uc_link = nullptr;
      makecontext(f.uc, reinterpret_cast<void (*)()>(&fiber_main_entry), 0);
    } else {
#if defined(FASTMLP_EMU_ASM_SWITCH)
      // Frame popped by fastmlp_emu_switch_stack: r15 r14 r13 r12 rbx rbp, then
      // `ret` into the trampoline with rsp 16-byte aligned, which calls *r12.
      void** sp = reinterpret_cast<void**>((f.stack_hi & ~uintptr_t{15}) - 7 * sizeof(void*));
      for (int i = 0; i < 6; ++i) sp[i] = nullptr;
      sp[3] = reinterpret_cast<void*>(&fiber_main_entry);
      sp[6] = reinterpret_cast<void*>(&fastmlp_emu_fiber_trampoline);
      f.sp = sp;
#endif
    }
  }

  // Scheduler side: run fiber f until it blocks, finishes or fails.
  FASTMLP_EMU_NOSAN void resume(Fiber& f) {
    current = &f;
    ++stats.switches;
    t_check = memcheck && f.in_body ? this : nullptr;
    if (use_ucontext) {
      swapcontext(&sched_uc, f.uc);
    } else {
#if defined(FASTMLP_EMU_ASM_SWITCH)
      fastmlp_emu_switch_stack(&sched_sp, f.sp);
#endif
    }
    t_check = nullptr;
    current = nullptr;
  }

  // Fiber side: back to the scheduler (returns when resumed). Emulator code
  // runs unchecked after it, whatever the scheduler restored.
  FASTMLP_EMU_NOSAN void yield(Fiber& f) {
    if (use_ucontext) {
      swapcontext(f.uc, &sched_uc);
    } else {
#if defined(FASTMLP_EMU_ASM_SWITCH)
      fastmlp_emu_switch_stack(&f.sp, sched_sp);
#endif
    }
    t_check = nullptr;
  }

  // Fiber side: report an error and never come back (the launch is abandoned;
  // the fiber's stack is simply reused later).
  [[noreturn]] FASTMLP_EMU_NOSAN void fail(std::string msg) {
    t_check = nullptr;
    Fiber& f = *current;
    fiber_error = thread_name(f) + ": " + msg;
    f.state = State::kFailed;
    yield(f);
    std::abort();  // unreachable: a failed fiber is never resumed
  }

  // ---- naming -------------------------------------------------------------
  // The kernel's symbol, from the dynamic symbols or else the module's symtab.
  std::string kernel_name() {
    Dl_info info{};
    if (dladdr(launch->kernel, &info) != 0 && info.dli_sname != nullptr &&
        info.dli_saddr == launch->kernel) {
      return demangle(info.dli_sname);
    }
    load_module();
    if (!module.symbols_loaded) module.load_symbols();
    const uintptr_t a = reinterpret_cast<uintptr_t>(launch->kernel) - module.load_bias;
    for (const auto& sym : module.func_symbols) {
      if (sym.value == a) return demangle(sym.name.c_str());
    }
    return strprintf("kernel at %p (%s)", launch->kernel, launch->signature);
  }
  void load_module() {
    if (!module_loaded) {
      module.load(reinterpret_cast<const void*>(&fiber_main_entry));
      module_loaded = true;
    }
  }
  std::string launch_name() {
    const Dim3 &g = launch->grid, &b = launch->block;
    return strprintf("%s <<<(%u,%u,%u), (%u,%u,%u), %zu>>>", kernel_name().c_str(), g.x, g.y, g.z, b.x, b.y, b.z,
                     launch->smem);
  }
  std::string thread_name(const Fiber& f) const {
    return strprintf("thread %u (%u,%u,%u)", f.linear, f.tid.x, f.tid.y, f.tid.z);
  }
  std::string site_name(Site s) const { return strprintf("%s:%d", short_file(s.file).c_str(), s.line); }
  [[noreturn]] void throw_block_error(const std::string& msg) {
    throw Error(strprintf("fastmlp_emu: %s, block (%u,%u,%u): ", launch_name().c_str(), block_idx.x, block_idx.y,
                          block_idx.z) +
                msg);
  }

  // ---- grid ---------------------------------------------------------------
  void run_grid(const LaunchInfo& info) {
    if (launch != nullptr) throw Error("fastmlp_emu: kernel launch from inside a kernel is not supported");
    launch = &info;
    struct Reset {
      Runtime* r;
      ~Reset() {
        r->launch = nullptr;
        r->current = nullptr;
        t_check = nullptr;
      }
    } reset{this};
    validate(info);
    ++stats.launches;
    nthreads = info.block.x * info.block.y * info.block.z;
    ensure_fibers(nthreads);
    dyn_smem.clear();
    for (const auto& [get, name] : dyn_smem_registry()) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(get());
      if (std::none_of(dyn_smem.begin(), dyn_smem.end(), [&](auto& d) { return d.first == a; })) {
        dyn_smem.emplace_back(a, name);
      }
    }
    if (memcheck) prepare_memcheck();
    launch_start_epoch = ++epoch;
    for (unsigned z = 0; z < info.grid.z; ++z)
      for (unsigned y = 0; y < info.grid.y; ++y)
        for (unsigned x = 0; x < info.grid.x; ++x) run_block(Dim3{x, y, z});
  }

  void validate(const LaunchInfo& info) {
    const Dim3 &g = info.grid, &b = info.block;
    const unsigned long long threads = 1ull * b.x * b.y * b.z;
    if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > 1024 || b.y > 1024 || b.z > 64 ||
        g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
      throw Error("fastmlp_emu: invalid launch configuration (cudaErrorInvalidConfiguration): " + launch_name());
    }
    auto it = smem_optin().find(info.kernel);
    const size_t limit = it == smem_optin().end() ? kDefaultSmemPerBlock : it->second;
    if (info.smem > limit) {
      throw Error(strprintf("fastmlp_emu: %s requests %zu bytes of dynamic shared memory, over the %zu-byte limit "
                            "(above 48 KiB needs cudaFuncSetAttribute(kernel, "
                            "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), at most %zu)",
                            launch_name().c_str(), info.smem, limit, kMaxSmemPerBlockOptin));
    }
    if (info.smem > 0 && dyn_smem_registry().empty()) {
      throw Error("fastmlp_emu: dynamic shared memory requested but no FASTMLP_EMU_DYNAMIC_SMEM buffer is defined");
    }
  }

  void run_block(Dim3 bidx) {
    block_idx = bidx;
    block_linear = bidx.x + launch->grid.x * (bidx.y + launch->grid.y * bidx.z);
    block_start_epoch = ++epoch;
    std::fill(std::begin(warp_sync), std::end(warp_sync), uint16_t{0});
    ++stats.blocks;
    // CUDA shared memory starts undefined: poison the dynamic part (0xff bytes
    // are NaN as float/double) so results computed from it show up.
    for (auto& d : dyn_smem) std::memset(reinterpret_cast<void*>(d.first), 0xff, launch->smem);
    for (unsigned i = 0; i < nthreads; ++i) reset_fiber(fibers[i], i);
    for (;;) {
      for (unsigned i = 0; i < nthreads; ++i) {
        if (fibers[i].state != State::kReady) continue;
        resume(fibers[i]);
        if (fibers[i].state == State::kFailed) throw_block_error(fiber_error);
      }
      if (resolve_warps()) continue;
      unsigned done = 0, at_barrier = 0;
      for (unsigned i = 0; i < nthreads; ++i) {
        done += fibers[i].state == State::kDone;
        at_barrier += fibers[i].state == State::kBarrier;
      }
      if (done == nthreads) return;
      if (at_barrier == nthreads && release_barrier()) continue;
      throw_block_error(describe_stuck_block());
    }
  }

  // All threads wait at a block barrier: release it if they wait at the same one.
  bool release_barrier() {
    const Fiber& f0 = fibers[0];
    for (unsigned i = 1; i < nthreads; ++i) {
      const Fiber& f = fibers[i];
      if (f.bar_op != f0.bar_op || f.site.line != f0.site.line || std::strcmp(f.site.file, f0.site.file) != 0) {
        return false;
      }
    }
    int count = 0;
    for (unsigned i = 0; i < nthreads; ++i) count += fibers[i].pred != 0;
    const int all = count == static_cast<int>(nthreads), any = count > 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      f.bar_result = f0.bar_op == BarOp::kCount ? count : f0.bar_op == BarOp::kAnd ? all : any;
      f.state = State::kReady;
    }
    ++epoch;  // a new sync interval: accesses before and after the barrier are ordered
    return true;
  }

  std::string wait_description(const Fiber& f) const {
    switch (f.state) {
      case State::kDone: return "have exited";
      case State::kBarrier: return strprintf("wait at %s() (%s)", bar_op_name(f.bar_op), site_name(f.site).c_str());
      case State::kWarp:
        return strprintf("wait at %s(mask=0x%08x) (%s)", warp_op_name(f.warp_op), f.mask, site_name(f.site).c_str());
      default: return "are runnable";
    }
  }

  std::string describe_stuck_block() const {
    std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
    for (unsigned i = 0; i < nthreads; ++i) {
      const std::string d = wait_description(fibers[i]);
      auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == d; });
      if (it == groups.end()) {
        groups.push_back({d, {i}});
      } else {
        it->second.push_back(i);
      }
    }
    std::string s = "divergent barrier (deadlock): ";
    for (size_t i = 0; i < groups.size(); ++i) {
      s += (i ? "; " : "") + std::string("threads ") + format_ids(groups[i].second) + " " + groups[i].first;
    }
    return s + ". Every non-exited thread of a block must reach the same __syncthreads() (and every lane named in "
               "a warp intrinsic's mask the same intrinsic).";
  }

  // ---- warp rendezvous ----------------------------------------------------
  bool resolve_warps() {
    bool progressed = false;
    const unsigned nwarps = (nthreads + 31) / 32;
    for (unsigned w = 0; w < nwarps; ++w) {
      Fiber* lanes = fibers + 32 * w;
      const unsigned nl = std::min(32u, nthreads - 32 * w);
      uint32_t handled = 0;
      for (unsigned l = 0; l < nl; ++l) {
        const Fiber& f = lanes[l];
        if (f.state != State::kWarp || ((handled >> l) & 1u)) continue;
        const uint32_t m = f.mask;
        const char* op = warp_op_name(f.warp_op);
        if (((m >> l) & 1u) == 0) {
          throw_block_error(strprintf("%s calls %s(mask=0x%08x) (%s) with a mask that does not include its own lane %u",
                                      thread_name(f).c_str(), op, m, site_name(f.site).c_str(), l));
        }
        if (nl < 32 && (m >> nl) != 0) {
          throw_block_error(strprintf("%s calls %s(mask=0x%08x) (%s) naming lanes %u-31 of warp %u, which do not "
                                      "exist (the block has %u threads): inactive lanes in the mask",
                                      thread_name(f).c_str(), op, m, site_name(f.site).c_str(), nl, w, nthreads));
        }
        bool ready = true;
        for (unsigned j = 0; j < 32; ++j) {
          if (((m >> j) & 1u) == 0) continue;
          const Fiber& g = lanes[j];
          if (g.state == State::kDone) {
            throw_block_error(strprintf("%s calls %s(mask=0x%08x) (%s) but lane %u (thread %u) of the mask has "
                                        "exited: inactive lane in the mask",
                                        thread_name(f).c_str(), op, m, site_name(f.site).c_str(), j, g.linear));
          }
          if (g.state != State::kWarp || g.warp_op != f.warp_op || g.mask != m) {
            ready = false;
            break;
          }
          if (g.size != f.size) {
            throw_block_error(strprintf("lanes of warp %u exchange values of different sizes in %s (%s)", w, op,
                                        site_name(f.site).c_str()));
          }
        }
        if (!ready) continue;
        execute_warp_op(lanes, m, w);
        handled |= m;
        progressed = true;
      }
    }
    return progressed;
  }

  void execute_warp_op(Fiber* lanes, uint32_t m, unsigned warp) {
    const WarpOp op = lanes[__builtin_ctz(m)].warp_op;
    uint32_t preds = 0;
    for (unsigned j = 0; j < 32; ++j) {
      if (((m >> j) & 1u) && lanes[j].value != 0) preds |= 1u << j;
    }
    const uint64_t poison = ~uint64_t{0};  // a read from a lane outside the mask is undefined: NaN / -1
    for (unsigned i = 0; i < 32; ++i) {
      if (((m >> i) & 1u) == 0) continue;
      Fiber& f = lanes[i];
      const unsigned width = static_cast<unsigned>(f.width);
      const unsigned seg = i & ~(width - 1), b = static_cast<unsigned>(f.arg) & 31u;
      uint64_t r = 0;
      auto from_lane = [&](unsigned j) { return ((m >> j) & 1u) ? lanes[j].value : poison; };
      auto reduce = [&](auto init, auto fn) {
        auto acc = init;
        for (unsigned j = 0; j < 32; ++j) {
          if ((m >> j) & 1u) acc = fn(acc, static_cast<decltype(init)>(lanes[j].value));
        }
        return static_cast<uint64_t>(static_cast<uint32_t>(acc));
      };
      switch (op) {
        case WarpOp::kSync: break;
        case WarpOp::kShflIdx: r = from_lane(seg + (static_cast<unsigned>(f.arg) & (width - 1))); break;
        case WarpOp::kShflUp: r = from_lane(i < seg + b ? i : i - b); break;
        case WarpOp::kShflDown: r = from_lane(i + b >= seg + width ? i : i + b); break;
        case WarpOp::kShflXor: r = from_lane((i ^ b) >= seg + width ? i : (i ^ b)); break;
        case WarpOp::kBallot: r = preds; break;
        case WarpOp::kAll: r = preds == m; break;
        case WarpOp::kAny: r = preds != 0; break;
        case WarpOp::kReduceAdd: r = reduce(0u, [](unsigned a, unsigned v) { return a + v; }); break;
        case WarpOp::kReduceMinS: r = reduce(INT32_MAX, [](int a, int v) { return std::min(a, v); }); break;
        case WarpOp::kReduceMinU: r = reduce(UINT32_MAX, [](unsigned a, unsigned v) { return std::min(a, v); }); break;
        case WarpOp::kReduceMaxS: r = reduce(INT32_MIN, [](int a, int v) { return std::max(a, v); }); break;
        case WarpOp::kReduceMaxU: r = reduce(0u, [](unsigned a, unsigned v) { return std::max(a, v); }); break;
        case WarpOp::kReduceAnd: r = reduce(~0u, [](unsigned a, unsigned v) { return a & v; }); break;
        case WarpOp::kReduceOr: r = reduce(0u, [](unsigned a, unsigned v) { return a | v; }); break;
        case WarpOp::kReduceXor: r = reduce(0u, [](unsigned a, unsigned v) { return a ^ v; }); break;
        case WarpOp::kMatchAny:
        case WarpOp::kMatchAll: {
          uint32_t same = 0;
          for (unsigned j = 0; j < 32; ++j) {
            if (((m >> j) & 1u) && lanes[j].value == f.value) same |= 1u << j;
          }
          r = op == WarpOp::kMatchAny ? same : (same == m ? m : 0);
          break;
        }
      }
      f.result = r;
      f.state = State::kReady;
    }
    if (op == WarpOp::kSync) ++warp_sync[warp];  // __syncwarp orders the lanes' memory accesses
  }

  // ---- memory checker -----------------------------------------------------
  void prepare_memcheck() {
    load_module();
    if (module.tls_hi <= module.tls_lo) {
      throw Error("fastmlp_emu: memcheck cannot locate this module's TLS block (where __shared__ memory lives)");
    }
    if (smem_shadow.empty()) smem_shadow.assign(module.tls_hi - module.tls_lo, SmemShadow{});
    for (auto& b : buffers) {
      if (b->spec.access != Access::kReadOnly && b->shadow.size() != b->spec.bytes) {
        b->shadow.assign(b->spec.bytes, GlobalShadow{});
      }
    }
  }

  FASTMLP_EMU_NOSAN void on_access(uintptr_t a, size_t n, bool write) {
    Fiber& f = *current;
    if (a >= f.stack_lo && a + n <= f.stack_hi) return;  // locals, kernel parameters
    ++stats.checked_accesses;
    if (a >= module.tls_lo && a < module.tls_hi) {
      shared_access(f, a, n, write);
    } else {
      global_access(f, a, n, write);
    }
  }

  FASTMLP_EMU_NOSAN std::string smem_name(uintptr_t a) {
    t_check = nullptr;
    for (auto& d : dyn_smem) {
      if (a >= d.first && a < d.first + kMaxSmemPerBlockOptin) {
        return strprintf("dynamic shared memory '%s' + %zu bytes", d.second, static_cast<size_t>(a - d.first));
      }
    }
    return module.describe_tls(a);
  }

  FASTMLP_EMU_NOSAN void shared_access(Fiber& f, uintptr_t a, size_t n, bool write) {
    for (auto& d : dyn_smem) {
      if (a >= d.first && a < d.first + kMaxSmemPerBlockOptin && a + n > d.first + launch->smem) {
        fail(strprintf("out-of-bounds %s of %zu bytes at %s: the launch has %zu bytes of dynamic shared memory",
                       write ? "write" : "read", n, smem_name(a).c_str(), launch->smem));
      }
    }
    const Options& o = options();
    if (!o.check_races && !o.check_uninit) return;
    const uint16_t t = static_cast<uint16_t>(f.linear);
    const unsigned w = f.linear / 32;
    const uint16_t ws = warp_sync[w];
    // Accesses by two threads are ordered if a block barrier separates them, or
    // (same warp) a __syncwarp; otherwise they are concurrent.
    auto concurrent = [&](uint32_t e, uint16_t who, uint16_t who_ws) {
      return e == epoch && !(who != kManyReaders && who / 32u == w && who_ws != ws);
    };
    for (uintptr_t p = a; p < a + n; ++p) {
      SmemShadow& s = smem_shadow[p - module.tls_lo];
      const bool written = s.w_epoch >= block_start_epoch;
      if (!write) {
        if (!written) {
          if (o.check_uninit) {
            fail(strprintf("reads %zu bytes of shared memory never written in this block, at %s "
                           "(a missing __syncthreads() or a missing store?)",
                           n, smem_name(p).c_str()));
          }
        } else if (o.check_races && s.writer != t && concurrent(s.w_epoch, s.writer, s.w_ws)) {
          fail(strprintf("shared-memory race: reads %s written by thread %u with no __syncthreads() in between",
                         smem_name(p).c_str(), s.writer));
        }
        if (s.r_epoch >= block_start_epoch && s.reader != t && concurrent(s.r_epoch, s.reader, s.r_ws)) {
          s.reader = kManyReaders;
        } else {
          s.reader = t;
          s.r_ws = ws;
        }
        s.r_epoch = epoch;
      } else {
        if (o.check_races) {
          if (written && s.writer != t && concurrent(s.w_epoch, s.writer, s.w_ws)) {
            fail(strprintf("shared-memory race: writes %s, also written by thread %u with no __syncthreads() in "
                           "between",
                           smem_name(p).c_str(), s.writer));
          }
          if (s.r_epoch >= block_start_epoch && s.reader != t && concurrent(s.r_epoch, s.reader, s.r_ws)) {
            fail(strprintf("shared-memory race: writes %s, read by %s with no __syncthreads() in between",
                           smem_name(p).c_str(),
                           s.reader == kManyReaders ? "other threads" : strprintf("thread %u", s.reader).c_str()));
          }
        }
        s.writer = t;
        s.w_epoch = epoch;
        s.w_ws = ws;
      }
    }
  }

  FASTMLP_EMU_NOSAN Buffer* find_buffer(uintptr_t a, size_t n) {
    for (auto& b : buffers) {
      if (a >= b->lo && a + n <= b->hi) return b.get();
    }
    return nullptr;
  }

  FASTMLP_EMU_NOSAN void global_access(Fiber& f, uintptr_t a, size_t n, bool write) {
    const Options& o = options();
    if (buffers.empty()) return;  // nothing registered: no global checks
    Buffer* b = find_buffer(a, n);
    if (b == nullptr) {
      for (auto& [lo, hi] : module.segments) {
        if (a >= lo && a + n <= hi) return;  // __constant__ / __device__ variables, literals
      }
      if (o.check_bounds) fail(describe_out_of_bounds(a, n, write));
      return;
    }
    if (write && b->spec.access == Access::kReadOnly) {
      fail(strprintf("writes %zu bytes into read-only buffer '%s' at byte offset %zu", n, b->spec.name.c_str(),
                     static_cast<size_t>(a - b->lo)));
    }
    if (b->shadow.empty()) return;
    const uint32_t gid = block_linear * nthreads + f.linear;
    for (uintptr_t p = a; p < a + n; ++p) {
      GlobalShadow& s = b->shadow[p - b->lo];
      if (!write) {
        if (s.epoch == 0 && b->spec.access == Access::kWriteFirst && o.check_uninit) {
          fail(strprintf("reads element %zu of '%s', which no kernel has written (uninitialized memory)",
                         static_cast<size_t>(p - b->lo) / b->spec.elem_size, b->spec.name.c_str()));
        }
        continue;
      }
      // Two writes of one byte in one launch by different threads race unless a
      // barrier of their (common) block orders them.
      if (o.check_races && s.epoch >= launch_start_epoch && s.writer != gid &&
          (s.writer / nthreads != block_linear || s.epoch == epoch)) {
        fail(strprintf("global write/write race on element %zu of '%s': also written by thread %u of block %u in "
                       "this launch",
                       static_cast<size_t>(p - b->lo) / b->spec.elem_size, b->spec.name.c_str(),
                       s.writer % nthreads, s.writer / nthreads));
      }
      s.epoch = epoch;
      s.writer = gid;
    }
  }

  FASTMLP_EMU_NOSAN std::string describe_out_of_bounds(uintptr_t a, size_t n, bool write) {
    t_check = nullptr;
    const Buffer* near = nullptr;
    uintptr_t best = UINTPTR_MAX;
    for (auto& b : buffers) {
      const uintptr_t d = a < b->lo ? b->lo - a : (a >= b->hi ? a - b->hi : 0);
      if (d < best) {
        best = d;
        near = b.get();
      }
    }
    std::string where = strprintf("address %p", reinterpret_cast<void*>(a));
    if (near != nullptr) {
      const size_t es = near->spec.elem_size;
      if (a >= near->hi || (a < near->hi && a + n > near->hi)) {
        where = strprintf("%zu bytes past the end of '%s' (%zu elements of %zu bytes; element index %lld)",
                          static_cast<size_t>(a - near->hi), near->spec.name.c_str(), near->spec.bytes / es, es,
                          static_cast<long long>((a - near->lo) / es));
      } else {
        where = strprintf("%zu bytes before the start of '%s' (%zu elements of %zu bytes)",
                          static_cast<size_t>(near->lo - a), near->spec.name.c_str(), near->spec.bytes / es, es);
      }
    }
    return strprintf("out-of-bounds %s of %zu bytes at %s", write ? "write" : "read", n, where.c_str());
  }
};

inline Runtime& runtime() {
  if (t_runtime == nullptr) t_runtime = new Runtime();  // one per OS thread, lives as long as it
  return *t_runtime;
}

// ---- fiber entry and device-side primitives ------------------------------

[[noreturn]] FASTMLP_EMU_NOSAN inline void fiber_main_entry() {
  Runtime& r = *t_runtime;
  Fiber& f = *r.current;
  try {
    r.launch->invoke(r.launch->ctx);
  } catch (const std::exception& e) {
    r.fail(std::string("kernel threw: ") + e.what());
  } catch (...) {
    r.fail("kernel threw an exception");
  }
  t_check = nullptr;
  f.in_body = false;
  f.state = State::kDone;
  r.yield(f);
  std::abort();  // a finished fiber is never resumed
}

// Called by the launch's invoke() right before the kernel body: from here on
// this fiber's accesses are checked.
FASTMLP_EMU_NOSAN inline void enter_kernel_body() {
  Runtime& r = *t_runtime;
  r.current->in_body = true;
  t_check = r.memcheck ? &r : nullptr;
}

// Saves and clears t_check for emulator code running on a fiber.
struct Quiet {
  Runtime* saved;
  FASTMLP_EMU_NOSAN Quiet() : saved(t_check) { t_check = nullptr; }
  FASTMLP_EMU_NOSAN ~Quiet() { t_check = saved; }
};

FASTMLP_EMU_NOSAN inline Fiber& current_fiber() {
  Runtime* r = t_runtime;
  if (r == nullptr || r->current == nullptr) {
    std::fprintf(stderr, "fastmlp_emu: a device intrinsic was called outside of a kernel launch\n");
    std::abort();
  }
  return *r->current;
}

FASTMLP_EMU_NOSAN inline int block_barrier(Site site, BarOp op, int pred) {
  Quiet q;
  Fiber& f = current_fiber();
  f.state = State::kBarrier;
  f.site = site;
  f.bar_op = op;
  f.pred = pred;
  t_runtime->yield(f);
  return f.bar_result;
}

FASTMLP_EMU_NOSAN inline uint64_t warp_rendezvous(Site site, WarpOp op, unsigned mask, uint64_t value, uint8_t size,
                                                  int arg, int width) {
  Quiet q;
  Fiber& f = current_fiber();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    t_runtime->fail(strprintf("%s (%s): width %d is not a power of two in [1, 32]", warp_op_name(op),
                              t_runtime->site_name(site).c_str(), width));
  }
  f.state = State::kWarp;
  f.site = site;
  f.warp_op = op;
  f.mask = mask;
  f.value = value;
  f.size = size;
  f.arg = arg;
  f.width = width;
  t_runtime->yield(f);
  return f.result;
}

FASTMLP_EMU_NOSAN inline unsigned active_mask() {
  Quiet q;
  Runtime& r = *t_runtime;
  Fiber& f = current_fiber();
  const unsigned base = f.linear & ~31u, nl = std::min(32u, r.nthreads - base);
  unsigned m = 0;
  for (unsigned j = 0; j < nl; ++j) {
    if (r.fibers[base + j].state != State::kDone) m |= 1u << j;
  }
  return m;
}

[[noreturn]] FASTMLP_EMU_NOSAN inline void device_fail(const char* what) {
  Quiet q;
  t_runtime->fail(what);
}

// Atomics are emulator functions (not instrumented): check their target here.
FASTMLP_EMU_NOSAN inline void check_atomic(const void* p, size_t n) {
  if (Runtime* r = t_check) {
    Quiet q;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const bool global = !(a >= r->module.tls_lo && a < r->module.tls_hi) &&
                        !(a >= r->current->stack_lo && a < r->current->stack_hi);
    if (global && !r->buffers.empty() && r->find_buffer(a, n) == nullptr && options().check_bounds) {
      r->fail("atomic: " + r->describe_out_of_bounds(a, n, true));
    }
  }
}

// The checker itself runs with t_check cleared: its helpers (lambdas, std::
// containers) are instrumented code too.
FASTMLP_EMU_NOSAN inline void checked(Runtime* r, uintptr_t a, size_t n, bool write) {
  t_check = nullptr;
  r->on_access(a, n, write);
  t_check = r;
}

FASTMLP_EMU_NOSAN inline Dim3 cur_thread_idx() { return current_fiber().tid; }
FASTMLP_EMU_NOSAN inline Dim3 cur_block_idx() { return t_runtime->block_idx; }
FASTMLP_EMU_NOSAN inline Dim3 cur_block_dim() { return t_runtime->launch->block; }
FASTMLP_EMU_NOSAN inline Dim3 cur_grid_dim() { return t_runtime->launch->grid; }

}  // namespace detail

// Registers "device" buffers for the bounds / race / initialization checks of
// the launches made while it lives (RAII, per OS thread). Without any
// registered buffer, global memory is not checked.
class BufferScope {
 public:
  explicit BufferScope(const std::vector<BufferSpec>& specs) {
    auto& r = detail::runtime();
    first_ = r.buffers.size();
    for (const auto& s : specs) {
      auto b = std::make_unique<detail::Buffer>();
      b->spec = s;
      if (b->spec.elem_size == 0) b->spec.elem_size = 1;
      b->lo = reinterpret_cast<uintptr_t>(s.data);
      b->hi = b->lo + s.bytes;
      r.buffers.push_back(std::move(b));
    }
  }
  ~BufferScope() {
    auto& r = detail::runtime();
    r.buffers.resize(first_);
  }
  BufferScope(const BufferScope&) = delete;
  BufferScope& operator=(const BufferScope&) = delete;

 private:
  size_t first_ = 0;
};

inline Stats& stats() { return detail::runtime().stats; }

inline constexpr bool memcheck_compiled() {
#if defined(FASTMLP_EMU_MEMCHECK)
  return true;
#else
  return false;
#endif
}

}  // namespace fastmlp_emu

// ---- the instrumentation callbacks ------------------------------------------
// GCC's ThreadSanitizer instrumentation (compile-time only; no tsan runtime is
// linked) calls __tsan_readN / __tsan_writeN before every load / store of
// memory that may be shared. Unlike ASan's, it keeps a read and a following
// write of the same address apart (`s[t] += v` is a read and a write), which
// the race and read-only checks need. Everything else it calls (init, vptr,
// std::atomic operations of the TU) is implemented here as the plain operation.
#if defined(FASTMLP_EMU_MEMCHECK)
#if !defined(__SANITIZE_THREAD__)
#error "FASTMLP_EMU_MEMCHECK needs the TU compiled with -fsanitize=thread (see fastmlp_emu memcheck flags in cuda_emu.h)"
#endif
#define FASTMLP_EMU_CALLBACK \
  extern "C" __attribute__((weak, visibility("hidden"), no_sanitize_thread, no_sanitize_address))
#define FASTMLP_EMU_ACCESS(fn, n, write)                                                        \
  FASTMLP_EMU_CALLBACK void fn(void* a) {                                                       \
    if (auto* r = ::fastmlp_emu::detail::t_check) {                                             \
      ::fastmlp_emu::detail::checked(r, reinterpret_cast<uintptr_t>(a), n, write);              \
    }                                                                                           \
  }
#define FASTMLP_EMU_ACCESSES(N)                                 \
  FASTMLP_EMU_ACCESS(__tsan_read##N, N, false)                  \
  FASTMLP_EMU_ACCESS(__tsan_write##N, N, true)                  \
  FASTMLP_EMU_ACCESS(__tsan_unaligned_read##N, N, false)        \
  FASTMLP_EMU_ACCESS(__tsan_unaligned_write##N, N, true)        \
  FASTMLP_EMU_ACCESS(__tsan_volatile_read##N, N, false)         \
  FASTMLP_EMU_ACCESS(__tsan_volatile_write##N, N, true)
FASTMLP_EMU_ACCESSES(1)
FASTMLP_EMU_ACCESSES(2)
FASTMLP_EMU_ACCESSES(4)
FASTMLP_EMU_ACCESSES(8)
FASTMLP_EMU_ACCESSES(16)
FASTMLP_EMU_CALLBACK void __tsan_read_range(void* a, unsigned long n) {
  if (auto* r = ::fastmlp_emu::detail::t_check) ::fastmlp_emu::detail::checked(r, reinterpret_cast<uintptr_t>(a), n, false);
}
FASTMLP_EMU_CALLBACK void __tsan_write_range(void* a, unsigned long n) {
  if (auto* r = ::fastmlp_emu::detail::t_check) ::fastmlp_emu::detail::checked(r, reinterpret_cast<uintptr_t>(a), n, true);
}
FASTMLP_EMU_CALLBACK void __tsan_init() {}
FASTMLP_EMU_CALLBACK void __tsan_func_entry(void*) {}
FASTMLP_EMU_CALLBACK void __tsan_func_exit() {}
FASTMLP_EMU_CALLBACK void __tsan_vptr_update(void**, void*) {}
FASTMLP_EMU_CALLBACK void __tsan_vptr_read(void**) {}
// std::atomic in the TU (torch's refcounts...): always sequentially consistent.
#define FASTMLP_EMU_TSAN_ATOMICS(bits, T)                                                                  \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_load(const volatile T* a, int) {                            \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                         \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                              \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                         \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                        \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                        \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                        \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                         \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                        \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                       \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  FASTMLP_EMU_CALLBACK T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {   \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
    return c;                                                                                              \
  }
FASTMLP_EMU_TSAN_ATOMICS(8, unsigned char)
FASTMLP_EMU_TSAN_ATOMICS(16, unsigned short)
FASTMLP_EMU_TSAN_ATOMICS(32, unsigned int)
FASTMLP_EMU_TSAN_ATOMICS(64, unsigned long)
FASTMLP_EMU_CALLBACK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
FASTMLP_EMU_CALLBACK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef FASTMLP_EMU_TSAN_ATOMICS
#undef FASTMLP_EMU_ACCESSES
#undef FASTMLP_EMU_ACCESS
#undef FASTMLP_EMU_CALLBACK
#endif
