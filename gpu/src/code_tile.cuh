#pragma once
// Device helpers of the tensor-core code scan (code_scan.cu's CodeClusterMass and code_rest.cu's
// CodeValueRest): a lane's codes of a k-block decoded to f16 MMA operands, a 16-row tile of
// codes against the folded q x step, 16 clusters' centroid scores, and the per-segment fold. The
// layout and numerics are explained at CodeClusterMass (code_scan.cu).
#include <cuda_fp16.h>

#include <cstdint>

#include "kvrt_gpu/code_scan.h"
#include "mma.cuh"

namespace kvrt::gpu::detail {

constexpr int kMassMaxDim = 256;
constexpr int kMassMaxKb = kMassMaxDim / 16;
constexpr uint32_t kF16Magic = 0x64006400u;  // f16 1024.0 in both halves

// The lane's four codes of a k-block, field f (bit 0: the first), as two f16 pairs (slot 0 in
// lo's low half, 1 in its high half, 2 and 3 in hi's), each code times SlotScale<BITS>(slot).
template <int BITS>
__device__ __forceinline__ void DecodeField(uint32_t f, uint32_t& lo, uint32_t& hi) {
  uint32_t a, b;
  if constexpr (BITS == 1) {
    const uint32_t z = (f & 0xFu) * 0x10001u;
    a = z & 0x00020001u;
    b = z & 0x00080004u;
  } else if constexpr (BITS == 2) {
    const uint32_t z = (f & 0xFFu) * 0x10001u;
    a = z & 0x000C0003u;
    b = z & 0x00C00030u;
  } else if constexpr (BITS == 4) {
    a = ((f & 0xFFu) * 0x10001u) & 0x00F0000Fu;
    b = (((f >> 8) & 0xFFu) * 0x10001u) & 0x00F0000Fu;
  } else {
    a = __byte_perm(f, 0u, 0x4140);
    b = __byte_perm(f, 0u, 0x4342);
  }
  asm("sub.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(a | kF16Magic), "r"(kF16Magic));
  asm("sub.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(b | kF16Magic), "r"(kF16Magic));
}

// The factor DecodeField leaves on slot j's code (the field's bits stay where they are).
template <int BITS>
__device__ __forceinline__ float SlotScale(int j) {
  if constexpr (BITS == 1) return static_cast<float>(1 << j);
  if constexpr (BITS == 2) return static_cast<float>(1 << (2 * j));
  if constexpr (BITS == 4) return (j & 1) ? 16.f : 1.f;
  return 1.f;
}

// One 16-row tile of a cluster: acc[nt] += the codes of rows grp (pa) and grp + 8 (pb) times
// the folded B fragments ff (this lane's, k-block w at ff[w * 32], column tile nt at
// ff[nt * kMassMaxKb * 32]). The k-blocks are loaded kMassChunk at a time before their MMAs: one
// memory latency per chunk, not per k-block.
constexpr int kMassChunk = 8;

template <int BITS, int NT>
__device__ __forceinline__ void MassTile(const uint32_t* __restrict__ pa,
                                         const uint32_t* __restrict__ pb, int kb, int tig,
                                         const uint2* ff, float (&acc)[NT][4]) {
  for (int w0 = 0; w0 < kb; w0 += kMassChunk) {
    uint32_t fa[kMassChunk], fb[kMassChunk];
#pragma unroll
    for (int j = 0; j < kMassChunk; ++j) {
      const int w = w0 + j;
      if (w >= kb) break;
      const int bit = (16 * w + 4 * tig) * BITS;
      fa[j] = __ldg(pa + (bit >> 5)) >> (bit & 31);
      fb[j] = __ldg(pb + (bit >> 5)) >> (bit & 31);
    }
#pragma unroll
    for (int j = 0; j < kMassChunk; ++j) {
      const int w = w0 + j;
      if (w >= kb) break;
      uint32_t a[4];
      DecodeField<BITS>(fa[j], a[0], a[2]);
      DecodeField<BITS>(fb[j], a[1], a[3]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 f = ff[(nt * kMassMaxKb + w) * 32];
        MmaF16(acc[nt], a, f.x, f.y);
      }
    }
  }
}

// (x & mask) | or in one LOP3 (two immediates would take two).
__device__ __forceinline__ uint32_t AndOr(uint32_t x, uint32_t mask, uint32_t orv) {
  uint32_t y;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(y) : "r"(x), "r"(mask), "r"(orv));
  return y;
}

__device__ __forceinline__ uint32_t SubMagic(uint32_t x) {
  uint32_t y;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(y) : "r"(x), "r"(kF16Magic));
  return y;
}

// MassTile for 2-bit codes, KB k-blocks (head_dim 16 x KB, a multiple of 64) and 16-byte aligned
// codes: each row's k-blocks in KB / 4 16-byte loads, and a lane's field (byte tig of the
// k-block's word) spread to both halves by one byte permute.
template <int KB, int NT>
__device__ __forceinline__ void MassTile2(const uint32_t* __restrict__ pa,
                                          const uint32_t* __restrict__ pb, int tig, const uint2* ff,
                                          float (&acc)[NT][4]) {
  static_assert(KB % 4 == 0 && KB <= kMassMaxKb, "whole 16-byte vectors");
  const uint32_t sel = 0x4040u | static_cast<uint32_t>(tig) | (static_cast<uint32_t>(tig) << 8);
  const auto* va = reinterpret_cast<const uint4*>(pa);
  const auto* vb = reinterpret_cast<const uint4*>(pb);
#pragma unroll
  for (int w0 = 0; w0 < KB; w0 += 8) {
    uint32_t wa[8], wb[8];
#pragma unroll
    for (int h = 0; h < 2 && w0 + 4 * h < KB; ++h) {
      const uint4 x = __ldg(va + w0 / 4 + h), y = __ldg(vb + w0 / 4 + h);
      wa[4 * h] = x.x, wa[4 * h + 1] = x.y, wa[4 * h + 2] = x.z, wa[4 * h + 3] = x.w;
      wb[4 * h] = y.x, wb[4 * h + 1] = y.y, wb[4 * h + 2] = y.z, wb[4 * h + 3] = y.w;
    }
#pragma unroll
    for (int j = 0; j < 8 && w0 + j < KB; ++j) {
      const uint32_t za = __byte_perm(wa[j], 0u, sel), zb = __byte_perm(wb[j], 0u, sel);
      const uint32_t a[4] = {
          SubMagic(AndOr(za, 0x000C0003u, kF16Magic)), SubMagic(AndOr(zb, 0x000C0003u, kF16Magic)),
          SubMagic(AndOr(za, 0x00C00030u, kF16Magic)), SubMagic(AndOr(zb, 0x00C00030u, kF16Magic))};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 f = ff[(nt * kMassMaxKb + w0 + j) * 32];
        MmaF16(acc[nt], a, f.x, f.y);
      }
    }
  }
}

