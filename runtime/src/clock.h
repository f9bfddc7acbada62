#pragma once
// The runtime's one clock for the time counters of kvrt_stats (monotonic, ns).
#include <chrono>
#include <cstdint>

namespace kvrt::runtime {

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace kvrt::runtime
