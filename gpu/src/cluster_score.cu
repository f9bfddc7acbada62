// Cluster summary scoring, selection and estimate (cluster_kernels.h).
//
// ScoreKernel: a 1D grid of kv heads x cluster CTAs, then kv heads x outlier tiles; 256 threads.
// The cluster CTAs fill one wave and share the clusters warp by warp (round robin). The group's
// queries sit in shared memory (lane l reads dims [l*E, l*E+E), E = d/32); each warp reads one
// bf16 centroid row and its value-mean row per step (one 8..16-byte load per lane each, issued
// kScoreDepth clusters ahead), computes the g dot products with one reduce-scatter over the warp
// (lane l ends with one head's product), writes the densities and folds the cluster into an
// online-softmax state per q head (max and sum in the head's lanes, sum w * vbar in every lane's
// dims; rescaled only when a max moves). The 8 warp states are merged through shared memory into
// one partial state per (q head, cluster CTA). Every centroid and value mean is read once per kv
// head, for all q heads of its group: HBM traffic is the summary's size.
//
// ScoreMmaKernel: the same outputs from tensor cores (mma.sync), for groups of at most 8 q heads
// and d <= 128 (the 8B shape): a warp takes 16 clusters per step, the scores and the weighted
// value sums each a few mma per cluster (the layouts at the kernel).
//
// SelectKernel: one CTA (512 threads) per q head. Merges the CTA states into the total, takes the
// threshold key the group threshold kernels found (cluster_threshold.cu), or else finds the
// selection threshold key (the order-preserving uint32 of the density at which the criterion is
// met) in three light passes: the densities' range, one histogram of tokens and estimated mass
// over 4096 linear bins of that range (block scans from the top find the threshold bin), and the
// threshold bin's clusters gathered into shared memory and resolved exactly there. When that bin
// holds more than kCandCap clusters (ties, a degenerate range) it falls back to a weighted radix
// select (4 passes of 8 bits over chunks of 8 clusters per thread, loaded before use; a warp
// scans the 256 bins from the top). Either way the threshold is the same key. It compacts the
// selected clusters in ascending index order (block scans, ties at the threshold taken in index
// order until the criterion is met), and subtracts their weighted value means from the total to
// leave the estimate of the unselected clusters.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "cluster_launch.h"
#include "cluster_threshold.cuh"
#include "common.cuh"
#include "mma.cuh"

// Only tools/gpu_bench/cluster_step_parts.cu sets it: bit 1 leaves the selection's radix passes
// out (nothing is selected), bit 2 its compaction, so that the kernel's time can be taken apart.
#ifndef KVRT_CLUSTER_PARTS
#define KVRT_CLUSTER_PARTS 0
#endif

namespace kvrt::gpu::detail {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreDepth = 3;    // clusters a warp has in flight (score kernel)
constexpr int kOutlierTile = 32;  // outliers per CTA of the score kernel (4 per warp)
constexpr int kSelectThreads = 512;
constexpr int kSelectItems = 4;    // clusters per thread per chunk of the radix passes (8 spill)
constexpr int kSelectKeep = 2048;  // selected clusters whose weight stays in shared memory
constexpr int kKeyThreads = kKeyClusters;  // GroupKeyKernel: one cluster per thread

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// a[i] = the lane's share of q_i . x for the MG queries of a group (row i of qs, zero past the
// group): x's E dims per lane.
template <int E, int MG, int D>
__device__ __forceinline__ void PartialDots(const float (&qs)[MG][D], int lane, const float (&x)[E],
                                            float (&a)[MG]) {
#pragma unroll
  for (int i = 0; i < MG; ++i) {
    a[i] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) a[i] += qs[i][lane * E + e] * x[e];
  }
}

// a[i] = q_i . x in every lane (PartialDots, then a butterfly per query). NOTE: every query's
// butterfly runs, whether or not i < g, so that the MG reductions interleave; stopping at the
// group size put each behind a branch, one after another (the same pattern cost the direct
// step's attention a third of its time, docs/benchmarks.md).
template <int E, int MG, int D>
__device__ __forceinline__ void GroupDots(const float (&qs)[MG][D], int lane, const float (&x)[E],
                                          float (&a)[MG]) {
  PartialDots<E, MG>(qs, lane, x, a);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < MG; ++i) a[i] += __shfl_xor_sync(0xffffffffu, a[i], o);
  }
}

// log2 of the group width MG (4, 8 or 16): after ReduceScatter, lane l holds the q head
// l >> (5 - kLog2<MG>) of its group.
template <int MG>
constexpr int kLog2 = MG == 4   ? 2
                      : MG == 8 ? 3
                                : 4;

// The MG dot products of the lanes' partial sums a, reduced across the warp by halving: at each
// of the first log2(MG) levels a lane keeps half of its values and sends the other half to its
// partner, then the single value left is summed over the remaining levels. Lane l returns the
// full sum of head l >> (5 - log2 MG). NOTE: MG - 1 + 5 - log2(MG) shuffles instead of the
// 5 * MG of a butterfly per head (the score kernel was bound by its issued instructions).
template <int MG>
__device__ __forceinline__ float ReduceScatter(float (&a)[MG], int lane) {
#pragma unroll
  for (int lvl = 0; lvl < kLog2<MG>; ++lvl) {
    const int off = 16 >> lvl, half = MG >> (lvl + 1);
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const float keep = upper ? a[half + k] : a[k];
      const float send = upper ? a[k] : a[half + k];
      a[k] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
#pragma unroll
  for (int off = 16 >> kLog2<MG>; off > 0; off >>= 1)
    a[0] += __shfl_xor_sync(0xffffffffu, a[0], off);
  return a[0];
}

// E consecutive bf16 (E = 2, 4, 8: 4, 8, 16 bytes, aligned) kept packed in registers until used.
template <int E>
struct RawBf16 {
  using Type = std::conditional_t<E == 2, unsigned, std::conditional_t<E == 4, uint2, uint4>>;
  static_assert(sizeof(Type) == 2 * E, "E = 2, 4 or 8");
  __device__ __forceinline__ static void ToF32(const Type& r, float (&out)[E]) {
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&r);
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = __bfloat162float(e[i]);
  }
};

// E consecutive bf16 at p as f32.
template <int E>
__device__ __forceinline__ void LoadBf16(const uint16_t* __restrict__ p, float (&out)[E]) {
  using Raw = typename RawBf16<E>::Type;
  RawBf16<E>::ToF32(__ldg(reinterpret_cast<const Raw*>(p)), out);
}

// The g queries of kv head h's group (q: [q_heads, D]) into qs (rows past g zero) and their squared
// norms into qn2; the whole CTA, synced after.
template <int D, int MG>
__device__ __forceinline__ void LoadGroupQueries(const float* __restrict__ q, int g, int h,
                                                 float (&qs)[MG][D], float (&qn2)[MG]) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int x = threadIdx.x; x < MG * D; x += kScoreThreads) {
    const int i = x / D;
    qs[i][x % D] = i < g ? q[(static_cast<size_t>(h) * g + i) * D + x % D] : 0.f;
  }
  __syncthreads();
  for (int i = warp; i < MG; i += kScoreWarps) {
    float a = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) a += qs[i][lane * E + e] * qs[i][lane * E + e];
    a = WarpSum(a);
    if (lane == 0) qn2[i] = a;
  }
  __syncthreads();
}

// One q head's partial state of the CTA (out: [D + 2] = max, sum, weighted value sums) from its
// warps' states, which each warp left in wm, wl and wacc (max, sum, sums) before the call: every
// warp's rescaled to the largest max. The whole CTA; syncs before and after.
template <int D>
__device__ __forceinline__ void MergeWarpStates(const float (&wm)[kScoreWarps],
                                                const float (&wl)[kScoreWarps],
                                                const float (&wacc)[kScoreWarps][D],
                                                float* __restrict__ out) {
  __syncthreads();
  float mm = -INFINITY;
#pragma unroll
  for (int w = 0; w < kScoreWarps; ++w) mm = fmaxf(mm, wm[w]);
  for (int t = threadIdx.x; t < D + 2; t += kScoreThreads) {
    float v = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kScoreWarps; ++w) {
        const float f = wm[w] == -INFINITY ? 0.f : __expf(wm[w] - mm);
        v += f * (t == 1 ? wl[w] : t >= 2 ? wacc[w][t - 2] : 0.f);
      }
    }
    out[t] = t == 0 ? mm : v;
  }
  __syncthreads();
}

// The exact unscaled scores of kOutlierTile outliers of kv head h (tile `otile` of them) for the
// g queries of its group (qs: shared, rows past g zero): kOutlierTile / 8 per warp, all of a
// warp's keys loaded before use.
template <int D, int MG>
__device__ __forceinline__ void ScoreOutliers(const ClusterSummaryView& s, const float (&qs)[MG][D],
                                              int g, int h, int otile,
                                              float* __restrict__ outlier_score) {
  constexpr int E = D / 32;
  constexpr int kPerWarp = kOutlierTile / kScoreWarps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int o_n = s.num_outliers;
  const int base = otile * kOutlierTile + warp * kPerWarp;
  float kr[kPerWarp][E];
#pragma unroll
  for (int k = 0; k < kPerWarp; ++k)
    if (base + k < o_n)
      LoadBf16<E>(s.outlier_key + (static_cast<size_t>(h) * o_n + base + k) * D + lane * E, kr[k]);
#pragma unroll
  for (int k = 0; k < kPerWarp; ++k) {
    const int j = base + k;
    if (j >= o_n) break;
    float a[MG];
    GroupDots<E, MG>(qs, lane, kr[k], a);
#pragma unroll
    for (int i = 0; i < MG; ++i) {
      if (i >= g) break;
      if (lane == 0) outlier_score[(static_cast<size_t>(h) * g + i) * o_n + j] = a[i];
    }
  }
}

