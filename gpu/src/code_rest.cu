// CodeValueRest (code_rest.h) on tensor cores, in three launches: each q head's stabilizer (the
// largest mass among the clusters it leaves out), the partial states per warp of 16 clusters, and
// their sum per q head.
// The partial kernel scores a cluster's rows as CodeClusterMass does (code_tile.cuh: the same
// fold, centroid tile and code tile, so the same scores), weighs row r for head h by
// p = exp(s - top_h) (0 for a head that attends the cluster; top_h >= every such score, so p <=
// 1 and no running rescale is needed), and accumulates sum_r p x code_r on f16 MMAs with the
// value codes as A (16 channels x 16 rows) and P as B (16 rows x 8 heads, the score tile's
// fragment transposed by movmatrix): lane grp holds channels 16 w + 2 grp and + 1 of every
// 16-channel word w, so a lane's two codes of a row are one 4-bit field, decoded to the residual
// offset + step x code in f16 (the segment's grid as f16 pairs in shared memory; SyncSummary in
// runtime/src/device_tier.cc keeps residuals within f16's range). The value means enter once per
// cluster (its total p x the mean). One accumulator per channel and head: no per-segment flush.
#include <algorithm>
#include <cstdint>

#include "code_rest_launch.h"
#include "code_tile.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace kvrt::gpu::detail {
namespace {

constexpr int kRestWarps = 4;
// The partial kernel's CTAs per SM, by key tile: its registers capped at 168 for the 2-bit-key
// vector tile (KVB > 0; 4 bytes spill since the loads ahead, which still measured faster); the
// other key tiles need more and run two.
// The grid is sized by the same count (RestCtas): a grid of three per SM for a kernel that fits
// two ran one and a half waves (d = 256: 428.8 against 299.0 us, H100, thirtieth session).
constexpr int RestCtasPerSm(int kvb) { return kvb > 0 ? 3 : 2; }
constexpr int kTopThreads = 1024;

// x * y + z on f16 pairs.
__device__ __forceinline__ uint32_t Fma16(uint32_t x, uint32_t y, uint32_t z) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(z));
  return r;
}

// top [q_heads]: per q head, the largest cluster_lse among the clusters it does not attend (-inf:
// none).
__global__ void __launch_bounds__(kTopThreads)
    RestTopKernel(int num_clusters, const uint8_t* __restrict__ attended,
                  const float* __restrict__ cluster_lse, float* __restrict__ top) {
  __shared__ float part[kTopThreads / 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * num_clusters;
  float m = -INFINITY;
  for (int c = threadIdx.x; c < num_clusters; c += kTopThreads)
    if (attended[row + c] == 0) m = fmaxf(m, cluster_lse[row + c]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kTopThreads / 32; ++i) m = fmaxf(m, part[i]);
    top[blockIdx.x] = m;
  }
}

