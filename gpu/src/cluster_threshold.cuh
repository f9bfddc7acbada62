#pragma once
// Device helpers of the selection's threshold search (cluster_threshold.h has the layout), shared
// by the select kernel (cluster_score.cu) and the threshold kernels (cluster_threshold.cu).
#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_threshold.h"

namespace kvrt::gpu::detail {

// An order-preserving uint32 of a float (the selection's keys).
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The linear bin of key dj over [lo, hi) at inv = kLinBins / (hi - lo): non-decreasing in dj,
// NaN-safe (fmaxf takes the number); the top key lands past the last bin and is clamped. Every
// kernel that bins must use this one function with the same lo, hi and inv.
__device__ __forceinline__ int LinBin(float dj, float lo, float inv) {
  return min(kLinBins - 1, static_cast<int>(fmaxf((dj - lo) * inv, 0.f)));
}
__device__ __forceinline__ bool LinearRange(float lo, float hi, float inv) {
  return hi > lo && isfinite(inv) && isfinite(lo) && isfinite(hi);
}

}  // namespace kvrt::gpu::detail
