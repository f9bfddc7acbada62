#pragma once
// Internal interface between the code scan's launcher (code_scan.cc) and code_scan.cu (nvcc,
// C++17, no Abseil). Arguments are validated by the launcher.
#include "kvrt_gpu/code_scan.h"
#include "launch.h"

namespace kvrt::gpu::detail {

Err LaunchCodeScan(const CodeScanView& v, const float* q, int q_heads, float* scores, void* stream);

}  // namespace kvrt::gpu::detail
