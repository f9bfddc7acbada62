#include "budget.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvrt::runtime {
namespace {

// Adds `add` to `used` unless that would pass `limit` (negative = no limit). Lock-free, so
// concurrent sequences never overshoot a budget together.
bool TryReserve(std::atomic<int64_t>& used, int64_t add, int64_t limit) {
  if (limit < 0 || add <= 0) {
    used += add;
    return true;
  }
  int64_t cur = used.load();
  do {
    if (cur + add > limit) return false;
  } while (!used.compare_exchange_weak(cur, cur + add));
  return true;
}

}  // namespace

absl::Status BudgetReservation::Reserve(const RuntimeConfig& cfg, Runtime::Counters* counters,
                                        int64_t gpu_bytes, int64_t new_cold, std::size_t tb,
                                        int64_t index_bytes) {
  Release();
  new_cold = std::max<int64_t>(new_cold, 0);
  index_bytes = std::max<int64_t>(index_bytes, 0);
  if (!TryReserve(counters->gpu_allocated_bytes, gpu_bytes,
                  cfg.gpu_memory_limit > 0 ? cfg.gpu_memory_limit : -1))
    return absl::ResourceExhaustedError(absl::StrCat(
        "GPU-tier memory limit: ", counters->gpu_allocated_bytes.load(), " bytes in use + ",
        gpu_bytes, " needed > gpu_memory_limit ", cfg.gpu_memory_limit));
  // host_tokens is counted in tokens; the budget covers the store and the indexes.
  const int64_t per_token = cfg.rows_per_token() * static_cast<int64_t>(tb);
  const int64_t token_limit =
      cfg.host_memory_limit > 0
          ? std::max<int64_t>(
                0, (cfg.host_memory_limit - counters->index_bytes.load() - index_bytes) / per_token)
          : -1;
  // NOTE: index_bytes counts even when no token goes cold, and an index that would not fit
  // fails the call like a store that would not: the limit covers both (kvrt.h).
  const bool index_fits =
      cfg.host_memory_limit <= 0 ||
      counters->host_tokens.load() * per_token + counters->index_bytes.load() + index_bytes <=
          cfg.host_memory_limit;
  if (!index_fits || !TryReserve(counters->host_tokens, new_cold, token_limit)) {
    counters->gpu_allocated_bytes -= gpu_bytes;
    return absl::ResourceExhaustedError(absl::StrCat(
        "host memory limit: ", counters->host_tokens.load() * per_token, " bytes of host store + ",
        counters->index_bytes.load(), " of indexes in use, ", new_cold * per_token,
        " more for the store and up to ", index_bytes,
        " for index growth needed > host_memory_limit ", cfg.host_memory_limit));
  }
  counters->index_bytes += index_bytes;
  counters_ = counters;
  gpu_bytes_ = gpu_bytes;
  cold_tokens_ = new_cold;
  index_bytes_ = index_bytes;
  return absl::OkStatus();
}

int64_t IndexGrowthBound(const RuntimeConfig& cfg, int64_t cold_rows, int64_t min_rows,
                         int64_t accounted) {
  if (cfg.index_kind == cpu_index::IndexKind::kExact || cold_rows < min_rows) return 0;
  const int64_t bound = cfg.num_kv_heads * cpu_index::IndexBytesBound(cfg.index_kind, cfg.index,
                                                                      cfg.head_dim, cold_rows);
  return std::max<int64_t>(0, bound - accounted);
}

void BudgetReservation::Release() {
  if (counters_ == nullptr) return;
  counters_->gpu_allocated_bytes -= gpu_bytes_;
  counters_->host_tokens -= cold_tokens_;
  counters_->index_bytes -= index_bytes_;
  counters_ = nullptr;
}

}  // namespace kvrt::runtime