// Partial states: part_o [chunks, q_heads, d] (sum of p x value, unnormalized) and part_l
// [chunks, q_heads] (sum of p), chunk = the warp's index along the grid's x. At most 8 q heads per
// kv head (one column tile), 2-bit value codes, D16 = head_dim / 16; KVB as CodeClusterMass's.
template <int BITS, int D16, int KVB>
__global__ void __launch_bounds__(kRestWarps * 32, RestCtasPerSm(KVB))
    RestPartialKernel(CodeScanView v, CodeValueView val, const float* __restrict__ q, int g,
                      const int64_t* __restrict__ begin, const int32_t* __restrict__ size,
                      const uint8_t* __restrict__ attended, const float* __restrict__ top,
                      float scale, float* __restrict__ part_o, float* __restrict__ part_l) {
  __shared__ uint4 qfrag[1][kMassMaxKb][32];
  __shared__ uint2 ffrag[kRestWarps][1][kMassMaxKb][32];
  // The segment's value grid for the A fragments: [w x 8 + grp] = f16 pairs (step, step),
  // (offset, offset) of channel 16 w + 2 grp, then of channel 16 w + 2 grp + 1.
  __shared__ uint4 vgrid[kRestWarps][D16 * 8];
  const int kv = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = lane / 4, tig = lane % 4;
  const int d = v.head_dim, words = d * BITS / 32;
  const int C = v.num_clusters, H = v.kv_heads * g;
  const float* qkv = q + static_cast<int64_t>(kv) * g * d;
  LoadQFragments<1>(qkv, g, d, scale, qfrag[0][0]);
  __syncthreads();
  const int64_t segments = (v.rows + v.segment_rows - 1) / v.segment_rows;
  const auto* code = reinterpret_cast<const uint32_t*>(v.code);
  const auto* vcode = reinterpret_cast<const uint4*>(val.code);  // D16 / 4 vectors per row
  const int chunk = blockIdx.x * kRestWarps + warp;
  // This lane's heads 2 tig + j and their stabilizers.
  const int h0 = 2 * tig, h1 = 2 * tig + 1;
  const float top0 = h0 < g ? top[kv * g + h0] : -INFINITY;
  const float top1 = h1 < g ? top[kv * g + h1] : -INFINITY;
  // acc: the chunk's sum p x value; [w][j]: channel 16 w + 2 grp + j / 2, head 2 tig + j % 2.
  // The codes enter decoded (offset + step x code, f16) as the MMA's A, the means per cluster.
  float acc[D16][4] = {};
  float l0 = 0.f, l1 = 0.f;
  float norm[1][2] = {}, cst[1][2] = {};
  int64_t seg_lo = 0, seg_hi = 0;
  // The warp's clusters kWarpClusters at a time, strided over the grid (one wave of CTAs: few
  // partials to sum).
  for (int c0 = chunk * kWarpClusters; c0 < C; c0 += gridDim.x * kRestWarps * kWarpClusters) {
    int64_t my_begin;
    int my_size;
    float cen_score[1][4] = {};
    WarpClusters<1>(v, begin, size, kv, c0, lane, grp, tig, qfrag[0][0] + lane, my_begin, my_size,
                    cen_score);
    for (int i = 0; i < kWarpClusters && c0 + i < C; ++i) {
      const int c = c0 + i;
      const int64_t b = __shfl_sync(0xffffffffu, my_begin, i);
      const int n = __shfl_sync(0xffffffffu, my_size, i);
      float base0 = CentroidScore(cen_score[0], i, 0, tig);
      float base1 = CentroidScore(cen_score[0], i, 1, tig);
      const bool in0 =
          h0 < g && top0 != -INFINITY && attended[static_cast<int64_t>(kv * g + h0) * C + c] == 0;
      const bool in1 =
          h1 < g && top1 != -INFINITY && attended[static_cast<int64_t>(kv * g + h1) * C + c] == 0;
      if (n <= 0 || !__any_sync(0xffffffffu, in0 || in1)) continue;
      if (b < seg_lo || b >= seg_hi) {
        const int64_t seg = b / v.segment_rows;
        seg_lo = seg * v.segment_rows;
        seg_hi = seg_lo + v.segment_rows;
        FoldSegment<BITS, 1>(v, qkv, g, scale, kv, segments, seg, grp, tig, lane, ffrag[warp][0][0],
                             norm, cst);
        const int64_t at = (static_cast<int64_t>(kv) * segments + seg) * d;
        for (int e = lane; e < D16 * 8; e += 32) {  // FoldSegment synced the warp
          const int t = 16 * (e / 8) + 2 * (e % 8);
          const float2 st = __ldg(reinterpret_cast<const float2*>(val.step + at + t));
          const float2 of = __ldg(reinterpret_cast<const float2*>(val.offset + at + t));
          vgrid[warp][e] = make_uint4(
              Pack16<__half>(make_float2(st.x, st.x)), Pack16<__half>(make_float2(of.x, of.x)),
              Pack16<__half>(make_float2(st.y, st.y)), Pack16<__half>(make_float2(of.y, of.y)));
        }
        __syncwarp();
      }
      base0 += cst[0][0];
      base1 += cst[0][1];
      const int64_t row0 = static_cast<int64_t>(kv) * v.rows + b;
      // The cluster's value means (channels 16 w + 2 grp, + 1, bf16 pairs), loaded here so that
      // their latency passes under the rows' work (ncu: loaded after it, each warp waited on
      // them); at head_dim 256 after it (the registers would spill).
      const auto* vm = reinterpret_cast<const uint32_t*>(val.value_mean) +
                       ((static_cast<int64_t>(kv) * C + c) * d) / 2;
      constexpr bool kMeansFirst = D16 <= 8;
      uint32_t m2[D16];
      if constexpr (kMeansFirst) {
#pragma unroll
        for (int w = 0; w < D16; ++w) m2[w] = __ldg(vm + 8 * w + grp);
      }
      float p0 = 0.f, p1 = 0.f;  // this lane's rows' weights, heads h0 and h1
      for (int r0 = 0; r0 < n; r0 += 16) {
        const bool va = r0 + grp < n, vb = r0 + grp + 8 < n;
        // The tile's value codes of rows 2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9 (past the
        // cluster: its first row, weighed 0), the first kPre 64-channel vectors loaded before the
        // key tile so that they arrive under its MMAs; the rest (head_dim 256) in the loop below.
        constexpr int kPre = D16 / 4 < 2 ? D16 / 4 : 2;
        const uint4* vrow[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = r0 + 2 * tig + (k & 1) + (k >> 1) * 8;
          vrow[k] = vcode + (row0 + (r < n ? r : 0)) * (D16 / 4);
        }
        uint4 pre[kPre][4];
#pragma unroll
        for (int x = 0; x < kPre; ++x)
#pragma unroll
          for (int k = 0; k < 4; ++k) pre[x][k] = __ldg(vrow[k] + x);
        float s[1][4] = {};
        const uint32_t* pa = code + (row0 + (va ? r0 + grp : 0)) * words;
        const uint32_t* pb = code + (row0 + (vb ? r0 + grp + 8 : 0)) * words;
        if constexpr (KVB > 0) {
          MassTile2<KVB, 1>(pa, pb, tig, ffrag[warp][0][0] + lane, s);
        } else {
          MassTile<BITS, 1>(pa, pb, v.head_dim / 16, tig, ffrag[warp][0][0] + lane, s);
        }
        // Weights of rows grp (a) and grp + 8 (b) for heads h0, h1; 0 past the cluster or
        // attended.
        const float pa0 = va && in0 ? __expf(base0 + norm[0][0] * s[0][0] - top0) : 0.f;
        const float pa1 = va && in1 ? __expf(base1 + norm[0][1] * s[0][1] - top1) : 0.f;
        const float pb0 = vb && in0 ? __expf(base0 + norm[0][0] * s[0][2] - top0) : 0.f;
        const float pb1 = vb && in1 ? __expf(base1 + norm[0][1] * s[0][3] - top1) : 0.f;
        p0 += pa0 + pb0;
        p1 += pa1 + pb1;
        // B = P [16 rows, 8 heads]: the score tile's fragment (row, head pairs) transposed.
        const uint32_t b0 = Transpose8x8(Pack16<__half>(make_float2(pa0, pa1)));
        const uint32_t b1 = Transpose8x8(Pack16<__half>(make_float2(pb0, pb1)));
        // A = the decoded values of those rows, 64 channels at a time.
        const int sh = 4 * grp;
#pragma unroll
        for (int x = 0; x < D16 / 4; ++x) {
          uint4 rv[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) rv[k] = x < kPre ? pre[x][k] : __ldg(vrow[k] + x);
#pragma unroll
          for (int ww = 0; ww < 4; ++ww) {
            const int w = 4 * x + ww;
            uint32_t wk[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
              wk[k] = (ww == 0 ? rv[k].x : ww == 1 ? rv[k].y : ww == 2 ? rv[k].z : rv[k].w) >> sh;
            const uint32_t z1 = __byte_perm(wk[0], wk[1], 0x5410);  // rows 2 tig, 2 tig + 1
            const uint32_t z2 = __byte_perm(wk[2], wk[3], 0x5410);  // rows 2 tig + 8, 2 tig + 9
            const uint4 sg = vgrid[warp][w * 8 + grp];
            const uint32_t a[4] = {
                Fma16(SubMagic(AndOr(z1, 0x00030003u, kF16Magic)), sg.x, sg.y),
                Fma16(SubMagic(AndOr(z1 >> 2, 0x00030003u, kF16Magic)), sg.z, sg.w),
                Fma16(SubMagic(AndOr(z2, 0x00030003u, kF16Magic)), sg.x, sg.y),
                Fma16(SubMagic(AndOr(z2 >> 2, 0x00030003u, kF16Magic)), sg.z, sg.w)};
            MmaF16(acc[w], a, b0, b1);
          }
        }
      }
      // The cluster's total weight per head (over the row groups), its value mean once.
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) {
        p0 += __shfl_xor_sync(0xffffffffu, p0, o);
        p1 += __shfl_xor_sync(0xffffffffu, p1, o);
      }
      l0 += p0;
      l1 += p1;
#pragma unroll
      for (int w = 0; w < D16; ++w) {
        if constexpr (!kMeansFirst) m2[w] = __ldg(vm + 8 * w + grp);
        const float mlo = __uint_as_float(m2[w] << 16);
        const float mhi = __uint_as_float(m2[w] & 0xffff0000u);
        acc[w][0] += p0 * mlo;
        acc[w][1] += p1 * mlo;
        acc[w][2] += p0 * mhi;
        acc[w][3] += p1 * mhi;
      }
    }
  }
  // The warp's partial (zero where it took no cluster).
  const int64_t at = static_cast<int64_t>(chunk) * H + kv * g;
#pragma unroll
  for (int w = 0; w < D16; ++w) {
    const int t = 16 * w + 2 * grp;
    if (h0 < g)
      *reinterpret_cast<float2*>(part_o + (at + h0) * d + t) = make_float2(acc[w][0], acc[w][2]);
    if (h1 < g)
      *reinterpret_cast<float2*>(part_o + (at + h1) * d + t) = make_float2(acc[w][1], acc[w][3]);
  }
  if (grp == 0) {
    if (h0 < g) part_l[at + h0] = l0;
    if (h1 < g) part_l[at + h1] = l1;
  }
}

