#pragma once
// Memory budgets (config.gpu_memory_limit, config.host_memory_limit), shared by the host and the
// GPU backend so that both refuse the same appends with the same messages.
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_runtime/runtime.h"

namespace kvrt::runtime {

// A reservation of GPU-tier bytes and cold (host) tokens; given back by Release() unless
// Commit() was called once the append succeeded.
class BudgetReservation {
 public:
  BudgetReservation() = default;
  BudgetReservation(const BudgetReservation&) = delete;
  BudgetReservation& operator=(const BudgetReservation&) = delete;
  ~BudgetReservation() { Release(); }

  // Reserves gpu_bytes of GPU-tier buffers and new_cold tokens of tb bytes (k or v, all kv
  // heads) in the host store, or nothing: ResourceExhausted naming the numbers and the limit.
  absl::Status Reserve(const RuntimeConfig& config, Runtime::Counters* counters, int64_t gpu_bytes,
                       int64_t new_cold, std::size_t tb);
  void Commit() { counters_ = nullptr; }
  void Release();

 private:
  Runtime::Counters* counters_ = nullptr;
  int64_t gpu_bytes_ = 0, cold_tokens_ = 0;
};

}  // namespace kvrt::runtime
