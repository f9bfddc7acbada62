#pragma once
// Internal interface between the rest-from-value-codes launcher (code_rest.cc) and code_rest.cu
// (nvcc, C++17, no Abseil). Arguments are validated by the launcher.
#include <cstdint>

#include "kvrt_gpu/code_rest.h"
#include "launch.h"

namespace kvrt::gpu::detail {

// The partial states CodeValueRest's partial kernel writes per q head (one per warp; a warp takes
// every so many clusters, so that one wave of CTAs covers the kv heads).
int64_t CodeValueRestChunks(int num_clusters, int kv_heads);
Err LaunchCodeValueRest(const CodeScanView& keys, const CodeValueView& values, const float* q,
                        int q_heads, const int64_t* begin, const int32_t* size,
                        const uint8_t* attended, const float* cluster_lse, float scale,
                        float* workspace, float* o, float* lse, void* stream);

Err LaunchAttendedFromSelection(const int32_t* selected, const int32_t* count, int q_heads,
                                int num_clusters, uint8_t* attended, void* stream);

}  // namespace kvrt::gpu::detail
