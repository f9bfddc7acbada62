#pragma once
// fn(begin, end) over [0, n) in chunks of at least `grain`, run in parallel (in the caller's TBB
// arena) when there is more than one chunk. For the passes of one index search that a wide GQA
// group makes heavy: an MQA model's 48 q heads over one kv head are a step's only unit of parallel
// work, so the runtime's loop over kv heads leaves every core but one idle. Each chunk's arithmetic
// is what a serial pass does over it, so results do not depend on the split.
#include <cstdint>

#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::cpu_index::internal {

template <typename Fn>
void ParallelRange(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  if (n <= grain) {
    fn(int64_t{0}, n);
    return;
  }
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, grain),
                    [&](const tbb::blocked_range<int64_t>& r) { fn(r.begin(), r.end()); });
}

}  // namespace kvrt::cpu_index::internal