// o [q_heads, d], lse [q_heads] from the partials: one CTA per q head, kReduceThreads / d threads
// per channel, each summing every (kReduceThreads / d)-th partial, then added in shared memory.
constexpr int kReduceThreads = 512;
__global__ void __launch_bounds__(kReduceThreads)
    RestReduceKernel(int chunks, int q_heads, int d, const float* __restrict__ top,
                     const float* __restrict__ part_o, const float* __restrict__ part_l,
                     float* __restrict__ o, float* __restrict__ lse) {
  __shared__ float sums[kReduceThreads], ls[kReduceThreads];
  const int h = blockIdx.x, t = threadIdx.x % d, part = threadIdx.x / d;
  const int parts = kReduceThreads / d;
  float l = 0.f, sum = 0.f;
  for (int p = part; p < chunks; p += parts) {
    l += part_l[static_cast<int64_t>(p) * q_heads + h];
    sum += part_o[(static_cast<int64_t>(p) * q_heads + h) * d + t];
  }
  sums[threadIdx.x] = sum;
  ls[threadIdx.x] = l;
  __syncthreads();
  if (part != 0) return;
  for (int k = 1; k < parts; ++k) {
    sum += sums[k * d + t];
    l += ls[k * d + t];
  }
  const bool empty = !(l > 0.f) || top[h] == -INFINITY;
  o[static_cast<int64_t>(h) * d + t] = empty ? 0.f : sum / l;
  if (t == 0) lse[h] = empty ? -INFINITY : top[h] + __logf(l);
}

