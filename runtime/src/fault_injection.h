#pragma once
// Test-only fault injection (docs/errors.md, docs/reliability.md): makes the next N cold-index
// updates or searches fail, so that tests can provoke KVRT_ERR_INTERNAL and check that a failed
// index update does not half-apply an append. Not part of the public C API (kvrt.h); tests reach
// it through the static library and the internal headers.
//
// Cost when off: one relaxed atomic load per index update / search (no lock, no allocation).
// The counters are process-wide, so a test that arms them must not share its process with other
// runtimes doing index work at the same time (ctest runs every test case in its own process).
#include <atomic>

#include "absl/status/status.h"

namespace kvrt::runtime::fault {

enum class Site : int {
  kIndexUpdate = 0,  // one kv head's cold-index build or insert (LayerState::UpdateIndexes)
  kIndexSearch = 1,  // one cold-index search: one q head's, or one GQA group's (cold_tier.cc)
};
inline constexpr int kNumSites = 2;

enum class Mode : int {
  kStatus = 0,    // the index call returns absl::InternalError (what FAISS/hnswlib failures become)
  kThrow = 1,     // the index call throws std::runtime_error (an exception no index caught)
  kBadAlloc = 2,  // the index call throws std::bad_alloc (an allocation inside the index failed)
};

// Arms the next n hits of `site` to fail in `mode` (n = 0 disarms). Thread-safe.
void FailNext(Site site, int n, Mode mode = Mode::kStatus);
// Faults of `site` armed and not yet consumed.
int Pending(Site site);

namespace detail {
extern std::atomic<int> armed[kNumSites];
absl::Status Consume(Site site, const char* kind, const char* operation);
}  // namespace detail

// At an injection site, before the index call: OK when nothing is armed (the fast path, which
// builds no message); otherwise consumes one fault and returns
// InternalError("<kind> <operation>: injected fault (test hook)") or throws it.
inline absl::Status Check(Site site, const char* kind, const char* operation) {
  if (detail::armed[static_cast<int>(site)].load(std::memory_order_relaxed) <= 0)
    return absl::OkStatus();
  return detail::Consume(site, kind, operation);
}

}  // namespace kvrt::runtime::fault
