// First-use autotuning between a kernel path's candidates (issue 19 point 3).
//
// A planning heuristic fitted on one machine can lose on another (a different
// memory bandwidth, core count or GPU), so where a backend has two ways to run
// the same op (its own narrow kernels or BLAS, the fused chain or cuBLAS), the
// first call of a shape can time both and keep the faster for the rest of the
// process: the decision is cached per key (the op, its shapes and dtype, the
// device and the thread count).
//
// The candidates compute the same values, but not bitwise (their sums run in
// different orders), so a timed decision may differ between runs. That is why
// it is opt-in, as cudnn.benchmark is in torch: the heuristic decides unless
// FASTMLP_AUTOTUNE=1 or torch_fastmlp.autotune(True), and always under
// torch.use_deterministic_algorithms(True).
#pragma once
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace fastmlp {

class Autotuner {
 public:
  // Seconds one run of a candidate took: wall clock by default (a CPU op
  // returns when its work is done); a device backend passes its own (events).
  using Timer = std::function<double(const std::function<void()>&)>;

  static Autotuner& instance() {
    static Autotuner tuner;
    return tuner;
  }

  // 1: time the candidates at first use; 0: the heuristic; -1: as
  // FASTMLP_AUTOTUNE says (the default: off).
  void set_mode(int mode) { mode_.store(mode, std::memory_order_relaxed); }

  // Cheap enough for every op call: two loads (FASTMLP_AUTOTUNE is read once).
  bool enabled() const {
    if (at::globalContext().deterministicAlgorithms()) return false;
    const int mode = mode_.load(std::memory_order_relaxed);
    if (mode >= 0) return mode == 1;
    static const bool from_env = [] {
      const char* env = std::getenv("FASTMLP_AUTOTUNE");
      return env != nullptr && std::strcmp(env, "1") == 0;
    }();
    return from_env;
  }

  // Runs candidate 0 or 1 for the decision `key()` names and returns which:
  // `heuristic` when autotuning is off (no key is built); else the cached
  // decision, or, the first time, each candidate once to warm up and kRounds
  // times timed (the fastest run counts; the heuristic's choice stands unless
  // the other is kMargin faster), the winner run last so its outputs are the
  // ones left.
  // `may_time` false (a CUDA graph being captured): a cached decision, else the heuristic.
  template <class KeyFn, class First, class Second>
  int run(const KeyFn& key, int heuristic, const First& first, const Second& second, const Timer& timer = wall_clock,
          bool may_time = true) {
    const auto call = [&](int i) {
      if (i == 0) {
        first();
      } else {
        second();
      }
    };
    if (!enabled()) {
      call(heuristic);
      return heuristic;
    }
    const std::string k = key();
    const int cached = cached_choice(k);  // a candidate may tune its own parts: never run one under the lock
    if (cached >= 0 || !may_time) {
      const int chosen = cached >= 0 ? cached : heuristic;
      call(chosen);
      return chosen;
    }
    Decision d;
    d.heuristic = heuristic;
    for (int i = 0; i < 2; ++i) {
      call(i);  // warm-up: caches, packed weights, lazy allocations, the candidate's own decisions
      double best = std::numeric_limits<double>::infinity();
      for (int r = 0; r < kRounds; ++r) best = std::min(best, timer([&] { call(i); }));
      d.seconds.push_back(best);
    }
    // The other candidate only when clearly faster: a near tie keeps the heuristic's choice, so
    // timing noise does not flip decisions between runs.
    const int other = 1 - heuristic;
    d.chosen = d.seconds[other] < (1 - kMargin) * d.seconds[heuristic] ? other : heuristic;
    if (d.chosen == 0) call(0);
    const std::lock_guard<std::mutex> lock(mutex_);
    decisions_.emplace(k, d);
    return d.chosen;
  }

  // One line per decision: "key: chose i (heuristic h), seconds s0 s1 ...".
  std::vector<std::string> describe() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> lines;
    for (const auto& [key, d] : decisions_) {
      std::string line = key + ": chose " + std::to_string(d.chosen) + " (heuristic " + std::to_string(d.heuristic) +
                         "), seconds";
      for (const double s : d.seconds) line += " " + std::to_string(s);
      lines.push_back(line);
    }
    return lines;
  }

  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    decisions_.clear();
  }

  // The decision made for `key`, or -1.
  int cached_choice(const std::string& key) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = decisions_.find(key);
    return found == decisions_.end() ? -1 : found->second.chosen;
  }

  static double wall_clock(const std::function<void()>& fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

 private:
  static constexpr int kRounds = 3;
  static constexpr double kMargin = 0.1;
  struct Decision {
    int chosen = 0;
    int heuristic = 0;
    std::vector<double> seconds;
  };
  mutable std::mutex mutex_;
  std::atomic<int> mode_{-1};
  std::map<std::string, Decision> decisions_;
};

// "op:d0:d1...:dtype:device:threads", the key of a decision.
inline std::string autotune_key(const char* op, const std::vector<int64_t>& dims, const at::Tensor& like) {
  std::string key(op);
  for (const int64_t d : dims) key += ":" + std::to_string(d);
  key += std::string(":") + c10::toString(like.scalar_type()) + ":" + like.device().str() + ":" +
         std::to_string(at::get_num_threads());
  return key;
}

// Appends one code per layer for the parameter gradients a step asks for
// (1: the weight's, 2: the bias's), to a decision key's extra dims.
template <class Masks>
void append_mask_dims(std::vector<int64_t>& dims, const Masks& weight_mask, const Masks& bias_mask) {
  for (size_t l = 0; l < weight_mask.size() && l < bias_mask.size(); ++l)
    dims.push_back((weight_mask[l] ? 1 : 0) + (bias_mask[l] ? 2 : 0));
}

// The key of a whole chain's decision: batch, input features, every width,
// then `extra` (what else changes the candidates' costs: the gradients asked
// for, the loss's options).
inline std::string chain_autotune_key(const char* op, const at::Tensor& input, at::TensorList weights,
                                      const std::vector<int64_t>& extra = {}) {
  std::vector<int64_t> dims{input.size(0), input.size(1)};
  for (const at::Tensor& w : weights) dims.push_back(w.size(0));
  dims.insert(dims.end(), extra.begin(), extra.end());
  return autotune_key(op, dims, input);
}

}  // namespace fastmlp