// Three CTAs per SM where 80 registers nearly suffice (d <= 128, groups <= 4: the 8B shape; ptxas
// reports a 56-byte spill at d = 128), so that 24 warps each keep kScoreDepth clusters in flight
// (41 us at 128K on the H200, docs/benchmarks.md).
template <int D, int MG>
constexpr int kScoreMinBlocks = D <= 128 && MG <= 4 ? 3 : 1;

// One CTA of ScoreKernel, the b-th of its 1D grid.
template <int D, int MG>
__device__ __forceinline__ void ScoreCta(const ClusterSummaryView& s, const float* __restrict__ q,
                                         int g, float scale, float spread_coef, int cluster_ctas,
                                         int outlier_ctas, const float* __restrict__ cluster_lse,
                                         float* __restrict__ density,
                                         float* __restrict__ outlier_score,
                                         float* __restrict__ partial, const int b) {
  constexpr int E = D / 32;
  // A 1D grid: every kv head's cluster CTAs first, then the outlier CTAs, so that the short
  // outlier CTAs are the ones a full wave leaves for later (CTAs start in index order).
  const int kv_heads = s.kv_heads;
  const int cluster_blocks = kv_heads * cluster_ctas;
  const int h = b < cluster_blocks ? b / cluster_ctas : (b - cluster_blocks) / outlier_ctas;
  const int tile =
      b < cluster_blocks ? b % cluster_ctas : cluster_ctas + (b - cluster_blocks) % outlier_ctas;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c_n = s.num_clusters;
  __shared__ float qs[MG][D], qn2[MG];
  __shared__ float wm[kScoreWarps], wl[kScoreWarps];
  __shared__ float wacc[kScoreWarps][D];
  LoadGroupQueries<D, MG>(q, g, h, qs, qn2);

  if (tile >= cluster_ctas) {  // outliers: exact unscaled scores only
    ScoreOutliers<D, MG>(s, qs, g, h, tile - cluster_ctas, outlier_score);
    return;
  }

  // Lane l keeps the online-softmax max and sum of its head (own = l >> (5 - log2 MG), the layout
  // of ReduceScatter) and, for every head of the group, the weighted value sums of its E dims.
  constexpr int kShift = 5 - kLog2<MG>;
  const int own = lane >> kShift;
  const float own_qn2 = qn2[own];
  float m_own = -INFINITY, l_own = 0.f, acc[MG][E];
#pragma unroll
  for (int i = 0; i < MG; ++i) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[i][e] = 0.f;
  }
  // The cluster CTAs share the clusters warp by warp: warp w of CTA c takes clusters c * 8 + w,
  // then every (cluster_ctas * 8)-th one after it (balanced to one cluster, whatever the count).
  const int stride = cluster_ctas * kScoreWarps;
  auto cluster_at = [&](int step) {
    const long long j =
        static_cast<long long>(tile) * kScoreWarps + warp + static_cast<long long>(step) * stride;
    return j < c_n ? static_cast<int>(j) : c_n;
  };
  // NOTE: a warp walks its clusters one after another, so each cluster's rows are loaded
  // kScoreDepth clusters ahead of their use (a ring of packed registers): one load in flight per
  // warp left the kernel waiting on HBM latency (728 GB/s). Every load is issued whether or not
  // the cluster is empty (padding rows exist and are never used), so none waits for its size.
  using Raw = typename RawBf16<E>::Type;
  Raw rc[kScoreDepth] = {}, rv[kScoreDepth] = {};
  int rn[kScoreDepth];
  float rs[kScoreDepth];
  auto load = [&](int j, Raw& c, Raw& v, int& n, float& sp) {
    if (j >= c_n) {
      n = 0;
      return;
    }
    const size_t hc = static_cast<size_t>(h) * c_n + j;
    // Given masses (cluster_lse): the centroids are not read (half the summary's bytes).
    if (cluster_lse == nullptr)
      c = __ldg(reinterpret_cast<const Raw*>(s.centroid + hc * D + lane * E));
    v = __ldg(reinterpret_cast<const Raw*>(s.value_mean + hc * D + lane * E));
    n = __ldg(s.size + hc);
    sp = __ldg(s.spread + hc);
  };
#pragma unroll
  for (int u = 0; u < kScoreDepth; ++u) load(cluster_at(u), rc[u], rv[u], rn[u], rs[u]);
  bool done = false;
  for (int step = 0; !done; step += kScoreDepth) {
#pragma unroll
    for (int u = 0; u < kScoreDepth; ++u) {
      const int j = cluster_at(step + u);
      if (j >= c_n) {
        done = true;
        break;
      }
      const int n = rn[u];
      float cen[E], vb[E];
      RawBf16<E>::ToF32(rc[u], cen);
      RawBf16<E>::ToF32(rv[u], vb);
      const float spread = rs[u];
      load(cluster_at(step + u + kScoreDepth), rc[u], rv[u], rn[u], rs[u]);
      if (n <= 0) {
        if (lane < g) density[(static_cast<size_t>(h) * g + lane) * c_n + j] = -INFINITY;
        continue;
      }
      float dens, lm;
      if (cluster_lse == nullptr) {
        float a[MG];
        PartialDots<E, MG>(qs, lane, cen, a);
        dens = scale * ReduceScatter<MG>(a, lane) + spread_coef * own_qn2 * spread;
        lm = dens + __logf(static_cast<float>(n));
      } else {  // the cluster's mass given (uniform branch); heads past the group: any finite
        lm = own < g ? __ldg(cluster_lse + (static_cast<size_t>(h) * g + own) * c_n + j) : 0.f;
        dens = lm - __logf(static_cast<float>(n));
      }
      if ((lane & ((1 << kShift) - 1)) == 0 && own < g)
        density[(static_cast<size_t>(h) * g + own) * c_n + j] = dens;
      // The max moves rarely after a warp's first clusters: the rescale runs only then (the
      // condition is warp-uniform through the ballot).
      if (__any_sync(0xffffffffu, lm > m_own)) {
        const float mn = fmaxf(m_own, lm);
        const float corr = __expf(m_own - mn);  // m = -inf: 0
        l_own *= corr;
        m_own = mn;
#pragma unroll
        for (int i = 0; i < MG; ++i) {
          const float ci = __shfl_sync(0xffffffffu, corr, i << kShift);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[i][e] *= ci;
        }
      }
      const float w = __expf(lm - m_own);
      l_own += w;
#pragma unroll
      for (int i = 0; i < MG; ++i) {
        const float wi = __shfl_sync(0xffffffffu, w, i << kShift);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[i][e] += wi * vb[e];
      }
    }
  }
  // Merge the warps' states, one q head at a time.
#pragma unroll
  for (int i = 0; i < MG; ++i) {
    if (i >= g) break;
    if (lane == (i << kShift)) {
      wm[warp] = m_own;
      wl[warp] = l_own;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) wacc[warp][lane * E + e] = acc[i][e];
    MergeWarpStates<D>(
        wm, wl, wacc, partial + ((static_cast<size_t>(h) * g + i) * cluster_ctas + tile) * (D + 2));
  }
}

// ScoreMmaKernel: ScoreKernel on tensor cores (the launcher picks it for groups of at most 8 q
// heads and d <= 128; its outlier CTAs run the same ScoreOutliers). ncu on the H200 had ScoreKernel
// issuing an instruction in 71% of its scheduler cycles, ~185 per cluster (the warp-per-cluster
// reductions, the online softmax per cluster), with HBM a third busy: the work per cluster, not the
// memory, bound it. Here a warp takes 16 clusters per step. Lane (grp, tig) loads rows grp and grp
// + 8 of them, dims [8 tig + 32 i, +8) of each (16-byte loads): these words are the A fragments of
// centroids x queries^T (mma m16n8k16, clusters as rows, dims as k, k permuted; the queries' B
// fragments, built once in shared memory in the same order, are bf16 hi + lo pairs, so that the
// scores keep ~16 bits of q against the bf16 centroids). The value means' words transposed in
// registers (movmatrix) are the A fragments of value means^T x weights^T (dims as rows, clusters as
// k), the weights (hi + lo too) its B fragments: the weighted sums accumulate in f32 fragments of
// dims x queries. Lane (grp, tig) holds the online-softmax state of queries 2 tig and 2 tig + 1,
// rescaled per step of 16 clusters.
constexpr int kMmaQ = 8;  // the queries of the n = 8 fragments: groups of at most 8

// The dim of column c (0..7) of block r (0..D/8-1) of a row: word 4 i + s of lane (grp, tig)'s
// loads of a row holds the dims 8 tig + 32 i + 2 s + {0, 1}, the columns 2 tig, 2 tig + 1 of block
// 4 i + s.
__device__ __forceinline__ int BlockDim(int r, int c) {
  return 8 * (c >> 1) + 32 * (r >> 2) + 2 * (r & 3) + (c & 1);
}

