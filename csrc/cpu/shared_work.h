// Work shared by the workers of one parallel region, in phases: a step's row
// partials, then the reduction of their gradients with the optimizer's update,
// without leaving the region between them (a second region costs a fork and a
// join of the thread pool).
//
// Items are split into one share per worker, claimed by their owner first
// (the same worker gets the same items every step: its rows, its blocks of
// parameters and optimizer state stay in its cache) and then by any worker
// whose own share is done. A worker only ever waits for items some running
// worker has already claimed, so the work finishes whichever workers run and in
// whatever order: an OpenMP team, a task pool, or the calling thread alone.
// Which worker runs an item never changes what the item computes.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>

namespace fastmlp::cpu {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins on `ready()`, then yields the core: on a busy machine the worker being
// waited for may have lost its core for a while.
template <typename Ready> void spin_until(const Ready& ready) {
  constexpr int kSpinsBeforeYield = 1 << 8;  // ~10-20 µs of PAUSE on x86
  for (int spins = 0; !ready(); ++spins) {
    if (spins < kSpinsBeforeYield) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

// Items [0, n) in `shares` contiguous shares.
class SharedItems {
 public:
  SharedItems(int64_t n, int64_t shares) : shares_(std::max<int64_t>(shares, 1)), cursors_(new Cursor[shares_]) {
    for (int64_t s = 0; s < shares_; ++s) {
      cursors_[s].next.store(n * s / shares_, std::memory_order_relaxed);
      cursors_[s].end = n * (s + 1) / shares_;
    }
  }

  // The next item of `share`, else of the shares after it; -1 once all are claimed.
  int64_t claim(int64_t share) {
    for (int64_t i = 0; i < shares_; ++i) {
      Cursor& c = cursors_[(share + i) % shares_];
      if (c.next.load(std::memory_order_relaxed) >= c.end) continue;
      const int64_t item = c.next.fetch_add(1, std::memory_order_relaxed);
      if (item < c.end) return item;
    }
    return -1;
  }

 private:
  struct alignas(64) Cursor {  // a line each: owners claim without contention
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  int64_t shares_;
  std::unique_ptr<Cursor[]> cursors_;
};

// The first exception a region's workers raised; once there is one, the
// others stop claiming and waiting.
class RegionErrors {
 public:
  bool failed() const { return failed_.load(std::memory_order_acquire); }

  template <typename F> void capture(const F& f) noexcept {
    try {
      f();
    } catch (...) {
      if (!taken_.test_and_set()) first_ = std::current_exception();
      failed_.store(true, std::memory_order_release);
    }
  }

  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic_flag taken_ = ATOMIC_FLAG_INIT;
  std::exception_ptr first_;
  std::atomic<bool> failed_{false};
};

// Runs worker(index, errors) for index in [0, workers) on ATen's thread pool
// (fewer at once where the pool is busy or smaller: an index then runs after
// another on the same thread) and rethrows the first exception one raised.
template <typename Worker> void run_workers(int64_t workers, const Worker& worker) {
  RegionErrors errors;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) errors.capture([&] { worker(w, static_cast<const RegionErrors&>(errors)); });
  });
  errors.rethrow();
}

// Counts finished items; a worker waits for all of them (only once it has no
// more to claim: the rest are running).
class Countdown {
 public:
  explicit Countdown(int64_t n) : left_(n) {}
  void finish_one() { left_.fetch_sub(1, std::memory_order_acq_rel); }
  // True once all are finished; false if the region failed first.
  bool wait(const RegionErrors& errors) const {
    spin_until([&] { return left_.load(std::memory_order_acquire) == 0 || errors.failed(); });
    return !errors.failed();
  }

 private:
  std::atomic<int64_t> left_;
};

// Work done once, by the first worker to get there; the others wait for it
// (it is running) or, with `wait` false, go on without it.
class Once {
 public:
  // True for the worker that is to run it (then call done()); false for the others.
  bool claim() {
    int expected = kUnclaimed;
    return state_.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel);
  }
  void done() { state_.store(kDone, std::memory_order_release); }
  // True once it is done; false if the region failed first.
  bool wait(const RegionErrors& errors) const {
    spin_until([&] { return state_.load(std::memory_order_acquire) == kDone || errors.failed(); });
    return !errors.failed();
  }

 private:
  static constexpr int kUnclaimed = 0, kClaimed = 1, kDone = 2;
  std::atomic<int> state_{kUnclaimed};
};

}  // namespace fastmlp::cpu