template <int BITS, int D16, int KVB>
void LaunchPartial(dim3 grid, cudaStream_t st, const CodeScanView& v, const CodeValueView& val,
                   const float* q, int g, const int64_t* begin, const int32_t* size,
                   const uint8_t* attended, const float* top, float scale, float* part_o,
                   float* part_l) {
  RestPartialKernel<BITS, D16, KVB><<<grid, kRestWarps * 32, 0, st>>>(
      v, val, q, g, begin, size, attended, top, scale, part_o, part_l);
}

// The key tile LaunchPartialBits takes (KVB): the vector tile for 2-bit codes at head_dim 128 (at
// 256 its registers would spill), 16-byte aligned; else the generic one (0).
int PartialKvb(const CodeScanView& v) {
  return v.bits == 2 && v.head_dim == 128 && reinterpret_cast<uintptr_t>(v.code) % 16 == 0 ? 8 : 0;
}

template <int D16>
void LaunchPartialBits(dim3 grid, cudaStream_t st, const CodeScanView& v, const CodeValueView& val,
                       const float* q, int g, const int64_t* begin, const int32_t* size,
                       const uint8_t* attended, const float* top, float scale, float* part_o,
                       float* part_l) {
  switch (v.bits) {
    case 1:
      LaunchPartial<1, D16, 0>(grid, st, v, val, q, g, begin, size, attended, top, scale, part_o,
                               part_l);
      break;
    case 2:
      if constexpr (D16 == 8) {
        if (PartialKvb(v) > 0) {
          LaunchPartial<2, D16, 8>(grid, st, v, val, q, g, begin, size, attended, top, scale,
                                   part_o, part_l);
          break;
        }
      }
      LaunchPartial<2, D16, 0>(grid, st, v, val, q, g, begin, size, attended, top, scale, part_o,
                               part_l);
      break;
    case 4:
      LaunchPartial<4, D16, 0>(grid, st, v, val, q, g, begin, size, attended, top, scale, part_o,
                               part_l);
      break;
    default:
      LaunchPartial<8, D16, 0>(grid, st, v, val, q, g, begin, size, attended, top, scale, part_o,
                               part_l);
      break;
  }
}