// The centroids' scores of clusters grp (ca) and grp + 8 (cb) of the warp's 16, the A rows, for
// the q heads of each column tile: base[nt] += centroid . (scale x q) on bf16 MMAs, q as hi + lo
// (qf: this lane's fragments, k-block w at qf[w * 32], column tile nt at
// qf[nt * kMassMaxKb * 32]).
template <int NT>
__device__ __forceinline__ void MassBase(const uint2* __restrict__ ca, const uint2* __restrict__ cb,
                                         int kb, int tig, const uint4* qf, float (&base)[NT][4]) {
  for (int w0 = 0; w0 < kb; w0 += kMassChunk) {
    uint2 xa[kMassChunk], xb[kMassChunk];
#pragma unroll
    for (int j = 0; j < kMassChunk; ++j) {
      if (w0 + j >= kb) break;
      xa[j] = __ldg(ca + 4 * (w0 + j) + tig);
      xb[j] = __ldg(cb + 4 * (w0 + j) + tig);
    }
#pragma unroll
    for (int j = 0; j < kMassChunk; ++j) {
      const int w = w0 + j;
      if (w >= kb) break;
      const uint32_t a[4] = {xa[j].x, xb[j].x, xa[j].y, xb[j].y};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 f = qf[(nt * kMassMaxKb + w) * 32];
        MmaBf16(base[nt], a, f.x, f.y);
        MmaBf16(base[nt], a, f.z, f.w);
      }
    }
  }
}

// Clusters per warp in both kernels: the centroid tile's 16 MMA rows.
constexpr int kWarpClusters = 16;

// A warp's kWarpClusters clusters c0.. of kv head kv (rows of cluster c: [begin, begin + size) at
// kv x num_clusters + c): lane i < 16 loads cluster c0 + i's range into (my_begin, my_size), and
// every lane the scores of centroids c0 + grp and c0 + grp + 8 for its heads (MassBase; nothing
// when c0 is past the clusters).
template <int NT>
__device__ __forceinline__ void WarpClusters(const CodeScanView& v,
                                             const int64_t* __restrict__ begin,
                                             const int32_t* __restrict__ size, int kv, int c0,
                                             int lane, int grp, int tig, const uint4* qf,
                                             int64_t& my_begin, int& my_size,
                                             float (&cen_score)[NT][4]) {
  const int C = v.num_clusters, d = v.head_dim;
  my_begin = 0;
  my_size = 0;
  if (lane < kWarpClusters && c0 + lane < C) {
    my_begin = begin[static_cast<int64_t>(kv) * C + c0 + lane];
    my_size = size[static_cast<int64_t>(kv) * C + c0 + lane];
  }
  if (c0 >= C) return;
  const int ca = min(c0 + grp, C - 1), cb = min(c0 + grp + 8, C - 1);
  const auto* cen =
      reinterpret_cast<const uint2*>(v.centroid) + static_cast<int64_t>(kv) * C * (d / 4);
  MassBase<NT>(cen + static_cast<int64_t>(ca) * (d / 4), cen + static_cast<int64_t>(cb) * (d / 4),
               d / 16, tig, qf, cen_score);
}