// Word r of a lane's 16-byte loads (r a constant after unrolling).
template <int D, int MG>
__global__ void __launch_bounds__(kScoreThreads, kScoreMinBlocks<D, MG>)
    ScoreKernel(ClusterSummaryView s, const float* __restrict__ q, int g, float scale,
                float spread_coef, int cluster_ctas, int outlier_ctas,
                const float* __restrict__ cluster_lse, float* __restrict__ density,
                float* __restrict__ outlier_score, float* __restrict__ partial) {
  ScoreCta<D, MG>(s, q, g, scale, spread_coef, cluster_ctas, outlier_ctas, cluster_lse, density,
                  outlier_score, partial, blockIdx.x);
}

// A batch's members (ClusterBatchLaunch): grid (the most CTAs of a member, members); a member
// with fewer leaves the rest idle.
template <int D, int MG>
__global__ void __launch_bounds__(kScoreThreads, kScoreMinBlocks<D, MG>)
    ScoreBatchKernel(const __grid_constant__ ClusterBatchLaunch a, int g, float scale,
                     float spread_coef) {
  const ClusterBatchMember& m = a.m[blockIdx.y];
  if (static_cast<int>(blockIdx.x) >= (m.cctas + m.otiles) * m.it.summary.kv_heads) return;
  ScoreCta<D, MG>(m.it.summary, m.it.q, g, scale, spread_coef, m.cctas, m.otiles, m.it.cluster_lse,
                  m.it.out.density, m.it.out.outlier_score, m.it.workspace, blockIdx.x);
}

template <int L>
__device__ __forceinline__ uint32_t Word(const uint4 (&v)[L], int r) {
  const uint4& x = v[r >> 2];
  return (r & 3) == 0 ? x.x : (r & 3) == 1 ? x.y : (r & 3) == 2 ? x.z : x.w;
}

// One CTA of ScoreMmaKernel, the b-th of its 1D grid.
template <int D>
__device__ __forceinline__ void ScoreMmaCta(const ClusterSummaryView& s,
                                            const float* __restrict__ q, int g, float scale,
                                            float spread_coef, int cluster_ctas, int outlier_ctas,
                                            float* __restrict__ density,
                                            float* __restrict__ outlier_score,
                                            float* __restrict__ partial, const int b) {
  static_assert(D % 32 == 0 && D <= 128, "d = 64 or 128");
  constexpr int MG = kMmaQ;
  constexpr int L = D / 32;  // 16-byte loads per row and lane
  constexpr int K = D / 16;  // k steps of the scores, dim tiles of the weighted sums
  const int cluster_blocks = s.kv_heads * cluster_ctas;
  const int h = b < cluster_blocks ? b / cluster_ctas : (b - cluster_blocks) / outlier_ctas;
  const int tile =
      b < cluster_blocks ? b % cluster_ctas : cluster_ctas + (b - cluster_blocks) % outlier_ctas;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 2, tig = lane & 3;
  const int c_n = s.num_clusters;
  __shared__ float qs[MG][D], qn2[MG];
  __shared__ float wm[kScoreWarps], wl[kScoreWarps];
  __shared__ float wacc[kScoreWarps][D];
  __shared__ uint4 qf[K][32];  // per k step and lane: b0, b1 (hi), b0, b1 (lo)
  LoadGroupQueries<D, MG>(q, g, h, qs, qn2);
  if (tile >= cluster_ctas) {
    ScoreOutliers<D, MG>(s, qs, g, h, tile - cluster_ctas, outlier_score);
    return;
  }
  for (int x = threadIdx.x; x < K * 32; x += kScoreThreads) {
    const int j = x >> 5, ln = x & 31;
    const float* qr = qs[ln >> 2];
    const int d0 = BlockDim(2 * j, 2 * (ln & 3)), d1 = BlockDim(2 * j + 1, 2 * (ln & 3));
    uint4 f;
    Split16<__nv_bfloat16>(make_float2(qr[d0], qr[d0 + 1]), f.x, f.z);
    Split16<__nv_bfloat16>(make_float2(qr[d1], qr[d1 + 1]), f.y, f.w);
    qf[j][ln] = f;
  }
  __syncthreads();

  const float qn_a = qn2[2 * tig], qn_b = qn2[2 * tig + 1];
  float acc[K][4];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // queries 2 tig, 2 tig + 1
  const size_t head = static_cast<size_t>(h) * c_n;
  const uint16_t* cen = s.centroid + head * D + 8 * tig;
  const uint16_t* val = s.value_mean + head * D + 8 * tig;
  const int steps = (c_n + 15) / 16;
  for (int st = tile * kScoreWarps + warp; st < steps; st += cluster_ctas * kScoreWarps) {
    const int j0 = st * 16 + grp, j1 = j0 + 8;
    // A row past the last cluster loads the last one: its weight is 0 and no density is written.
    const size_t r0 = static_cast<size_t>(min(j0, c_n - 1)),
                 r1 = static_cast<size_t>(min(j1, c_n - 1));
    uint4 c0[L], c1[L], v0[L], v1[L];
#pragma unroll
    for (int i = 0; i < L; ++i) {
      c0[i] = __ldg(reinterpret_cast<const uint4*>(cen + r0 * D + 32 * i));
      c1[i] = __ldg(reinterpret_cast<const uint4*>(cen + r1 * D + 32 * i));
      v0[i] = __ldg(reinterpret_cast<const uint4*>(val + r0 * D + 32 * i));
      v1[i] = __ldg(reinterpret_cast<const uint4*>(val + r1 * D + 32 * i));
    }
    const int n0 = j0 < c_n ? __ldg(s.size + head + j0) : 0;
    const int n1 = j1 < c_n ? __ldg(s.size + head + j1) : 0;
    const float sp0 = __ldg(s.spread + head + r0), sp1 = __ldg(s.spread + head + r1);

    float sc[4] = {0.f, 0.f, 0.f, 0.f};  // [cluster grp, grp + 8] x [query 2 tig, 2 tig + 1]
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const uint32_t a[4] = {Word(c0, 2 * j), Word(c1, 2 * j), Word(c0, 2 * j + 1),
                             Word(c1, 2 * j + 1)};
      const uint4 f = qf[j][lane];
      MmaBf16(sc, a, f.x, f.y);
      MmaBf16(sc, a, f.z, f.w);
    }
    const float d0a = scale * sc[0] + spread_coef * qn_a * sp0;
    const float d0b = scale * sc[1] + spread_coef * qn_b * sp0;
    const float d1a = scale * sc[2] + spread_coef * qn_a * sp1;
    const float d1b = scale * sc[3] + spread_coef * qn_b * sp1;
    const int qa = 2 * tig, qb = qa + 1;
    float* dq = density + static_cast<size_t>(h) * g * c_n;
    if (j0 < c_n) {
      if (qa < g) dq[static_cast<size_t>(qa) * c_n + j0] = n0 > 0 ? d0a : -INFINITY;
      if (qb < g) dq[static_cast<size_t>(qb) * c_n + j0] = n0 > 0 ? d0b : -INFINITY;
    }
    if (j1 < c_n) {
      if (qa < g) dq[static_cast<size_t>(qa) * c_n + j1] = n1 > 0 ? d1a : -INFINITY;
      if (qb < g) dq[static_cast<size_t>(qb) * c_n + j1] = n1 > 0 ? d1b : -INFINITY;
    }
    // Empty clusters (and rows past the last) weigh 0; their value rows are zeroed too, so that
    // padding bytes never reach the sums (0 x NaN).
    const float ln0 = n0 > 0 ? __logf(static_cast<float>(n0)) : -INFINITY;
    const float ln1 = n1 > 0 ? __logf(static_cast<float>(n1)) : -INFINITY;
    if (n0 <= 0) {
#pragma unroll
      for (int i = 0; i < L; ++i) v0[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    if (n1 <= 0) {
#pragma unroll
      for (int i = 0; i < L; ++i) v1[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    // NOTE: not d + log(0): an empty cluster's density may be NaN (its centroid row is padding),
    // and NaN + -inf is NaN, which would reach every sum through the weights.
    const float l0a = n0 > 0 ? d0a + ln0 : -INFINITY, l0b = n0 > 0 ? d0b + ln0 : -INFINITY;
    const float l1a = n1 > 0 ? d1a + ln1 : -INFINITY, l1b = n1 > 0 ? d1b + ln1 : -INFINITY;
    float ma = fmaxf(l0a, l1a), mb = fmaxf(l0b, l1b);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, o));
      mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, o));
    }
    ma = fmaxf(m_a, ma);
    mb = fmaxf(m_b, mb);
    // The maxima move rarely after a warp's first steps: the rescale runs only then.
    if (__any_sync(0xffffffffu, ma > m_a || mb > m_b)) {
      const float ca = m_a == -INFINITY ? 0.f : __expf(m_a - ma);
      const float cb = m_b == -INFINITY ? 0.f : __expf(m_b - mb);
      l_a *= ca;
      l_b *= cb;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        acc[k][0] *= ca;
        acc[k][1] *= cb;
        acc[k][2] *= ca;
        acc[k][3] *= cb;
      }
      m_a = ma;
      m_b = mb;
    }
    const float p0a = m_a == -INFINITY ? 0.f : __expf(l0a - m_a);
    const float p0b = m_b == -INFINITY ? 0.f : __expf(l0b - m_b);
    const float p1a = m_a == -INFINITY ? 0.f : __expf(l1a - m_a);
    const float p1b = m_b == -INFINITY ? 0.f : __expf(l1b - m_b);
    l_a += p0a + p1a;
    l_b += p0b + p1b;
    // Weights [cluster][query] (a lane: its clusters' row, queries 2 tig..+1), transposed into
    // the B fragments [k = cluster][n = query].
    uint32_t h0, o0, h1, o1;
    Split16<__nv_bfloat16>(make_float2(p0a, p0b), h0, o0);
    Split16<__nv_bfloat16>(make_float2(p1a, p1b), h1, o1);
    const uint32_t b0h = Transpose8x8(h0), b1h = Transpose8x8(h1);
    const uint32_t b0l = Transpose8x8(o0), b1l = Transpose8x8(o1);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t a[4] = {Transpose8x8(Word(v0, 2 * k)), Transpose8x8(Word(v0, 2 * k + 1)),
                             Transpose8x8(Word(v1, 2 * k)), Transpose8x8(Word(v1, 2 * k + 1))};
      MmaBf16(acc[k], a, b0h, b1h);
      MmaBf16(acc[k], a, b0l, b1l);
    }
  }
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o);
  }
  // acc[k]: dims BlockDim(2k, grp) (0, 1) and BlockDim(2k + 1, grp) (2, 3), queries 2 tig (0, 2)
  // and 2 tig + 1 (1, 3): the lanes of one tig hold all dims of its two queries.
