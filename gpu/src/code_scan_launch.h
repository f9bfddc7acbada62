#pragma once
// Internal interface between the code scan's launcher (code_scan.cc) and code_scan.cu (nvcc,
// C++17, no Abseil). Arguments are validated by the launcher.
#include "kvrt_gpu/code_scan.h"
#include "launch.h"

namespace kvrt::gpu::detail {

Err LaunchCodeScan(const CodeScanView& v, const float* q, int q_heads, float* scores, void* stream);
Err LaunchCodeClusterMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                          const int32_t* size, float scale, float* lse, void* stream);
// Loads CodeClusterMass's kernels (LoadKernel): the selection on codes' first step must not.
Err PreloadCodeClusterMass();
Err LaunchCodeClusterLse(const CodeScanView& v, int q_heads, const float* scores,
                         const int64_t* begin, const int32_t* size, float scale, float* lse,
                         void* stream);

}  // namespace kvrt::gpu::detail
