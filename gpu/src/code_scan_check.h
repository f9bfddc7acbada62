#pragma once
// Shared by the code scan's launchers and references (code_scan.cc, where they are defined) and
// the rest from value codes (code_rest.cc): argument checks (host-side fields only) and the
// references' map from rows to clusters.
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvrt_gpu/code_scan.h"

namespace kvrt::gpu::detail {

// CodeClusterMass's arguments: the view's shapes and arrays (no row clusters needed), q heads in
// whole groups, a finite scale > 0, a head_dim of whole 32-bit words of codes.
absl::Status CheckCodeMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                           const int32_t* size, float scale, const float* lse, const char* what);

// What the tensor-core kernels' vector loads need of CodeClusterMass's arrays: codes 4-byte
// aligned, q, offset and step 16-byte, the centroids 8-byte.
absl::Status CheckCodeMassAlignment(const CodeScanView& v, const float* q, const char* what);

// Each row's cluster, [kv_heads, rows] (-1: in none), from the clusters' row ranges [begin,
// begin + size) (host arrays): the view's `cluster` for CodeScanHost.
std::vector<int32_t> RowClusters(const CodeScanView& v, const int64_t* begin, const int32_t* size);

}  // namespace kvrt::gpu::detail