#pragma unroll
  for (int i = 0; i < MG; ++i) {
    if (i >= g) break;
    if ((i >> 1) == tig) {
      const bool odd = (i & 1) != 0;
      if (grp == 0) {
        wm[warp] = odd ? m_b : m_a;
        wl[warp] = odd ? l_b : l_a;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        wacc[warp][BlockDim(2 * k, grp)] = odd ? acc[k][1] : acc[k][0];
        wacc[warp][BlockDim(2 * k + 1, grp)] = odd ? acc[k][3] : acc[k][2];
      }
    }
    MergeWarpStates<D>(
        wm, wl, wacc, partial + ((static_cast<size_t>(h) * g + i) * cluster_ctas + tile) * (D + 2));
  }
}

template <int D>
__global__ void __launch_bounds__(kScoreThreads, 2)
    ScoreMmaKernel(ClusterSummaryView s, const float* __restrict__ q, int g, float scale,
                   float spread_coef, int cluster_ctas, int outlier_ctas,
                   float* __restrict__ density, float* __restrict__ outlier_score,
                   float* __restrict__ partial) {
  ScoreMmaCta<D>(s, q, g, scale, spread_coef, cluster_ctas, outlier_ctas, density, outlier_score,
                 partial, blockIdx.x);
}

template <int D>
__global__ void __launch_bounds__(kScoreThreads, 2)
    ScoreMmaBatchKernel(const __grid_constant__ ClusterBatchLaunch a, int g, float scale,
                        float spread_coef) {
  const ClusterBatchMember& m = a.m[blockIdx.y];
  if (static_cast<int>(blockIdx.x) >= (m.cctas + m.otiles) * m.it.summary.kv_heads) return;
  ScoreMmaCta<D>(m.it.summary, m.it.q, g, scale, spread_coef, m.cctas, m.otiles, m.it.out.density,
                 m.it.out.outlier_score, m.it.workspace, blockIdx.x);
}