// Cluster i (of WarpClusters')'s centroid score for the lane's head 2 tig + j of a column
// tile, from that tile's cen_score.
__device__ __forceinline__ float CentroidScore(const float (&cen_score)[4], int i, int j, int tig) {
  return __shfl_sync(0xffffffffu, i < 8 ? cen_score[j] : cen_score[2 + j], (i % 8) * 4 + tig);
}

// The segment seg's fold for the q heads of kv head kv (this lane: head nt x 8 + grp, channels
// 16 w + 4 tig + {0..3}): the f16 B fragments F / (norm x slot scale) with F = scale x q x step
// into ff (this warp's [NT][kMassMaxKb][32]), and per column tile the lane's two heads' (2 tig,
// 2 tig + 1) norm and scale x q . offset. Warp-synchronous.
template <int BITS, int NT>
__device__ __forceinline__ void FoldSegment(const CodeScanView& v, const float* __restrict__ qkv,
                                            int g, float scale, int kv, int64_t segments,
                                            int64_t seg, int grp, int tig, int lane, uint2* ff,
                                            float (&norm)[NT][2], float (&cst)[NT][2]) {
  const int d = v.head_dim, kb = d / 16;
  const int64_t grid = (static_cast<int64_t>(kv) * segments + seg) * d;
  const float* stp = v.step + grid;
  const float* off = v.offset + grid;
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int h = nt * 8 + grp;
    const float* qh = qkv + (h < g ? h : 0) * d;
    const float on = h < g ? scale : 0.f;
    float amax = 0.f, sum = 0.f;
#pragma unroll 4
    for (int w = 0; w < kb; ++w) {
      const int t = 16 * w + 4 * tig;
      const float4 x = __ldg(reinterpret_cast<const float4*>(qh + t));
      const float4 s = __ldg(reinterpret_cast<const float4*>(stp + t));
      const float4 o = __ldg(reinterpret_cast<const float4*>(off + t));
      amax = fmaxf(amax, fmaxf(fmaxf(fabsf(x.x * s.x), fabsf(x.y * s.y)),
                               fmaxf(fabsf(x.z * s.z), fabsf(x.w * s.w))));
      sum += x.x * o.x + x.y * o.y + x.z * o.z + x.w * o.w;
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = amax > 0.f ? 1.f / amax : 0.f;
#pragma unroll 4
    for (int w = 0; w < kb; ++w) {
      const int t = 16 * w + 4 * tig;
      const float4 x = __ldg(reinterpret_cast<const float4*>(qh + t));
      const float4 s = __ldg(reinterpret_cast<const float4*>(stp + t));
      const float k = h < g ? inv : 0.f;  // F / norm = q x step / amax (scale cancels)
      ff[(nt * kMassMaxKb + w) * 32 + lane] =
          make_uint2(Pack16<__half>(make_float2(k * x.x * s.x / SlotScale<BITS>(0),
                                                k * x.y * s.y / SlotScale<BITS>(1))),
                     Pack16<__half>(make_float2(k * x.z * s.z / SlotScale<BITS>(2),
                                                k * x.w * s.w / SlotScale<BITS>(3))));
    }
    const float nrm = on * amax;
    const float cs = on * sum;
    norm[nt][0] = __shfl_sync(0xffffffffu, nrm, 8 * tig);
    norm[nt][1] = __shfl_sync(0xffffffffu, nrm, 8 * tig + 4);
    cst[nt][0] = __shfl_sync(0xffffffffu, cs, 8 * tig);
    cst[nt][1] = __shfl_sync(0xffffffffu, cs, 8 * tig + 4);
  }
  __syncwarp();
}

// scale x q of kv head kv's heads as bf16 hi and lo B fragments, qf [NT][kMassMaxKb][32] (lane
// l: head nt x 8 + l / 4, channels 16 w + 4 (l % 4) + {0..3}; heads past g zero), by the CTA's
// threads. The caller synchronizes before reading.
template <int NT>
__device__ __forceinline__ void LoadQFragments(const float* __restrict__ qkv, int g, int d,
                                               float scale, uint4* qf) {
  const int kb = d / 16;
  for (int i = threadIdx.x; i < NT * kb * 32; i += blockDim.x) {
    const int nt = i / (kb * 32), w = i / 32 % kb, l = i % 32;
    const int n = nt * 8 + l / 4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (n < g) x = __ldg(reinterpret_cast<const float4*>(qkv + n * d + 16 * w + 4 * (l % 4)));
    uint4 f;
    Split16<__nv_bfloat16>(make_float2(scale * x.x, scale * x.y), f.x, f.z);
    Split16<__nv_bfloat16>(make_float2(scale * x.z, scale * x.w), f.y, f.w);
    qf[(nt * kMassMaxKb + w) * 32 + l] = f;
  }
}

}  // namespace kvrt::gpu::detail
