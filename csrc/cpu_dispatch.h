// Run-time choice between a CPU kernel's vectorized loops and its baseline loops, shared by the CPU kernels.
#pragma once

#include <cstdlib>
#include <string>

namespace segformer_fast {

// SEGFORMER_FAST_CPU_BASELINE=1 keeps every CPU kernel on its baseline loops (read once per process; the tests run
// a process each way and compare the two paths).
inline bool cpu_baseline_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("SEGFORMER_FAST_CPU_BASELINE");
    return value != nullptr && std::string(value) == "1";
  }();
  return forced;
}

}  // namespace segformer_fast
