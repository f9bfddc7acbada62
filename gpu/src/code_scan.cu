// The code scan (code_scan.h). CodeScan: one thread per row, 256 rows per CTA, one kv head per
// grid row.
// The group's queries sit in shared memory (the heads past the group zero, so that every thread
// runs the same MG sums); a thread decodes its row channel by channel (centroid + offset + step x
// code: the centroid rows of a cluster's neighbouring rows and the segment's grid come from L1)
// and folds each channel into the MG dot products. Scores are written per q head, rows
// consecutive across the CTA's threads (coalesced). NOTE: a first, CUDA-core version; tensor
// cores (the codes of a tile decoded to bf16 in shared memory) are the next step once measured.
#include <cstdint>

#include "code_scan_launch.h"
#include "code_tile.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace kvrt::gpu::detail {
namespace {

constexpr int kScanThreads = 256;
constexpr int kScanMaxDim = 256;

template <int MG>
__global__ void __launch_bounds__(kScanThreads)
    CodeScanKernel(CodeScanView v, const float* __restrict__ q, int g, float* __restrict__ out) {
  __shared__ float qs[MG * kScanMaxDim];
  const int kv = blockIdx.y;
  const int d = v.head_dim;
  for (int i = threadIdx.x; i < MG * d; i += blockDim.x) {
    const int h = i / d;
    qs[i] = h < g ? q[(static_cast<int64_t>(kv) * g + h) * d + i % d] : 0.f;
  }
  __syncthreads();
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kScanThreads + threadIdx.x;
  if (r >= v.rows) return;
  const int64_t at = static_cast<int64_t>(kv) * v.rows + r;
  const int32_t c = v.cluster[at];
  float acc[MG];
#pragma unroll
  for (int h = 0; h < MG; ++h) acc[h] = 0.f;
  if (c < 0 || c >= v.num_clusters) {
#pragma unroll
    for (int h = 0; h < MG; ++h) acc[h] = -INFINITY;
  } else {
    const int bits = v.bits, per = 8 / bits;
    const unsigned mask = (1u << bits) - 1;
    const int64_t row_bytes = (static_cast<int64_t>(d) * bits + 7) / 8;
    const int64_t segments = (v.rows + v.segment_rows - 1) / v.segment_rows;
    const uint8_t* code = v.code + at * row_bytes;
    const auto* cen = reinterpret_cast<const __nv_bfloat16*>(v.centroid) +
                      (static_cast<int64_t>(kv) * v.num_clusters + c) * d;
    const int64_t grid = (static_cast<int64_t>(kv) * segments + r / v.segment_rows) * d;
    const float* off = v.offset + grid;
    const float* stp = v.step + grid;
    for (int64_t b = 0; b < row_bytes; ++b) {
      const unsigned byte = __ldg(code + b);
      for (int j = 0; j < per; ++j) {
        const int t = static_cast<int>(b) * per + j;
        if (t >= d) break;
        const float key = __bfloat162float(cen[t]) + __ldg(off + t) +
                          __ldg(stp + t) * static_cast<float>((byte >> (j * bits)) & mask);
#pragma unroll
        for (int h = 0; h < MG; ++h) acc[h] = fmaf(qs[h * d + t], key, acc[h]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < MG; ++h)  // unrolled: acc stays in registers
    if (h < g) out[(static_cast<int64_t>(kv) * g + h) * v.rows + r] = acc[h];
}

template <int MG>
Err Launch(const CodeScanView& v, const float* q, int g, float* scores, void* stream) {
  const dim3 grid(static_cast<unsigned>((v.rows + kScanThreads - 1) / kScanThreads),
                  static_cast<unsigned>(v.kv_heads));
  CodeScanKernel<MG><<<grid, kScanThreads, 0, AsStream(stream)>>>(v, q, g, scores);
  return LastLaunchErr();
}

// One warp per (kv head, cluster), every q head of the group in turn: an online max and sum
// over the cluster's rows in the lanes, then one butterfly each.
constexpr int kLseWarps = 8;

__global__ void __launch_bounds__(kLseWarps * 32)
    CodeClusterLseKernel(CodeScanView v, int g, const float* __restrict__ scores,
                         const int64_t* __restrict__ begin, const int32_t* __restrict__ size,
                         float scale, float* __restrict__ lse) {
  const int kv = blockIdx.y;
  const int c = blockIdx.x * kLseWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= v.num_clusters) return;
  const int64_t at = static_cast<int64_t>(kv) * v.num_clusters + c;
  const int64_t b = begin[at], n = size[at];
  const float kNegInf = -INFINITY;
  for (int h = 0; h < g; ++h) {
    const int64_t qh = static_cast<int64_t>(kv) * g + h;
    const float* s = scores + qh * v.rows + b;
    float m = kNegInf, l = 0.f;
    for (int64_t r = lane; r < n; r += 32) {
      const float x = scale * s[r];
      if (x > m) {
        l = (m == kNegInf ? 0.f : l * __expf(m - x)) + 1.f;
        m = x;
      } else if (x != kNegInf) {
        l += __expf(x - m);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m, o);
      const float lo = __shfl_xor_sync(0xffffffffu, l, o);
      const float mm = fmaxf(m, mo);
      l = (m == kNegInf ? 0.f : l * __expf(m - mm)) + (mo == kNegInf ? 0.f : lo * __expf(mo - mm));
      m = mm;
    }
    if (lane == 0) lse[qh * v.num_clusters + c] = m == kNegInf ? kNegInf : m + __logf(l);
  }
}

// CodeClusterMass on tensor cores (mma.sync m16n8k16, f32 sums). A warp takes 16 consecutive
// clusters (so the segment it folds rarely changes): their centroids' scores as one MMA tile,
// then each cluster's rows in tiles of 16, the q heads of the group as the MMA's 8 columns (two
// column tiles for groups of 9-16). Per row,
//   scale x q . key = scale x q . centroid + scale x q . offset + sum_t (scale x q_t x step_t) c_t,
// the first term on bf16 MMAs with scale x q split hi + lo (about 16 bits of q, as the summary's
// scoring), the second a per-segment f32 sum, the third on f16 MMAs: the codes c_t are exact in
// f16 and the folded F_t = scale x q_t x step_t, normalized per head by its largest |F_t|, is
// rounded once to f16 (score error at most 2^-11 x sum_t |F_t| x (2^bits - 1)).
// The MMA's k-th column stands for channel 16 w + perm(k) (k = 2 tig + {0, 1, 8, 9} -> 4 tig + {0,
// 1, 2, 3}), so that a lane's four codes of a k-block are one contiguous 4 x bits field of the
// row: decoded to f16 pairs by one mask and the 1024 + x exponent trick, each code at a power of
// two that B's entries divide out. Each lane's running (max, sum) per cluster goes to shared
// memory and is merged over the row groups kMassFlush clusters at a time, one lane per (cluster,
// head). NOTE: at the 8B shape's 128K this takes 54 us on the H100 (the CUDA-core forms, two
// lanes per row and one: 110 and 168 us) and 51.5 us on the H200 (twenty-seventh session), still
// bound by instructions, not by the ~50 MB it reads: ncu counts ~340 warp instructions per
// cluster of 16, the integer pipe the busiest, half the issue slots idle at ~16 warps per SM.
constexpr int kMassWarps = 4;

// The deferred merge (one column tile): each lane's (max, sum) per cluster and head pair kept
// in shared memory for kMassFlush clusters, then merged over the row groups by one lane per
// (cluster, head), instead of two butterflies per cluster and head.
constexpr int kMassFlush = 8;

// KVB: 0, or the k-blocks of MassTile2's 2-bit vector path (head_dim / 16).
template <int BITS, int NT, int KVB>
__global__ void __launch_bounds__(kMassWarps * 32, 4)
    CodeClusterMassKernel(CodeScanView v, const float* __restrict__ q, int g,
                          const int64_t* __restrict__ begin, const int32_t* __restrict__ size,
                          float scale, float* __restrict__ lse) {
  constexpr bool kDefer = NT == 1;
  // B fragments: scale x q as bf16 hi and lo (per CTA: one kv head), and each warp's folded
  // F / (norm x slot scale) as f16 for the segment it is in.
  __shared__ uint4 qfrag[NT][kMassMaxKb][32];
  __shared__ uint2 ffrag[kMassWarps][NT][kMassMaxKb][32];
  __shared__ float4 state[kDefer ? kMassWarps : 1][kMassFlush][32];  // (m, l) of heads 2 tig + j
  const int kv = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = lane / 4, tig = lane % 4;
  const int d = v.head_dim, kb = d / 16, words = d * BITS / 32;
  const float kNegInf = -INFINITY;
  const float* qkv = q + static_cast<int64_t>(kv) * g * d;
  LoadQFragments<NT>(qkv, g, d, scale, qfrag[0][0]);
  __syncthreads();
  const int64_t segments = (v.rows + v.segment_rows - 1) / v.segment_rows;
  const auto* code = reinterpret_cast<const uint32_t*>(v.code);
  const int c0 = (blockIdx.x * kMassWarps + warp) * kWarpClusters;
  // Per column tile, the lane's two heads (2 tig, 2 tig + 1): the fold's norm and
  // scale x q . offset of the segment folded last, whose rows are [seg_lo, seg_hi).
  float norm[NT][2], cst[NT][2];
  int64_t seg_lo = 0, seg_hi = 0;
  // The warp's 16 clusters' ranges and their centroids' scores for the group's heads at once.
  int64_t my_begin;
  int my_size;
  float cen_score[NT][4] = {};
  WarpClusters<NT>(v, begin, size, kv, c0, lane, grp, tig, qfrag[0][0] + lane, my_begin, my_size,
                   cen_score);
  for (int i = 0; i < kWarpClusters && c0 + i < v.num_clusters; ++i) {
    const int c = c0 + i;
    const int64_t b = __shfl_sync(0xffffffffu, my_begin, i);
    const int n = __shfl_sync(0xffffffffu, my_size, i);
    float base[NT][2];  // cluster i's centroid score for heads 2 tig + {0, 1}
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) base[nt][j] = CentroidScore(cen_score[nt], i, j, tig);
    // Per head pair, this lane's running max and sum over its rows of the cluster.
    float m[NT][2], l[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      m[nt][0] = m[nt][1] = kNegInf;
      l[nt][0] = l[nt][1] = 0.f;
    }
    if (n > 0) {
      if (b < seg_lo || b >= seg_hi) {  // a new segment: fold q x step and q . offset for it
        const int64_t seg = b / v.segment_rows;
        seg_lo = seg * v.segment_rows;
        seg_hi = seg_lo + v.segment_rows;
        FoldSegment<BITS, NT>(v, qkv, g, scale, kv, segments, seg, grp, tig, lane,
                              ffrag[warp][0][0], norm, cst);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        base[nt][0] += cst[nt][0];
        base[nt][1] += cst[nt][1];
      }
      const uint32_t* rows = code + (static_cast<int64_t>(kv) * v.rows + b) * words;
      for (int r0 = 0; r0 < n; r0 += 16) {
        const bool va = r0 + grp < n, vb = r0 + grp + 8 < n;
        float acc[NT][4] = {};
        const uint32_t* pa = rows + (va ? r0 + grp : 0) * words;
        const uint32_t* pb = rows + (vb ? r0 + grp + 8 : 0) * words;
        if constexpr (KVB > 0) {
          MassTile2<KVB, NT>(pa, pb, tig, ffrag[warp][0][0] + lane, acc);
        } else {
          MassTile<BITS, NT>(pa, pb, kb, tig, ffrag[warp][0][0] + lane, acc);
        }
        // The tile's two rows into the running (max, sum), without branches: rows past the
        // cluster score -inf, and a lane with no row yet keeps (-inf, 0).
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float sa = va ? base[nt][j] + norm[nt][j] * acc[nt][j] : kNegInf;
            const float sb = vb ? base[nt][j] + norm[nt][j] * acc[nt][2 + j] : kNegInf;
            const float mn = fmaxf(m[nt][j], fmaxf(sa, sb));
            const float ms = mn == kNegInf ? 0.f : mn;
            l[nt][j] = l[nt][j] * __expf(m[nt][j] - ms) + __expf(sa - ms) + __expf(sb - ms);
            m[nt][j] = mn;
          }
      }
    }
    if constexpr (kDefer) {
      state[warp][i % kMassFlush][lane] = make_float4(m[0][0], l[0][0], m[0][1], l[0][1]);
      const int last = min(kWarpClusters, v.num_clusters - c0) - 1;
      if (i % kMassFlush == kMassFlush - 1 || i == last) {
        // Lane p: head p / kMassFlush of cluster c0 + i0 + p % kMassFlush (a head's clusters
        // in consecutive lanes: its lse row written in runs).
        __syncwarp();
        const int i0 = i - i % kMassFlush;
        for (int p = lane; p < g * kMassFlush; p += 32) {
          const int h = p / kMassFlush, ci = p % kMassFlush;
          if (i0 + ci > i) continue;
          const float* st = reinterpret_cast<const float*>(&state[warp][ci][h / 2]) + 2 * (h % 2);
          float2 x[8];
          float mm = kNegInf;
#pragma unroll
          for (int r = 0; r < 8; ++r) {  // row group r's lane r * 4 + h / 2
            x[r] = *reinterpret_cast<const float2*>(st + r * 16);
            mm = fmaxf(mm, x[r].x);
          }
          float ll = 0.f;
#pragma unroll
          for (int r = 0; r < 8; ++r) ll += x[r].x == kNegInf ? 0.f : x[r].y * __expf(x[r].x - mm);
          lse[(static_cast<int64_t>(kv) * g + h) * v.num_clusters + c0 + i0 + ci] =
              mm == kNegInf ? kNegInf : mm + __logf(ll);
        }
        __syncwarp();
      }
    } else {
      // Over the eight row groups (lanes of the same tig): the max, each lane's sum rescaled to
      // it (one exp), the sum; then lanes 0-3 write their two heads.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float mm = m[nt][j];
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
          float ll = m[nt][j] == kNegInf ? 0.f : l[nt][j] * __expf(m[nt][j] - mm);
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) ll += __shfl_xor_sync(0xffffffffu, ll, o);
          const int h = nt * 8 + 2 * tig + j;
          if (grp == 0 && h < g)
            lse[(static_cast<int64_t>(kv) * g + h) * v.num_clusters + c] =
                mm == kNegInf ? kNegInf : mm + __logf(ll);
        }
    }
  }
}