// Group selection's keys (cluster_kernels.h): grid (cluster chunks, kv heads). Each CTA first
// merges its group's tile states into each head's log total (as SelectKernel does), then
// key_c = log sum_h exp(density_{h,c} - lse_h) for its chunk of clusters, less offset_c (null:
// none; ClusterStepParams::key_offset).
// thr (budget > 0 only; else row null): each CTA also leaves its keys' range (and, top_p > 0,
// their total mass) in thr's partials, and the kv head's CTAs clear its histogram and state for
// the threshold kernels (cluster_threshold.cu) that follow.
// One CTA: chunk `chunk` (of `chunks`) of kv head h.
template <int D>
__device__ __forceinline__ void GroupKeyCta(
    const ClusterSummaryView& s, int g, int tiles, const float* __restrict__ density,
    const float* __restrict__ partial, const float* __restrict__ offset, float* __restrict__ key,
    const ThresholdWs& thr, int use_p, const int chunk, const int chunks, const int h) {
  __shared__ float s_lse[kClusterMaxGroup];
  const int c_n = s.num_clusters, t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  for (int i = warp; i < g; i += kKeyThreads / 32) {
    const float* part = partial + static_cast<size_t>(h * g + i) * tiles * (D + 2);
    float m = -INFINITY;
    for (int k = lane; k < tiles; k += 32) m = fmaxf(m, part[static_cast<size_t>(k) * (D + 2)]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    if (m != -INFINITY) {
      for (int k = lane; k < tiles; k += 32) {
        const float* pk = part + static_cast<size_t>(k) * (D + 2);
        l += pk[0] == -INFINITY ? 0.f : __expf(pk[0] - m) * pk[1];
      }
    }
    l = WarpSum(l);
    if (lane == 0) s_lse[i] = m == -INFINITY ? -INFINITY : m + logf(l);
  }
  __syncthreads();
  const int end = min(c_n, (chunk + 1) * kKeyClusters);
  float lo = INFINITY, hi = -INFINITY, mass = 0.f;
  for (int j = chunk * kKeyClusters + t; j < end; j += kKeyThreads) {
    float kj = -INFINITY;
    const int32_t nj = s.size[static_cast<size_t>(h) * c_n + j];
    if (nj > 0) {
      float dv[kClusterMaxGroup];
      float m = -INFINITY;
      for (int i = 0; i < g; ++i) {
        dv[i] = s_lse[i] == -INFINITY
                    ? -INFINITY
                    : density[static_cast<size_t>(h * g + i) * c_n + j] - s_lse[i];
        m = fmaxf(m, dv[i]);
      }
      if (m != -INFINITY) {
        float l = 0.f;
        for (int i = 0; i < g; ++i) l += dv[i] == -INFINITY ? 0.f : __expf(dv[i] - m);
        kj = m + logf(l);
        if (offset != nullptr) kj -= offset[static_cast<size_t>(h) * c_n + j];
      }
      // The range and mass the select kernel's own search takes over the sized clusters.
      lo = fminf(lo, kj);
      hi = fmaxf(hi, kj);
      if (use_p) mass += __expf(kj + logf(static_cast<float>(nj)));
    }
    key[static_cast<size_t>(h) * c_n + j] = kj;
  }
  if (thr.row == nullptr) return;
  using RedF = cub::BlockReduce<float, kKeyThreads>;
  __shared__ typename RedF::TempStorage red;
  lo = RedF(red).Reduce(lo, MinOp());
  __syncthreads();
  hi = RedF(red).Reduce(hi, MaxOp());
  __syncthreads();
  mass = RedF(red).Sum(mass);
  const size_t part = static_cast<size_t>(h) * thr.key_ctas + chunk;
  if (t == 0) {
    thr.part_lo[part] = lo;
    thr.part_hi[part] = hi;
    thr.part_mass[part] = mass;
  }
  for (int b = chunk * kKeyThreads + t; b < kLinBins; b += chunks * kKeyThreads) {
    thr.hist_tok[static_cast<size_t>(h) * kLinBins + b] = 0u;
    thr.hist_mass[static_cast<size_t>(h) * kLinBins + b] = 0.f;
  }
  if (chunk == 0 && t == 0) {
    ThresholdRow r{};
    r.mode = kThresholdPending;
    r.bin = -1;
    thr.row[h] = r;
  }
}

// The group key CTAs of a kv head's c_n clusters.
__host__ __device__ __forceinline__ int KeyChunks(int c_n) {
  return (c_n + kKeyClusters - 1) / kKeyClusters;
}

template <int D>
__global__ void __launch_bounds__(kKeyThreads)
    GroupKeyKernel(ClusterSummaryView s, int g, int tiles, const float* __restrict__ density,
                   const float* __restrict__ partial, const float* __restrict__ offset,
                   float* __restrict__ key, ThresholdWs thr, int use_p) {
  GroupKeyCta<D>(s, g, tiles, density, partial, offset, key, thr, use_p, blockIdx.x, gridDim.x,
                 blockIdx.y);
}

// A batch's members: grid (the most chunks, kv heads, members); only the members under group
// selection (group_key set, clusters) take part.
template <int D>
__global__ void __launch_bounds__(kKeyThreads)
    GroupKeyBatchKernel(const __grid_constant__ ClusterBatchLaunch a, int g, int use_p) {
  const ClusterBatchMember& m = a.m[blockIdx.z];
  const int chunks = KeyChunks(m.it.summary.num_clusters);
  if (m.gkey == nullptr || static_cast<int>(blockIdx.x) >= chunks) return;
  GroupKeyCta<D>(m.it.summary, g, m.cctas, m.it.out.density, m.it.workspace, m.it.key_offset,
                 m.gkey, m.thr, use_p, blockIdx.x, chunks, blockIdx.y);
}

// gkey: null, or the group keys [kv_heads, C] (group selection): the selection ranks and counts
// by them, the estimate weighs by the head's own densities.
// One CTA: q head qh.
template <int D>
__device__ __forceinline__ void SelectCta(const ClusterSummaryView& s, int g, int tiles,
                                          int64_t budget, float top_p, int estimate,
                                          const float* __restrict__ density,
                                          const float* __restrict__ partial,
                                          const float* __restrict__ gkey,
                                          const ThresholdRow* __restrict__ thr,
                                          const ClusterStepOutputs& out, const int qh) {
  using ScanF = cub::BlockScan<float, kSelectThreads>;
  using ScanI = cub::BlockScan<int, kSelectThreads>;
  using RedF = cub::BlockReduce<float, kSelectThreads>;
  using RedLL = cub::BlockReduce<long long, kSelectThreads>;
  constexpr int R = kSelectThreads / D;  // thread groups over the tiles
  __shared__ union {
    typename ScanF::TempStorage f;
    typename ScanI::TempStorage i;
    typename RedF::TempStorage rf;
    typename RedLL::TempStorage rll;
  } tmp;
  __shared__ unsigned hist_tok[256];  // tokens: a kv head's rows fit int32 (cluster_begin)
  __shared__ float hist_mass[256];
  __shared__ float tot_acc[D];
  __shared__ float grp_acc[R][D];
  __shared__ float grp_l[R];
  // The linear histogram, then the threshold bin's clusters, then the selected clusters' weights:
  // each is dead before the next is written (barriers between).
  __shared__ union {
    struct {
      unsigned tok[kLinBins];
      float mass[kLinBins];
    } lin;
    struct {
      uint32_t key[kCandCap];
      int32_t n[kCandCap];
      float mass[kCandCap];
    } cand;
    struct {
      int32_t j[kSelectKeep];
      float w[kSelectKeep];
    } sel;
    float rows[kSelectThreads * 8 / D][D];  // the estimate's row sums (8 dims per thread)
  } big;
  __shared__ float s_lo, s_hi;
  __shared__ int s_bin, s_ncand, s_radix;
  __shared__ float s_m, s_l, s_above_mass;
  __shared__ long long s_above_tok;
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ int s_all, s_pre;
  __shared__ float s_tm;

  const int h = qh / g;
  const int c_n = s.num_clusters;
  const int t = threadIdx.x;
  const int dim = t % D, r = t / D;
  const float* dens = density + static_cast<size_t>(qh) * c_n;
  const bool grp = gkey != nullptr;
  const float* skey = grp ? gkey + static_cast<size_t>(h) * c_n : dens;  // what selects
  const int32_t* size = s.size + static_cast<size_t>(h) * c_n;
  const float* part = partial + static_cast<size_t>(qh) * tiles * (D + 2);

  // (a) total state: the tiles' maxima, then R groups of D threads each sum a stride of the tiles
  // (the loads of one thread are independent, so they overlap).
  float mloc = -INFINITY;
  for (int k = t; k < tiles; k += kSelectThreads)
    mloc = fmaxf(mloc, part[static_cast<size_t>(k) * (D + 2)]);
  const float mm = RedF(tmp.rf).Reduce(mloc, MaxOp());
  if (t == 0) s_m = mm;
  __syncthreads();
  const float M = s_m;
  {
    float a = 0.f, lsum = 0.f;
    if (M != -INFINITY) {
#pragma unroll 4
      for (int k = r; k < tiles; k += R) {
        const float* pk = part + static_cast<size_t>(k) * (D + 2);
        const float mk = pk[0];
        const float f = mk == -INFINITY ? 0.f : __expf(mk - M);
        a += f * pk[2 + dim];
        lsum += f * pk[1];
      }
    }
    grp_acc[r][dim] = a;
    if (dim == 0) grp_l[r] = lsum;
  }
  // The threshold's state before a search: nothing above, no prefix, not everything.
  auto reset_threshold = [&] {
    s_above_tok = 0;
    s_above_mass = 0.f;
    s_prefix = 0;
    s_mask = 0;
    s_all = 0;
  };
  if (t == 0) reset_threshold();
  __syncthreads();
  if (t < D) {
    float a = 0.f;
#pragma unroll
    for (int k = 0; k < R; ++k) a += grp_acc[k][t];
    tot_acc[t] = a;
  }
  if (t == 0) {
    float l = 0.f;
#pragma unroll
    for (int k = 0; k < R; ++k) l += grp_l[k];
    s_l = l;
  }
  __syncthreads();
  const float L = s_l;
  const bool use_p = top_p > 0.f;
  // The selection's masses: the head's own relative to its max, or (group) the keys' shares.
  const float Ms = grp ? 0.f : M;
  float target_mass = top_p * L;        // (group: set from the keys' total below)
  // The group's mask (ClusterStepOutputs::group_mask): written by the group's first q head.
  uint32_t* gmask = grp && out.group_mask != nullptr && qh % g == 0
                        ? out.group_mask + static_cast<size_t>(h) * c_n
                        : nullptr;
  const uint32_t gbits = g == 32 ? ~0u : (1u << g) - 1u;
  if (M == -INFINITY || budget <= 0) {  // nothing to select
    if (gmask != nullptr)
      for (int j = t; j < c_n; j += kSelectThreads) gmask[j] = 0u;
    if (t == 0) {
      out.selected_count[qh] = 0;
      out.selected_tokens[qh] = 0;
      out.est_lse[qh] = (estimate && M != -INFINITY) ? M + logf(L) : -INFINITY;
    }
    if (t < D) {
      out.est_o[static_cast<size_t>(qh) * D + t] =
          (estimate && M != -INFINITY) ? tot_acc[t] / L : 0.f;
    }
    return;
  }

  // (b) the threshold key: the largest key at which the tokens (or the estimated mass) of the
  // keys at or above it reach the criterion; s_above_* hold those of the keys above it. Each pass
  // walks the clusters in chunks of kSelectItems per thread, all of a chunk's loads issued before
  // any is used (the walk is latency-bound otherwise: one CTA per q head, a handful per SM).
  // A cluster's estimated mass relative to the total's max (the selection's and the estimate's).
  auto mass_of = [&](float dj, int nj) { return __expf(dj + logf(static_cast<float>(nj)) - M); };
  auto smass_of = [&](float dj, int nj) { return __expf(dj + logf(static_cast<float>(nj)) - Ms); };
  auto for_each_cluster = [&](auto&& f) {
    for (int base = 0; base < c_n; base += kSelectThreads * kSelectItems) {
      int n[kSelectItems];
      float dj[kSelectItems];
#pragma unroll
      for (int i = 0; i < kSelectItems; ++i) {
        const int j = base + i * kSelectThreads + t;
        n[i] = j < c_n ? size[j] : 0;
        dj[i] = j < c_n ? skey[j] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kSelectItems; ++i)
        if (n[i] > 0) f(dj[i], n[i]);
    }
  };
  // (b0) group selection: the threshold the threshold kernels found for this kv head, unless
  // they left the search to this kernel (kThresholdSearch: the same key either way).
  if (t == 0) {
    s_pre = 0;
    if (thr != nullptr) {
      const ThresholdRow row = thr[h];
      if (row.mode == kThresholdFound || row.mode == kThresholdAll) {
        s_pre = 1;
        s_all = row.mode == kThresholdAll ? 1 : 0;
        s_prefix = row.kt;
        s_above_tok = row.above_tok;
        s_above_mass = row.above_mass;
        s_tm = row.target_mass;
      }
    }
  }
  __syncthreads();
  const bool pre = s_pre != 0;
  if (pre) target_mass = s_tm;
  if (!pre) {
    // (b1) the range of the densities, then one histogram over linear bins of it. The bin is a
    // non-decreasing function of the density, so every key of a higher bin is above every key of a
    // lower one.
    float lo = INFINITY, hi = -INFINITY, ls = 0.f;
    const bool key_total = grp && use_p;
    if constexpr ((KVRT_CLUSTER_PARTS & 1) == 0) {
      for_each_cluster([&](float dj, int nj) {
        lo = fminf(lo, dj);
        hi = fmaxf(hi, dj);
        if (key_total) ls += smass_of(dj, nj);
      });
    }
    lo = RedF(tmp.rf).Reduce(lo, MinOp());
    __syncthreads();
    hi = RedF(tmp.rf).Reduce(hi, MaxOp());
    __syncthreads();
    if (key_total) {
      ls = RedF(tmp.rf).Sum(ls);
      if (t == 0) s_above_mass = ls;  // broadcast (reset below)
      __syncthreads();
      target_mass = top_p * s_above_mass;
      __syncthreads();
    }
    if (t == 0) {
      s_above_mass = 0.f;
      s_lo = lo;
      s_hi = hi;
      s_ncand = 0;
      s_bin = -1;
    }
    for (int b = t; b < kLinBins; b += kSelectThreads) {
      big.lin.tok[b] = 0;
      big.lin.mass[b] = 0.f;
    }
    __syncthreads();
    lo = s_lo;
    hi = s_hi;
    const float inv = static_cast<float>(kLinBins) / (hi - lo);
    auto bin_of = [&](float dj) { return LinBin(dj, lo, inv); };
    const bool linear = (KVRT_CLUSTER_PARTS & 1) == 0 && LinearRange(lo, hi, inv);
    if (linear) {
      for_each_cluster([&](float dj, int nj) {
        const int b = bin_of(dj);
        atomicAdd(&big.lin.tok[b], static_cast<unsigned>(nj));
        if (use_p) atomicAdd(&big.lin.mass[b], smass_of(dj, nj));
      });
      __syncthreads();
      long long above_tok = 0;
      float above_mass = 0.f;
      const int bin = ThresholdBin<kSelectThreads>(
          [&](int b) {
            return BinCount{big.lin.tok[b], big.lin.mass[b]};
          },
          budget, use_p, target_mass, &above_tok, &above_mass);
      if (t == 0) {
        s_bin = bin;
        s_all = bin < 0 ? 1 : 0;  // the whole set does not reach the criterion
        s_above_tok = above_tok;
        s_above_mass = above_mass;
      }
    __syncthreads();  // the histogram is dead from here: the threshold bin's clusters take it
    // (b2) the threshold bin's clusters, resolved in shared memory: the largest key whose
    // tokens (mass) at or above it, with the bins above, reach the criterion.
    const int tb = s_bin;
    if (tb >= 0) {
      for_each_cluster([&](float dj, int nj) {
        if (bin_of(dj) != tb) return;
        const int slot = atomicAdd(&s_ncand, 1);
        if (slot >= kCandCap) return;
        big.cand.key[slot] = OrderedKey(dj);
        big.cand.n[slot] = nj;
        big.cand.mass[slot] = use_p ? smass_of(dj, nj) : 0.f;
      });
      __syncthreads();
      const int nc = s_ncand;
      if (nc > 0 && nc <= kCandCap) {
        long long above_tok = 0;
        float above_mass = 0.f;
        const uint32_t kt_lin = ResolveThreshold<kSelectThreads>(
            big.cand.key, big.cand.n, big.cand.mass, nc, s_above_tok, s_above_mass, budget, use_p,
            target_mass, &above_tok, &above_mass);
        if (t == 0) {
          s_prefix = kt_lin;
          s_above_tok = above_tok;
          s_above_mass = above_mass;
          s_radix = 0;
        }
      } else if (t == 0) {
        s_radix = 1;
      }
    } else if (t == 0) {
      s_radix = s_all ? 0 : 1;
    }
  } else if (t == 0) {
    s_radix = 1;
  }
  __syncthreads();
  if (s_radix != 0 && t == 0) reset_threshold();
  __syncthreads();

  // (b3) otherwise a weighted radix select of the threshold key.
  for (int pass = 0; pass < ((KVRT_CLUSTER_PARTS & 1) == 0 && s_radix != 0 ? 4 : 0); ++pass) {
    const int shift = 24 - 8 * pass;
    for (int b = t; b < 256; b += kSelectThreads) {
      hist_tok[b] = 0;
      hist_mass[b] = 0.f;
    }
    __syncthreads();
    const uint32_t prefix = s_prefix, mask = s_mask;
    // A warp's run of items that all fall in one bin is summed in registers and added once: the
    // first passes put nearly every cluster in a bin or two, and every warp adding to the same
    // shared bin at every item serialised the kernel (76 us per layer-step at 128K, profiled).
    int run_bin = -1;
    unsigned run_tok = 0;
    float run_mass = 0.f;
    auto flush = [&] {
      if (run_bin >= 0 && (t & 31) == 0) {
        if (run_tok != 0u) atomicAdd(&hist_tok[run_bin], run_tok);
        if (use_p) atomicAdd(&hist_mass[run_bin], run_mass);
      }
      run_tok = 0u;
      run_mass = 0.f;
    };
    for (int base = 0; base < c_n; base += kSelectThreads * kSelectItems) {
      int n[kSelectItems];
      float dj[kSelectItems];
#pragma unroll
      for (int i = 0; i < kSelectItems; ++i) {
        const int j = base + i * kSelectThreads + t;  // a warp's lanes: consecutive clusters
        n[i] = j < c_n ? size[j] : 0;
        dj[i] = j < c_n ? skey[j] : 0.f;
      }
      // NOTE: every lane runs every item (n = 0 counts nothing) so that lanes of one bin combine
      // their tokens before one atomic.
#pragma unroll
      for (int i = 0; i < kSelectItems; ++i) {
        const uint32_t u = OrderedKey(n[i] > 0 ? dj[i] : 0.f);
        const bool in = n[i] > 0 && (u & mask) == prefix;
        const int bin = in ? static_cast<int>((u >> shift) & 255) : -1;
        auto mass = [&] { return in ? smass_of(dj[i], n[i]) : 0.f; };
        const int bin0 = __shfl_sync(0xffffffffu, bin, 0);
        if (__all_sync(0xffffffffu, bin == bin0)) {  // warp-uniform
          if (bin0 < 0) continue;
          if (bin0 != run_bin) {
            flush();
            run_bin = bin0;
          }
          run_tok += __reduce_add_sync(0xffffffffu, static_cast<unsigned>(n[i]));
          if (use_p) run_mass += WarpSum(mass());
          continue;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        const unsigned tok = __reduce_add_sync(peers, in ? static_cast<unsigned>(n[i]) : 0u);
        if (in && (t & 31) == __ffs(peers) - 1) atomicAdd(&hist_tok[bin], tok);
        if (in && use_p) atomicAdd(&hist_mass[bin], mass());
      }
    }
    flush();
    __syncthreads();
    if (t < 32) {  // lane l: bins 255 - 8l down to 248 - 8l
      long long ct = 0;
      float cm = 0.f;
      for (int b = 0; b < 8; ++b) {
        ct += static_cast<long long>(hist_tok[255 - 8 * t - b]);
        cm += hist_mass[255 - 8 * t - b];
      }
      long long it = ct;  // inclusive scan over lanes
      float im = cm;
      for (int o = 1; o < 32; o <<= 1) {
        const long long pt = __shfl_up_sync(0xffffffffu, it, o);
        const float pm = __shfl_up_sync(0xffffffffu, im, o);
        if (t >= o) {
          it += pt;
          im += pm;
        }
      }
      const long long base_t = s_above_tok;
      const float base_m = s_above_mass;
      const bool hit = base_t + it >= budget || (use_p && base_m + im >= target_mass);
      // NOTE: past the first pass a miss is only f32 rounding of the mass: take the last bin.
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      __syncwarp();  // every lane has read s_above_* before one lane writes them below
      const unsigned ballot = hits != 0u ? hits : (pass > 0 ? 0x80000000u : 0u);
      if (ballot == 0) {
        if (t == 0) s_all = 1;  // the whole remaining set does not reach the criterion
      } else if (t == __ffs(ballot) - 1) {
        long long at = base_t + it - ct;
        float am = base_m + im - cm;
        for (int b = 0; b < 8; ++b) {
          const int bin = 255 - 8 * t - b;
          const long long nt = at + static_cast<long long>(hist_tok[bin]);
          const float nm = am + hist_mass[bin];
          if (nt >= budget || (use_p && nm >= target_mass) || b == 7) {
            s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
            s_mask = mask | (255u << shift);
            s_above_tok = at;
            s_above_mass = am;
            break;
          }
          at = nt;
          am = nm;
        }
      }
    }
    __syncthreads();
    if (s_all) break;
  }
  if constexpr ((KVRT_CLUSTER_PARTS & 1) != 0) {
    if (t == 0) s_prefix = 0xffffffffu;  // no key above it: nothing selected
    __syncthreads();
  }
  }  // !pre
  const bool all = s_all != 0;
  const uint32_t kt = s_prefix;
  const long long above_tok = s_above_tok;
  const float above_mass = s_above_mass;

  // (c) compaction in index order; ties at kt in index order while the criterion is unmet. Each
  // thread takes kItems consecutive clusters (a blocked arrangement keeps index order), so a
  // pass of the block's scans covers kItems * 512 clusters. The selected clusters' weights
  // (exp(density + log size - M)) are kept for the estimate: the first kSelectKeep in shared
  // memory, the rest recomputed there.
  constexpr int kItems = 4;
  long long carry_tok = 0, sel_tok = 0;
  float carry_mass = 0.f, lsel_t = 0.f;
  int carry_count = 0;
  int32_t* selected = out.selected + static_cast<size_t>(qh) * c_n;
  for (int base = 0; base < ((KVRT_CLUSTER_PARTS & 2) != 0 ? 0 : c_n);
       base += kSelectThreads * kItems) {
    int n[kItems];
    float d[kItems];
    bool gt[kItems], eq[kItems];
    int tie_in[kItems], tie_t[kItems], agg_t;  // a chunk's tokens: int32 like the rows
    float mass_in[kItems], tie_m[kItems], agg_m = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = base + t * kItems + i;
      n[i] = j < c_n ? size[j] : 0;
      d[i] = j < c_n ? skey[j] : 0.f;
    }
    bool any_eq = false;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool valid = n[i] > 0;
      const uint32_t u = valid ? OrderedKey(d[i]) : 0u;
      gt[i] = valid && (all || u > kt);
      eq[i] = valid && !all && u == kt;
      tie_in[i] = eq[i] ? n[i] : 0;
      tie_t[i] = 0;
      mass_in[i] = 0.f;
      tie_m[i] = 0.f;
      any_eq = any_eq || eq[i];
    }
    // Ties at the threshold key sit in one chunk or a few: the others skip their scans.
    agg_t = 0;
    any_eq = __syncthreads_or(any_eq) != 0;
    if (any_eq) {
      ScanI(tmp.i).ExclusiveSum(tie_in, tie_t, agg_t);
      __syncthreads();
    }
    if (use_p && any_eq) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) mass_in[i] = eq[i] ? smass_of(d[i], n[i]) : 0.f;
      ScanF(tmp.f).ExclusiveSum(mass_in, tie_m, agg_m);
      __syncthreads();
    }
    int sel_in[kItems], pos[kItems], agg_c;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const long long before_t = above_tok + carry_tok + tie_t[i];
      const float before_m = above_mass + carry_mass + tie_m[i];
      sel_in[i] = gt[i] || (eq[i] && !(before_t >= budget || (use_p && before_m >= target_mass)));
    }
    ScanI(tmp.i).ExclusiveSum(sel_in, pos, agg_c);
    __syncthreads();
    if (gmask != nullptr) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = base + t * kItems + i;
        if (j < c_n) gmask[j] = sel_in[i] ? gbits : 0u;
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!sel_in[i]) continue;
      const int k = carry_count + pos[i];
      const int j = base + t * kItems + i;
      const float w = mass_of(grp ? dens[j] : d[i], n[i]);
      selected[k] = j;
      if (k < kSelectKeep) {
        big.sel.j[k] = j;
        big.sel.w[k] = w;
      }
      sel_tok += n[i];
      lsel_t += w;
    }
    carry_tok += agg_t;
    carry_mass += agg_m;
    carry_count += agg_c;
  }
  const int count = carry_count;  // the same in every thread (block aggregates)
  const long long tokens = RedLL(tmp.rll).Sum(sel_tok);
  __syncthreads();
  const float lsel_all = RedF(tmp.rf).Sum(lsel_t);
  if (t == 0) {
    out.selected_count[qh] = count;
    out.selected_tokens[qh] = tokens;
    s_l = lsel_all;  // L is in a register already
  }
  __syncthreads();  // the selected list (shared and global) and s_l are complete

  // (d) estimate = total - selected. Each selected cluster's value mean is one row of D bf16,
  // read 16 bytes per thread: kSelectThreads / (D / 8) rows in flight per pass (a row per 128
  // threads, 2 bytes each, left the loop waiting on HBM latency: ~90 us at 1M, measured).
  constexpr int kVec = 8, kRowLanes = D / kVec, kRows = kSelectThreads / kRowLanes;
  const int row_slot = t / kRowLanes, lane8 = t % kRowLanes;
  float a[kVec] = {};
