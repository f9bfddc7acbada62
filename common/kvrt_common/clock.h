#pragma once
// The one clock of kvrt_stats' time counters and the timeline (monotonic, ns).
#include <chrono>
#include <cstdint>

namespace kvrt {

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace kvrt
