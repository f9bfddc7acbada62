#pragma once
// Argument checks shared by the code scan's launchers and references (code_scan.cc, where they are
// defined) and the rest from value codes (code_rest.cc). Host-side fields only.
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_gpu/code_scan.h"

namespace kvrt::gpu::detail {

// CodeClusterMass's arguments: the view's shapes and arrays (no row clusters needed), q heads in
// whole groups, a finite scale > 0, a head_dim of whole 32-bit words of codes.
absl::Status CheckCodeMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                           const int32_t* size, float scale, const float* lse, const char* what);

}  // namespace kvrt::gpu::detail