template <int BITS, int KVB>
void LaunchMass(dim3 grid, cudaStream_t st, const CodeScanView& v, const float* q, int g,
                const int64_t* begin, const int32_t* size, float scale, float* lse) {
  if (KVB == 0 && g > 8) {  // the vector path takes groups of up to 8 only
    CodeClusterMassKernel<BITS, 2, 0>
        <<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
  } else {
    CodeClusterMassKernel<BITS, 1, KVB>
        <<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
  }
}

template <int BITS, int KVB = 0>
Err PreloadMass() {
  Err e = LoadKernel(CodeClusterMassKernel<BITS, 1, KVB>);
  if (e.ok() && KVB == 0) e = LoadKernel(CodeClusterMassKernel<BITS, 2, 0>);
  return e;
}

}  // namespace

Err LaunchCodeClusterMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                          const int32_t* size, float scale, float* lse, void* stream) {
  if (v.kv_heads > 65535) return Err{0, "too many kv heads for one grid"};
  if (v.head_dim > kMassMaxDim) return BadHeadDim();
  constexpr int kPerCta = kMassWarps * kWarpClusters;
  const dim3 grid(static_cast<unsigned>((v.num_clusters + kPerCta - 1) / kPerCta),
                  static_cast<unsigned>(v.kv_heads));
  const int g = q_heads / v.kv_heads;
  const cudaStream_t st = AsStream(stream);
  switch (v.bits) {
    case 1: LaunchMass<1, 0>(grid, st, v, q, g, begin, size, scale, lse); break;
    case 2:
      // Rows of whole 16-byte vectors: MassTile2's vector loads, its k-blocks unrolled. NOTE:
      // only the 8B shape's head_dim 128 with one column tile (groups of up to 8) takes it: the
      // form run on a device (twenty-seventh session); head_dim 64 and 256 (KVB 4, 16) and
      // larger groups would work the same way but have not run yet.
      if (reinterpret_cast<uintptr_t>(v.code) % 16 == 0 && v.head_dim == 128 && g <= 8) {
        LaunchMass<2, 8>(grid, st, v, q, g, begin, size, scale, lse);
      } else {
        LaunchMass<2, 0>(grid, st, v, q, g, begin, size, scale, lse);
      }
      break;
    case 4: LaunchMass<4, 0>(grid, st, v, q, g, begin, size, scale, lse); break;
    default: LaunchMass<8, 0>(grid, st, v, q, g, begin, size, scale, lse); break;
  }
  return LastLaunchErr();
}