#pragma unroll 4
  for (int k = row_slot; k < (estimate ? count : 0); k += kRows) {
    int j;
    float w;
    if (k < kSelectKeep) {
      j = big.sel.j[k];
      w = big.sel.w[k];
    } else {
      j = selected[k];
      w = mass_of(dens[j], size[j]);
    }
    float v[kVec];
    LoadBf16<kVec>(s.value_mean + (static_cast<size_t>(h) * c_n + j) * D + lane8 * kVec, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) a[e] += w * v[e];
  }
  __syncthreads();  // the selected clusters' weights are dead: their rows' sums take the space
#pragma unroll
  for (int e = 0; e < kVec; ++e) big.rows[row_slot][lane8 * kVec + e] = a[e];
  __syncthreads();
  if (t < D) {
    float sa = 0.f;
#pragma unroll 8
    for (int k = 0; k < kRows; ++k) sa += big.rows[k][t];
    const float lest = L - s_l;
    const bool ok = estimate && lest > kEstMassFloor * L;
    out.est_o[static_cast<size_t>(qh) * D + t] = ok ? (tot_acc[t] - sa) / lest : 0.f;
    if (t == 0) out.est_lse[qh] = ok ? M + logf(lest) : -INFINITY;
  }
}

template <int D>
__global__ void __launch_bounds__(kSelectThreads)
    SelectKernel(ClusterSummaryView s, int g, int tiles, int64_t budget, float top_p, int estimate,
                 const float* __restrict__ density, const float* __restrict__ partial,
                 const float* __restrict__ gkey, const ThresholdRow* __restrict__ thr,
                 ClusterStepOutputs out) {
  SelectCta<D>(s, g, tiles, budget, top_p, estimate, density, partial, gkey, thr, out, blockIdx.x);
}

