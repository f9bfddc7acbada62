#pragma once
// Device helpers shared by the kernels: storage types, 16-byte vector loads, error plumbing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace kvrt::gpu::detail {

inline cudaStream_t AsStream(void* s) { return static_cast<cudaStream_t>(s); }
inline Err CudaErr(cudaError_t e) { return Err{static_cast<int>(e), nullptr}; }
inline Err LastLaunchErr() { return CudaErr(cudaGetLastError()); }
// Loads a kernel now: under CUDA's lazy loading (the default) each kernel is loaded at its first
// launch, which on a decode path costs 0.03-0.9 ms per kernel (the first decode token, profiled).
template <typename Kernel>
inline Err LoadKernel(Kernel* kernel) {
  cudaFuncAttributes attrs;
  const cudaError_t e = cudaFuncGetAttributes(&attrs, kernel);
  if (e != cudaSuccess) (void)cudaGetLastError();  // not left for a later launch's check
  return CudaErr(e);
}
inline Err BadHeadDim() { return Err{0, "unsupported head_dim (supported: 64, 128, 256)"}; }
inline Err BadDType() { return Err{0, "unsupported dtype"}; }

inline __device__ float ToF32(float x) { return x; }
inline __device__ float ToF32(__half x) { return __half2float(x); }
inline __device__ float ToF32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ T FromF32(float x);
template <>
inline __device__ float FromF32<float>(float x) {
  return x;
}
template <>
inline __device__ __half FromF32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
inline __device__ __nv_bfloat16 FromF32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads N consecutive elements (N * sizeof(T) a multiple of 16, 16-byte aligned) as f32.
template <typename T, int N>
__device__ __forceinline__ void LoadVec(const T* __restrict__ p, float (&out)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector loads are 16 bytes");
  constexpr int kLoads = N * sizeof(T) / 16;
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + l);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[l * kPer + i] = ToF32(e[i]);
  }
}

// Same but with raw words kept, so that two loads can be in flight before conversion.
template <typename T, int N>
struct RawVec {
  uint4 w[N * sizeof(T) / 16];
  __device__ __forceinline__ void Load(const T* __restrict__ p) {
#pragma unroll
    for (int l = 0; l < N * (int)sizeof(T) / 16; ++l)
      w[l] = __ldg(reinterpret_cast<const uint4*>(p) + l);
  }
  __device__ __forceinline__ float At(int i) const {
    return ToF32(reinterpret_cast<const T*>(w)[i]);
  }
};

// Float min / max for cub's block reductions.
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Dispatch helpers: the only instantiations are these three dtypes and three head dims.
#define KVRT_DISPATCH_DTYPE(dtype, T, ...) \
  switch (dtype) {                         \
    case ::kvrt::DType::kF32: {            \
      using T = float;                     \
      __VA_ARGS__                          \
    } break;                               \
    case ::kvrt::DType::kF16: {            \
      using T = __half;                    \
      __VA_ARGS__                          \
    } break;                               \
    case ::kvrt::DType::kBF16: {           \
      using T = __nv_bfloat16;             \
      __VA_ARGS__                          \
    } break;                               \
    default: return BadDType();            \
  }

#define KVRT_DISPATCH_HEAD_DIM(head_dim, D, ...) \
  switch (head_dim) {                            \
    case 64: {                                   \
      constexpr int D = 64;                      \
      __VA_ARGS__                                \
    } break;                                     \
    case 128: {                                  \
      constexpr int D = 128;                     \
      __VA_ARGS__                                \
    } break;                                     \
    case 256: {                                  \
      constexpr int D = 256;                     \
      __VA_ARGS__                                \
    } break;                                     \
    default: return BadHeadDim();                \
  }

}  // namespace kvrt::gpu::detail
