#pragma once
// Internal interface between the direct-step launchers (direct_attend.cc) and direct_attend.cu
// (nvcc, C++17). Arguments are validated by the launchers; these only enqueue work.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kvrt_gpu/direct_attend.h"
#include "launch.h"

namespace kvrt::gpu::detail {

// NOTE: the split count depends on the view's host fields only (not on the device), so that
// DirectAttendWorkspaceFloats is the same with and without CUDA. ~256 CTAs in all are one wave
// at two CTAs per SM (the kernel's register budget) on an H100/H200, with loads in flight on
// every SM (PCIe latency is 1-2 us); more splits would also lengthen the merge of the splits'
// states, and a split of fewer than kDirectMinSplitRows store rows costs more in its merge than
// it hides.
inline constexpr int kDirectTargetCtas = 256;
inline constexpr int kDirectMaxSplits = kDirectAttendMaxSplits;
inline constexpr int64_t kDirectMinSplitRows = 256;

inline int DirectSplits(const DirectRowsView& v) {
  const int64_t by_ctas = (kDirectTargetCtas + v.kv_heads - 1) / std::max(v.kv_heads, 1);
  const int64_t by_rows = (v.rows + kDirectMinSplitRows - 1) / kDirectMinSplitRows;
  const int64_t s = std::min<int64_t>({by_ctas, by_rows, kDirectMaxSplits});
  return static_cast<int>(std::max<int64_t>(1, s));
}

// Split partial states: o [splits, q_heads, d], then lse [splits, q_heads].
inline std::size_t DirectWorkspaceFloats(const DirectRowsView& v) {
  return static_cast<std::size_t>(DirectSplits(v)) * v.q_heads * (v.head_dim + 1);
}

Err LaunchMarkSelected(const int32_t* selected, const int32_t* count, int q_heads, int kv_heads,
                       int num_clusters, uint32_t* mask, void* stream);
// scale: resolved (not 0).
// rows_now: null or device (RowsNow).
Err LaunchDirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q, float scale,
                       float* o, float* lse, int64_t* read_rows, float* workspace, void* stream,
                       const int64_t* rows_now);
// The kernel alone: the split states into part_o [splits, q_heads, d], part_lse [splits, q_heads].
Err LaunchDirectAttendSplits(const DirectRowsView& v, const uint32_t* mask, const float* q,
                             float scale, float* part_o, float* part_lse, int64_t* read_rows,
                             void* stream, const int64_t* rows_now);
// The kernel for n members at once (1 <= n <= kDirectAttendBatchMax, one shape; scale resolved):
// member i's split states as LaunchDirectAttendSplits would write them.
Err LaunchDirectAttendBatch(const DirectAttendItem* items, int n, float scale, void* stream);
// Loads the direct step's kernels for this shape (LoadKernel); kv_heads > 0.
Err PreloadDirectStep(DType dtype, int head_dim, int q_heads, int kv_heads);
Err LaunchFillPages(const DirectRowsView& v, const int32_t* updates, int n, void* stream);
Err LaunchCommitStaged(const DirectRowsView& v, void* stream);
Err LaunchMissPenaltyOffsets(const DirectRowsView& v, float penalty, float* offset, void* stream);

}  // namespace kvrt::gpu::detail