// A batch's members: grid (q heads, members).
template <int D>
__global__ void __launch_bounds__(kSelectThreads)
    SelectBatchKernel(const __grid_constant__ ClusterBatchLaunch a, int g, float top_p,
                      int estimate) {
  const ClusterBatchMember& m = a.m[blockIdx.y];
  SelectCta<D>(m.it.summary, g, m.cctas, m.it.budget_tokens, top_p, estimate, m.it.out.density,
               m.it.workspace, m.gkey, m.thr.row, m.it.out, blockIdx.x);
}

// Whether ScoreMmaKernel takes the clusters: groups of at most kMmaQ, d <= 128 and 16-byte
// aligned summary rows (its loads).
// The tensor-core kernel scores centroids; given cluster masses (cluster_lse) take the other.
template <int D>
bool UseScoreMma(const ClusterSummaryView& s, int g, const float* cluster_lse) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return D <= 128 && g <= kMmaQ && cluster_lse == nullptr && aligned(s.centroid) &&
         aligned(s.value_mean);
}

// CTAs for the clusters per kv head: one wave of the score kernel (each CTA takes its share of
// the clusters; a second, nearly empty wave would double the kernel's time), at least one, at
// most ClusterTiles (the workspace's partial states).
template <int D, int MG, bool kMma>
int ClusterCtas(int ctiles, int kv_heads) {
  if (ctiles == 0) return 0;
  // The device's CTA slots for this kernel (static per instantiation), queried once per device (a
  // decode step launches it per layer).
  constexpr int kMaxDevices = 64;
  static std::atomic<int> slots_of[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return ctiles;
  }
  int slots = slots_of[dev].load(std::memory_order_relaxed);
  if (slots == 0) {
    int sms = 0, per_sm = 0;
    cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) {
      if constexpr (kMma) {
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ScoreMmaKernel<D>, kScoreThreads,
                                                          0);
      } else {
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ScoreKernel<D, MG>,
                                                          kScoreThreads, 0);
      }
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return ctiles;
    }
    slots = std::max(1, sms * per_sm);
    slots_of[dev].store(slots, std::memory_order_relaxed);
  }
  // NOTE: the outlier CTAs do not count: they are short, and with many outliers (thousands per
  // head at 1M) leaving them room left one cluster CTA per head.
  return std::max(1, std::min(ctiles, slots / kv_heads));
}

// The cluster CTAs per kv head the score kernel for s and g runs (SelectKernel's tile states).
// NOTE: the tensor-core kernel's slots are kept under MG = kMmaQ whatever the group, the one
// instantiation PreloadClusterStep warms.
template <int D, int MG>
int ScoreCtas(const ClusterSummaryView& s, int g, const float* cluster_lse) {
  const int ctiles = ClusterTiles(s.num_clusters);
  if constexpr (D <= 128 && MG <= kMmaQ) {
    if (UseScoreMma<D>(s, g, cluster_lse)) return ClusterCtas<D, kMmaQ, true>(ctiles, s.kv_heads);
  }
  return ClusterCtas<D, MG, false>(ctiles, s.kv_heads);
}

template <int D, int MG>
Err LaunchScore(const ClusterSummaryView& s, const float* q, int g, float scale, float spread_coef,
                int otiles, const float* cluster_lse, const ClusterStepOutputs& out, float* ws,
                cudaStream_t st, int* cctas) {
  *cctas = ScoreCtas<D, MG>(s, g, cluster_lse);
  const unsigned grid = static_cast<unsigned>((*cctas + otiles) * s.kv_heads);
  if constexpr (D <= 128 && MG <= kMmaQ) {
    if (UseScoreMma<D>(s, g, cluster_lse)) {  // the choice ScoreCtas made
      ScoreMmaKernel<D><<<grid, kScoreThreads, 0, st>>>(s, q, g, scale, spread_coef, *cctas, otiles,
                                                        out.density, out.outlier_score, ws);
      return LastLaunchErr();
    }
  }
  ScoreKernel<D, MG><<<grid, kScoreThreads, 0, st>>>(
      s, q, g, scale, spread_coef, *cctas, otiles, cluster_lse, out.density, out.outlier_score, ws);
  return LastLaunchErr();
}

