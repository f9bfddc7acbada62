#pragma once
// The running maximum of the softmax, NaN-propagating. std::max and fmaxf both drop a NaN
// operand, so a score that is NaN (a NaN in q or in a key, check_finite = 0) would vanish from
// the maximum: with every score NaN the state looked empty (lse = -inf, output 0). With this max a
// NaN score makes the max NaN, and from there the output and lse NaN, as kvrt.h promises. Shared
// by the host attention, the host references of the GPU kernels and the CUDA kernels, so that
// every path agrees.
#if defined(__CUDACC__)
#define KVRT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVRT_HOST_DEVICE inline
#endif

namespace kvrt {

// max(a, b), or NaN when either is NaN (the first NaN met: a, else b).
KVRT_HOST_DEVICE float MaxPropagateNan(float a, float b) { return (b > a || b != b) ? b : a; }

}  // namespace kvrt

#undef KVRT_HOST_DEVICE
