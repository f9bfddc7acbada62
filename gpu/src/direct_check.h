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

}  // namespace kvrt::gpu::detail
