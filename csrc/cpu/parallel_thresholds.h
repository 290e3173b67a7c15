// Sizes below which a CPU pass runs on the calling thread: waking the thread
// pool costs more than splitting the work saves. Shared by the passes that
// must agree (the optimizer update alone, and inside the training step).
#pragma once
#include <cstdint>

namespace fastmlp::cpu {

// An optimizer update over this many elements or more uses the pool (a cold
// pool: nothing ran in parallel just before it).
constexpr int64_t kParallelUpdateElements = 1 << 16;

}  // namespace fastmlp::cpu
