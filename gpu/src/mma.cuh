#pragma once
// Warp-level tensor-core helpers (mma.sync, movmatrix) shared by the cluster kernels. Fragment
// layouts (PTX ISA, "mma.m16n8k16" and "movmatrix"), with grp = lane / 4 and tig = lane % 4:
//   a[0]: A[grp][2tig..+1]  a[1]: A[grp+8][2tig..+1]  a[2]: A[grp][2tig+8..+9]
//   a[3]: A[grp+8][2tig+8..+9];  b0: B[k = 2tig..+1][n = grp]  b1: B[k = 2tig+8..+9][n = grp];
//   d[0], d[1]: D[grp][2tig], D[grp][2tig+1];  d[2], d[3]: D[grp+8][2tig], D[grp+8][2tig+1].
// A word holds two 16-bit elements, the lower column (or k) in the low half.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace kvrt::gpu::detail {

// d += a b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a b, m16n8k16, f16 inputs, f32 accumulators.
__device__ __forceinline__ void MmaF16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// acc[0..1] += (a b)[grp][2tig..+1] where A's rows grp + 8 are zero (a[1] = a[3] = 0): the
// accumulators of the zero rows are not kept. T: the 16-bit inputs' type (bf16 or f16); f32 sums.
template <typename T>
__device__ __forceinline__ void MmaTopRows(float (&acc)[2], uint32_t a0, uint32_t a2, uint32_t b0,
                                           uint32_t b1) {
  float d[4] = {acc[0], acc[1], 0.f, 0.f};
  const uint32_t a[4] = {a0, 0u, a2, 0u};
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MmaBf16(d, a, b0, b1);
  } else {
    static_assert(std::is_same_v<T, __half>, "bf16 or f16");
    MmaF16(d, a, b0, b1);
  }
  acc[0] = d[0];
  acc[1] = d[1];
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lanes 8j..8j+7 give the 16-byte
// rows of matrix j, which lands in r[j] in fragment layout (lane: row grp, columns 2tig..+1);
// kTrans: each matrix transposed (lane: column grp, rows 2tig..+1), so that the rows of a
// row-major [k][n] matrix become a B fragment.
template <bool kTrans>
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  }
}

// v as two 16-bit T (bf16 or f16) in one word, each rounded to nearest, .x (the lower column or
// k) in the low half.
template <typename T>
__device__ __forceinline__ uint32_t Pack16(float2 v);
template <>
__device__ __forceinline__ uint32_t Pack16<__nv_bfloat16>(float2 v) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
  return static_cast<uint32_t>(__bfloat16_as_ushort(h.x)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
}
template <>
__device__ __forceinline__ uint32_t Pack16<__half>(float2 v) {
  const __half2 h = __floats2half2_rn(v.x, v.y);
  return static_cast<uint32_t>(__half_as_ushort(h.x)) |
         (static_cast<uint32_t>(__half_as_ushort(h.y)) << 16);
}

// Element i (0: the low half) of a word Pack16<T> made, as f32 (exact).
template <typename T>
__device__ __forceinline__ float Unpack16(uint32_t w, int i);
template <>
__device__ __forceinline__ float Unpack16<__nv_bfloat16>(uint32_t w, int i) {
  return __uint_as_float(i == 0 ? w << 16 : w & 0xffff0000u);
}
template <>
__device__ __forceinline__ float Unpack16<__half>(uint32_t w, int i) {
  return __half2float(
      __ushort_as_half(static_cast<unsigned short>(i == 0 ? w & 0xffffu : w >> 16)));
}

// v as pairs of 16-bit T hi + lo (lo = the rounding error of hi, rounded again): products with a
// 16-bit operand summed in f32 then keep about 16 bits of v instead of 8 (bf16; f16's lo may lose
// bits to its subnormals, still far below hi's error).
template <typename T>
__device__ __forceinline__ void Split16(float2 v, uint32_t& hi, uint32_t& lo) {
  hi = Pack16<T>(v);
  const float hx = Unpack16<T>(hi, 0), hy = Unpack16<T>(hi, 1);
  lo = Pack16<T>(make_float2(v.x - hx, v.y - hy));
}

// The 8 x 8 matrix of 16-bit elements the warp holds in fragment layout (lane: row grp, columns
// 2tig..+1) transposed, in the same layout.
__device__ __forceinline__ uint32_t Transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

}  // namespace kvrt::gpu::detail