// The batch's score launch: every member's CTA counts for one wave of the whole batch (each
// member's share of the slots), then one launch of the kernel the members share.
template <int D, int MG>
Err LaunchScoreBatch(ClusterBatchLaunch* a, int g, float scale, float spread_coef,
                     cudaStream_t st) {
  const int n = a->n, kv = a->m[0].it.summary.kv_heads;
  int mma = 0;
  if constexpr (D <= 128 && MG <= kMmaQ) {
    for (int i = 0; i < n; ++i)
      mma += UseScoreMma<D>(a->m[i].it.summary, g, a->m[i].it.cluster_lse) ? 1 : 0;
  }
  if (mma != 0 && mma != n) return {0, "the batch's members need different score kernels"};
  int grid_x = 0;
  for (int i = 0; i < n; ++i) {
    ClusterBatchMember& m = a->m[i];
    const int ctiles = ClusterTiles(m.it.summary.num_clusters);
    m.otiles = (m.it.summary.num_outliers + kOutlierTile - 1) / kOutlierTile;
    if constexpr (D <= 128 && MG <= kMmaQ) {
      if (mma != 0) m.cctas = ClusterCtas<D, kMmaQ, true>(ctiles, kv * n);
    }
    if (mma == 0) m.cctas = ClusterCtas<D, MG, false>(ctiles, kv * n);
    grid_x = std::max(grid_x, (m.cctas + m.otiles) * kv);
  }
  if (grid_x == 0) return {};
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(n));
  if constexpr (D <= 128 && MG <= kMmaQ) {
    if (mma != 0) {
      ScoreMmaBatchKernel<D><<<grid, kScoreThreads, 0, st>>>(*a, g, scale, spread_coef);
      return LastLaunchErr();
    }
  }
  ScoreBatchKernel<D, MG><<<grid, kScoreThreads, 0, st>>>(*a, g, scale, spread_coef);
  return LastLaunchErr();
}

// The tensor-core score kernel's batch form, where the shape takes it.
template <int D>
Err LoadScoreMmaBatch(int g) {
  if constexpr (D <= 128) {
    if (g <= kMmaQ) return LoadKernel(ScoreMmaBatchKernel<D>);
  }
  return {};
}

}  // namespace

Err LaunchClusterStepBatch(ClusterBatchLaunch* a, const ClusterStepParams& p, float scale,
                           void* stream) {
  if (a->n <= 0) return {};
  if (a->n > kClusterBatchMax) return {0, "more members than one launch takes"};
  const cudaStream_t st = AsStream(stream);
  const int n = a->n, kv = a->m[0].it.summary.kv_heads, g = p.q_heads / kv;
  const float spread_coef = p.spread_weight * 0.5f * scale * scale;
  const int use_p = p.top_p > 0.f ? 1 : 0;
  // Group selection per member (clusters to select among), and its threshold section where the
  // threshold kernels run (as LaunchClusterStep decides for one member). Set before the first
  // launch: each launch takes the members by value.
  int key_chunks = 0;
  for (int i = 0; i < n; ++i) {
    ClusterBatchMember& m = a->m[i];
    const int c = m.it.summary.num_clusters;
    m.gkey = p.group_select && g > 1 && c > 0 ? m.it.out.group_key : nullptr;
    m.thr = ThresholdWs{};
    if (m.gkey != nullptr && m.it.budget_tokens > 0 && c >= kThresholdMinClusters &&
        (KVRT_CLUSTER_PARTS & 1) == 0)
      m.thr = ThresholdLayout(m.it.workspace + ClusterThresholdAt(m.it.summary, p.q_heads), kv, c);
    if (m.gkey != nullptr) key_chunks = std::max(key_chunks, KeyChunks(c));
  }
  Err err{};
  KVRT_DISPATCH_HEAD_DIM(a->m[0].it.summary.head_dim, D, {
    if (g <= 4) {
      err = LaunchScoreBatch<D, 4>(a, g, scale, spread_coef, st);
    } else if (g <= 8) {
      err = LaunchScoreBatch<D, 8>(a, g, scale, spread_coef, st);
    } else {
      err = LaunchScoreBatch<D, 16>(a, g, scale, spread_coef, st);
    }
    if (err.ok() && key_chunks > 0) {
      const dim3 kgrid(static_cast<unsigned>(key_chunks), static_cast<unsigned>(kv),
                       static_cast<unsigned>(n));
      GroupKeyBatchKernel<D><<<kgrid, kKeyThreads, 0, st>>>(*a, g, use_p);
      err = LastLaunchErr();
      if (err.ok()) err = LaunchGroupThresholdBatch(*a, kv, p.top_p, st);
    }
    if (err.ok()) {
      const dim3 sgrid(static_cast<unsigned>(p.q_heads), static_cast<unsigned>(n));
      SelectBatchKernel<D><<<sgrid, kSelectThreads, 0, st>>>(*a, g, p.top_p, p.estimate ? 1 : 0);
      err = LastLaunchErr();
    }
  })
  return err;
}

Err PreloadClusterStep(int head_dim, int q_heads, int kv_heads) {
  const int g = q_heads / kv_heads;
  KVRT_DISPATCH_HEAD_DIM(head_dim, D, {
    // ClusterCtas queries (and keeps) the score kernel's occupancy, which loads it.
    if (g <= 4) {
      (void)ClusterCtas<D, 4, false>(1, kv_heads);
    } else if (g <= 8) {
      (void)ClusterCtas<D, 8, false>(1, kv_heads);
    } else {
      (void)ClusterCtas<D, 16, false>(1, kv_heads);
    }
    if constexpr (D <= 128) {
      if (g <= kMmaQ) (void)ClusterCtas<D, kMmaQ, true>(1, kv_heads);
    }
    Err e = LoadKernel(GroupKeyKernel<D>);
    if (e.ok() && q_heads > kv_heads) e = PreloadGroupThreshold();
    if (e.ok()) e = LoadKernel(SelectKernel<D>);
    // The batch's kernels (ClusterStepBatch), which kvrt_attend_batch may take.
    if (e.ok()) e = LoadKernel(GroupKeyBatchKernel<D>);
    if (e.ok()) e = LoadKernel(SelectBatchKernel<D>);
    if (e.ok()) {
      if (g <= 4) {
        e = LoadKernel(ScoreBatchKernel<D, 4>);
      } else if (g <= 8) {
        e = LoadKernel(ScoreBatchKernel<D, 8>);
      } else {
        e = LoadKernel(ScoreBatchKernel<D, 16>);
      }
    }
    if (e.ok()) e = LoadScoreMmaBatch<D>(g);
    return e;
  })
  return {};
}

Err LaunchClusterStep(const ClusterSummaryView& s, const float* q, const ClusterStepParams& p,
                      float scale, const ClusterStepOutputs& out, float* workspace, void* stream) {
  const cudaStream_t st = AsStream(stream);
  const int g = p.q_heads / s.kv_heads;
  const int ctiles = ClusterTiles(s.num_clusters);
  const int otiles = (s.num_outliers + kOutlierTile - 1) / kOutlierTile;
  float* ws = workspace;
  const size_t ws_floats = ClusterWorkspaceFloats(s, p.q_heads);
  if (ws == nullptr && ws_floats > 0) {
    if (Err e =
            CudaErr(cudaMallocAsync(reinterpret_cast<void**>(&ws), ws_floats * sizeof(float), st));
        !e.ok()) {
      return e;
    }
  }
  const float spread_coef = p.spread_weight * 0.5f * scale * scale;
  Err err{};
  KVRT_DISPATCH_HEAD_DIM(s.head_dim, D, {
    int cctas = 0;
    if (ctiles + otiles > 0) {
      if (g <= 4) {
        err = LaunchScore<D, 4>(s, q, g, scale, spread_coef, otiles, p.cluster_lse, out, ws, st,
                                &cctas);
      } else if (g <= 8) {
        err = LaunchScore<D, 8>(s, q, g, scale, spread_coef, otiles, p.cluster_lse, out, ws, st,
                                &cctas);
      } else {
        err = LaunchScore<D, 16>(s, q, g, scale, spread_coef, otiles, p.cluster_lse, out, ws, st,
                                 &cctas);
      }
    }
    if (err.ok() && p.scored_event != nullptr)
      err = CudaErr(cudaEventRecord(static_cast<cudaEvent_t>(p.scored_event), st));
    const bool grp = p.group_select && g > 1 && s.num_clusters > 0;
    // Group selection finds its threshold over many CTAs (cluster_threshold.cu) where there are
    // enough clusters to pay for their launches; the parts builds that leave the selection's
    // search out leave these out too.
    ThresholdWs thr;
    const int use_p = p.top_p > 0.f ? 1 : 0;
    if (grp && p.budget_tokens > 0 && s.num_clusters >= kThresholdMinClusters &&
        (KVRT_CLUSTER_PARTS & 1) == 0)
      thr = ThresholdLayout(ws + ClusterThresholdAt(s, p.q_heads), s.kv_heads, s.num_clusters);
    if (err.ok() && grp) {
      const dim3 kgrid(static_cast<unsigned>((s.num_clusters + kKeyClusters - 1) / kKeyClusters),
                       static_cast<unsigned>(s.kv_heads));
      GroupKeyKernel<D><<<kgrid, kKeyThreads, 0, st>>>(s, g, cctas, out.density, ws, p.key_offset,
                                                       out.group_key, thr, use_p);
      err = LastLaunchErr();
      if (err.ok() && thr.row != nullptr)
        err = LaunchGroupThreshold(s, out.group_key, p.budget_tokens, p.top_p, thr, st);
    }
    if (err.ok()) {
      SelectKernel<D><<<static_cast<unsigned>(p.q_heads), kSelectThreads, 0, st>>>(
          s, g, cctas, p.budget_tokens, p.top_p, p.estimate ? 1 : 0, out.density, ws,
          grp ? out.group_key : nullptr, thr.row, out);
      err = LastLaunchErr();
    }
  })
  if (ws != workspace) {
    const Err fe = CudaErr(cudaFreeAsync(ws, st));
    if (err.ok()) err = fe;
  }
  return err;
}

}  // namespace kvrt::gpu::detail