// One q head's row of the mask per block: cleared, then its selection marked.
__global__ void __launch_bounds__(kTopThreads)
    AttendedKernel(const int32_t* __restrict__ selected, const int32_t* __restrict__ count,
                   int num_clusters, uint8_t* __restrict__ attended) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * num_clusters;
  for (int c = threadIdx.x; c < num_clusters; c += kTopThreads) attended[row + c] = 0;
  __syncthreads();
  const int n = min(count[blockIdx.x], num_clusters);
  for (int j = threadIdx.x; j < n; j += kTopThreads) {
    const int c = selected[row + j];
    if (c >= 0 && c < num_clusters) attended[row + c] = 1;
  }
}

// The partial kernel's CTAs along x per kv head: at most one per kRestWarps x kWarpClusters
// clusters and at most one wave over the kv heads (ctas_per_sm per SM, the instance's
// RestCtasPerSm); within that bound as few as take the same number of rounds each. bound: the most
// for any num_clusters up to this one (the workspace's size).
int64_t RestCtas(int num_clusters, int kv_heads, int ctas_per_sm, bool bound) {
  constexpr int kPerCta = kRestWarps * kWarpClusters;
  const int64_t tiles = (num_clusters + kPerCta - 1) / kPerCta;
  const int64_t wave =
      std::max<int64_t>(1, ctas_per_sm * static_cast<int64_t>(SmCount()) / std::max(kv_heads, 1));
  if (bound || tiles == 0) return std::min(tiles, wave);
  const int64_t rounds = (tiles + wave - 1) / wave;
  return (tiles + rounds - 1) / rounds;
}

}  // namespace

Err LaunchAttendedFromSelection(const int32_t* selected, const int32_t* count, int q_heads,
                                int num_clusters, uint8_t* attended, void* stream) {
  if (q_heads == 0 || num_clusters == 0) return Err{};
  AttendedKernel<<<q_heads, kTopThreads, 0, AsStream(stream)>>>(selected, count, num_clusters,
                                                                attended);
  return LastLaunchErr();
}

int64_t CodeValueRestChunks(int num_clusters, int kv_heads) {
  // The most CTAs per SM of any instance: room for whichever runs.
  return RestCtas(num_clusters, kv_heads, RestCtasPerSm(8), /*bound=*/true) * kRestWarps;
}

Err LaunchCodeValueRest(const CodeScanView& keys, const CodeValueView& values, const float* q,
                        int q_heads, const int64_t* begin, const int32_t* size,
                        const uint8_t* attended, const float* cluster_lse, float scale,
                        float* workspace, float* o, float* lse, void* stream) {
  if (keys.kv_heads > 65535) return Err{0, "too many kv heads for one grid"};
  const cudaStream_t st = AsStream(stream);
  const int g = q_heads / keys.kv_heads, d = keys.head_dim;
  const int64_t chunks =
      RestCtas(keys.num_clusters, keys.kv_heads, RestCtasPerSm(PartialKvb(keys)), false) *
      kRestWarps;
  float* top = workspace;
  float* part_l = top + q_heads;
  // 8-byte aligned for the partial kernel's float2 stores (CodeValueRestWorkspaceFloats: room).
  float* part_o = workspace + (q_heads + chunks * q_heads + 3) / 4 * 4;
  RestTopKernel<<<q_heads, kTopThreads, 0, st>>>(keys.num_clusters, attended, cluster_lse, top);
  const dim3 grid(static_cast<unsigned>(chunks / kRestWarps), static_cast<unsigned>(keys.kv_heads));
  if (chunks == 0) {
    // No cluster: the reduce alone gives every head (0, -inf).
  } else if (d == 64) {
    LaunchPartialBits<4>(grid, st, keys, values, q, g, begin, size, attended, top, scale, part_o,
                         part_l);
  } else if (d == 128) {
    LaunchPartialBits<8>(grid, st, keys, values, q, g, begin, size, attended, top, scale, part_o,
                         part_l);
  } else {
    LaunchPartialBits<16>(grid, st, keys, values, q, g, begin, size, attended, top, scale, part_o,
                          part_l);
  }
  RestReduceKernel<<<q_heads, kReduceThreads, 0, st>>>(static_cast<int>(chunks), q_heads, d, top,
                                                       part_o, part_l, o, lse);
  return LastLaunchErr();
}

}  // namespace kvrt::gpu::detail