Err PreloadCodeClusterMass() {
  Err e = PreloadMass<1>();
  if (e.ok()) e = PreloadMass<2>();
  if (e.ok()) e = PreloadMass<2, 8>();
  if (e.ok()) e = PreloadMass<4>();
  if (e.ok()) e = PreloadMass<8>();
  return e;
}

Err LaunchCodeClusterLse(const CodeScanView& v, int q_heads, const float* scores,
                         const int64_t* begin, const int32_t* size, float scale, float* lse,
                         void* stream) {
  if (v.kv_heads > 65535) return Err{0, "too many kv heads for one grid"};
  const dim3 grid(static_cast<unsigned>((v.num_clusters + kLseWarps - 1) / kLseWarps),
                  static_cast<unsigned>(v.kv_heads));
  CodeClusterLseKernel<<<grid, kLseWarps * 32, 0, AsStream(stream)>>>(
      v, q_heads / v.kv_heads, scores, begin, size, scale, lse);
  return LastLaunchErr();
}

Err LaunchCodeScan(const CodeScanView& v, const float* q, int q_heads, float* scores,
                   void* stream) {
  const int g = q_heads / v.kv_heads;
  if ((v.rows + kScanThreads - 1) / kScanThreads > 0x7fffffff || v.kv_heads > 65535)
    return Err{0, "too many rows or kv heads for one grid"};
  if (g <= 1) return Launch<1>(v, q, g, scores, stream);
  if (g <= 2) return Launch<2>(v, q, g, scores, stream);
  if (g <= 4) return Launch<4>(v, q, g, scores, stream);
  if (g <= 8) return Launch<8>(v, q, g, scores, stream);
  return Launch<16>(v, q, g, scores, stream);
}

}  // namespace kvrt::gpu::detail
