#pragma once
// RingAppendToStore's and RingAppendRowsToHeads' argument checks, shared by the launcher
// (kernels.cc) and the host reference (kernels_ref.cc).
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_gpu/kernel_types.h"

namespace kvrt::gpu::detail {

// The shape (CheckRing's) and the pointers; not the data (the reference checks the store rows).
absl::Status CheckRingToStore(const RingBatch& ring, const void* new_k, const void* new_v,
                              int n_new, const RingStoreTarget& store, const int64_t* write_pos,
                              const char* fn);
// RingAppendRows' checks with no token-major eviction, then the heads' targets.
absl::Status CheckRingRowsToHeads(const RingRows& ring, const void* new_k, const void* new_v,
                                  int64_t n, const HeadRows& evict);

}  // namespace kvrt::gpu::detail
