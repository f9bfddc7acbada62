#pragma once
// Argument checks shared by the direct-step launchers (direct_attend.cc, where they are defined)
// and their host references (direct_attend_ref.cc): both answer InvalidArgument for the same
// arguments. They read host-side fields only; the references check the data themselves.
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_gpu/direct_attend.h"

namespace kvrt::gpu::detail {

absl::Status CheckMarkSelected(const int32_t* selected, const int32_t* count, int q_heads,
                               int kv_heads, int num_clusters, const uint32_t* mask,
                               const char* fn);
absl::Status CheckDirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q,
                               float scale, const float* o, const float* lse, const char* fn);
absl::Status CheckFillPages(const DirectRowsView& v, const int32_t* updates, int n, const char* fn);
absl::Status CheckCommitStaged(const DirectRowsView& v, const char* fn);
absl::Status CheckMissPenalty(const DirectRowsView& v, float penalty, const float* offset,
                              const char* fn);
// Whether a DirectAttend now reads store row `row` of kv head g from the pool (MissPenaltyOffsets'
// rule; the host reference's, the kernel has its own device copy).
inline bool PoolHoldsRow(const DirectRowsView& v, int g, int64_t row) {
  if (row < 0 || row >= v.rows) return false;
  const int64_t b = row / kDirectBlockRows;
  if (b >= v.blocks_per_head) return false;
  const int32_t e = v.block_page[static_cast<std::size_t>(g) * v.blocks_per_head + b];
  return v.staged_pages ? StagedHolds(e, row) : e >= 0;
}

}  // namespace kvrt::gpu::detail
