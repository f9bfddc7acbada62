#pragma once
// Memory budgets (config.gpu_memory_limit, config.host_memory_limit), shared by the host and the
// GPU backend so that both refuse the same appends with the same messages.
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_runtime/runtime.h"

namespace kvrt::runtime {

// Below this many cold tokens no index is built: an exact scan of so few keys is as cheap as a
// search, and IVF/graph builds on a handful of points are poor.
constexpr int64_t kIndexMinRows = 256;

// A reservation of GPU-tier bytes and cold (host) tokens; given back by Release() unless
// Commit() was called once the append succeeded.
class BudgetReservation {
 public:
  BudgetReservation() = default;
  BudgetReservation(const BudgetReservation&) = delete;
  BudgetReservation& operator=(const BudgetReservation&) = delete;
  ~BudgetReservation() { Release(); }

  // Reserves gpu_bytes of GPU-tier buffers, new_cold tokens of tb bytes (k or v, all kv heads)
  // in the host store and index_bytes of cold-index growth (an upper bound, IndexGrowthBound; the
  // caller adds it to the bytes its layer accounts, and the index update trues that up to the
  // index's real size), or nothing: ResourceExhausted naming the numbers and the limit.
  absl::Status Reserve(const RuntimeConfig& config, Runtime::Counters* counters, int64_t gpu_bytes,
                       int64_t new_cold, std::size_t tb, int64_t index_bytes = 0);
  void Commit() { counters_ = nullptr; }
  void Release();

 private:
  Runtime::Counters* counters_ = nullptr;
  int64_t gpu_bytes_ = 0, cold_tokens_ = 0, index_bytes_ = 0;
};

// Bytes by which a layer's cold indexes (all kv heads) may grow when its cold tier reaches
// cold_rows rows, given the bytes it accounts now: an upper bound (cpu_index::IndexBytesBound),
// 0 when no index exists at that size (exact kind, or fewer rows than min_rows).
int64_t IndexGrowthBound(const RuntimeConfig& config, int64_t cold_rows, int64_t min_rows,
                         int64_t accounted);

}  // namespace kvrt::runtime
