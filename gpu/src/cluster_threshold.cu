// The group selection's threshold key over many CTAs (cluster_threshold.h): the same key the
// select kernel's own search finds (cluster_score.cu), in two kernels over chunks of the kv
// head's clusters instead of three walks of one CTA per q head.
//
// HistKernel, grid (chunks, kv heads): every CTA reduces GroupKeyKernel's partial ranges (in one
// fixed order, so every CTA bins with the same lo and inv), bins its chunk's keys into a shared
// histogram of tokens (and, top_p > 0, mass) and adds its bins to the kv head's; the last CTA of
// the kv head to finish scans the histogram from the top for the threshold bin. CandKernel, same
// grid: the threshold bin's clusters of each chunk join a list; the last CTA resolves the exact
// threshold key among them. A range the bins cannot split, or a threshold bin of more than
// kCandCap clusters, leaves the search to the select kernel (kThresholdSearch).
#include <algorithm>
#include <cub/block/block_reduce.cuh>

#include "cluster_launch.h"
#include "cluster_threshold.cuh"
#include "common.cuh"

namespace kvrt::gpu::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                      // clusters per thread of a chunk
constexpr int kChunk = kThreads * kItems;      // clusters per CTA

using RedF = cub::BlockReduce<float, kThreads>;

// Whether this CTA is the last of its kv head's `ctas` CTAs to pass this point, every CTA's writes
// before it visible to that one. NOTE: every thread fences its own writes (their atomics are
// fire-and-forget reductions, still in flight at the barrier), then one thread takes a ticket.
__device__ __forceinline__ bool LastToFinish(unsigned* done, unsigned ctas) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(done, 1u) == ctas - 1 ? 1 : 0;
  __syncthreads();
  if (s_last) __threadfence();
  return s_last != 0;
}

// Chunk `chunk`'s clusters j (kItems per thread, strided by the block) with their sizes and keys,
// all loaded before f(key, size) runs for each sized one.
template <typename F>
__device__ __forceinline__ void ForChunk(int chunk, const int32_t* size, const float* key, int c_n,
                                         F&& f) {
  int n[kItems];
  float k[kItems];
  const int base = chunk * kChunk + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = base + i * kThreads;
    n[i] = j < c_n ? size[j] : 0;
    k[i] = j < c_n ? key[j] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (n[i] > 0) f(k[i], n[i]);
}

// The chunks of a kv head's c_n clusters (the kernels' grid x).
__host__ __device__ __forceinline__ int Chunks(int c_n) { return (c_n + kChunk - 1) / kChunk; }

// One CTA of HistKernel: chunk `chunk` of kv head h.
__device__ __forceinline__ void HistCta(const int32_t* __restrict__ size_all,
                                        const float* __restrict__ key_all, int c_n, int64_t budget,
                                        float top_p, const ThresholdWs& w, int chunk, int h) {
  __shared__ typename RedF::TempStorage red;
  __shared__ struct {
    unsigned tok[kLinBins];
    float mass[kLinBins];
  } hist;
  __shared__ float s_lo, s_hi, s_mass;
  const int t = threadIdx.x;
  const bool use_p = top_p > 0.f;
  ThresholdRow& row = w.row[h];

  // The keys' range (and total mass) from GroupKeyKernel's CTAs, reduced in one order by all.
  float lo = INFINITY, hi = -INFINITY, mass = 0.f;
  for (int k = t; k < w.key_ctas; k += kThreads) {
    const size_t at = static_cast<size_t>(h) * w.key_ctas + k;
    lo = fminf(lo, w.part_lo[at]);
    hi = fmaxf(hi, w.part_hi[at]);
    mass += w.part_mass[at];
  }
  lo = RedF(red).Reduce(lo, MinOp());
  __syncthreads();
  hi = RedF(red).Reduce(hi, MaxOp());
  __syncthreads();
  mass = RedF(red).Sum(mass);
  if (t == 0) {
    s_lo = lo;
    s_hi = hi;
    s_mass = mass;
  }
  __syncthreads();
  lo = s_lo;
  hi = s_hi;
  const float inv = static_cast<float>(kLinBins) / (hi - lo);
  if (!LinearRange(lo, hi, inv)) {  // every CTA sees it: the select kernel searches itself
    if (chunk == 0 && t == 0) row.mode = kThresholdSearch;
    return;
  }

  for (int b = t; b < kLinBins; b += kThreads) {
    hist.tok[b] = 0u;
    hist.mass[b] = 0.f;
  }
  __syncthreads();
  const int32_t* size = size_all + static_cast<size_t>(h) * c_n;
  const float* key = key_all + static_cast<size_t>(h) * c_n;
  ForChunk(chunk, size, key, c_n, [&](float kj, int nj) {
    const int b = LinBin(kj, lo, inv);
    atomicAdd(&hist.tok[b], static_cast<unsigned>(nj));
    if (use_p) atomicAdd(&hist.mass[b], __expf(kj + logf(static_cast<float>(nj))));
  });
  __syncthreads();
  unsigned* gtok = w.hist_tok + static_cast<size_t>(h) * kLinBins;
  float* gmass = w.hist_mass + static_cast<size_t>(h) * kLinBins;
  for (int b = t; b < kLinBins; b += kThreads) {
    if (hist.tok[b] != 0u) atomicAdd(&gtok[b], hist.tok[b]);
    if (use_p && hist.mass[b] != 0.f) atomicAdd(&gmass[b], hist.mass[b]);
  }
  if (!LastToFinish(&row.hist_done, Chunks(c_n))) return;

  // The last CTA: the threshold bin over the kv head's histogram.
  const float target = top_p * s_mass;
  long long above_tok = 0;
  float above_mass = 0.f;
  const int bin = ThresholdBin<kThreads>(
      [&](int b) {
        return BinCount{__ldcg(&gtok[b]), use_p ? __ldcg(&gmass[b]) : 0.f};
      },
      budget, use_p, target, &above_tok, &above_mass);
  if (t != 0) return;
  row.above_tok = above_tok;
  row.above_mass = above_mass;
  row.target_mass = target;
  if (bin < 0) {  // the whole set does not reach the criterion
    row.mode = kThresholdAll;
    return;
  }
  row.bin = bin;
  row.lo = lo;
  row.hi = hi;
  row.ncand = 0;
}

// One CTA of CandKernel: chunk `chunk` of kv head h.
__device__ __forceinline__ void CandCta(const int32_t* __restrict__ size_all,
                                        const float* __restrict__ key_all, int c_n, int64_t budget,
                                        float top_p, const ThresholdWs& w, int chunk, int h) {
  __shared__ struct {
    uint32_t key[kCandCap];
    int32_t n[kCandCap];
    float mass[kCandCap];
  } cand;
  const int t = threadIdx.x;
  const bool use_p = top_p > 0.f;
  ThresholdRow& row = w.row[h];
  const int tb = row.bin;
  if (row.mode != kThresholdPending || tb < 0) return;  // every CTA reads the same row
  const float lo = row.lo, hi = row.hi;
  const float inv = static_cast<float>(kLinBins) / (hi - lo);
  const int32_t* size = size_all + static_cast<size_t>(h) * c_n;
  const float* key = key_all + static_cast<size_t>(h) * c_n;
  uint32_t* ckey = w.cand_key + static_cast<size_t>(h) * kCandCap;
  int32_t* cn = w.cand_n + static_cast<size_t>(h) * kCandCap;
  float* cmass = w.cand_mass + static_cast<size_t>(h) * kCandCap;
  ForChunk(chunk, size, key, c_n, [&](float kj, int nj) {
    if (LinBin(kj, lo, inv) != tb) return;
    const int slot = atomicAdd(&row.ncand, 1);
    if (slot >= kCandCap) return;
    ckey[slot] = OrderedKey(kj);
    cn[slot] = nj;
    cmass[slot] = use_p ? __expf(kj + logf(static_cast<float>(nj))) : 0.f;
  });
  if (!LastToFinish(&row.cand_done, Chunks(c_n))) return;

  // The last CTA: the largest key whose tokens (mass) at or above it, with the bins above,
  // reach the criterion (as the select kernel resolves its threshold bin).
  const int nc = atomicAdd(&row.ncand, 0);
  if (nc <= 0 || nc > kCandCap) {
    if (t == 0) row.mode = kThresholdSearch;
    return;
  }
  for (int i = t; i < nc; i += kThreads) {
    cand.key[i] = __ldcg(&ckey[i]);
    cand.n[i] = __ldcg(&cn[i]);
    cand.mass[i] = __ldcg(&cmass[i]);
  }
  __syncthreads();
  long long above_tok = 0;
  float above_mass = 0.f;
  const uint32_t kt =
      ResolveThreshold<kThreads>(cand.key, cand.n, cand.mass, nc, row.above_tok, row.above_mass,
                                 budget, use_p, row.target_mass, &above_tok, &above_mass);
  if (t == 0) {
    row.kt = kt;
    row.above_tok = above_tok;
    row.above_mass = above_mass;
    row.mode = kThresholdFound;
  }
}

__global__ void __launch_bounds__(kThreads)
    HistKernel(const int32_t* __restrict__ size_all, const float* __restrict__ key_all, int c_n,
               int64_t budget, float top_p, ThresholdWs w) {
  HistCta(size_all, key_all, c_n, budget, top_p, w, blockIdx.x, blockIdx.y);
}

__global__ void __launch_bounds__(kThreads)
    CandKernel(const int32_t* __restrict__ size_all, const float* __restrict__ key_all, int c_n,
               int64_t budget, float top_p, ThresholdWs w) {
  CandCta(size_all, key_all, c_n, budget, top_p, w, blockIdx.x, blockIdx.y);
}

// A batch's members (ClusterBatchLaunch), HistKernel's pass or (kCand) CandKernel's: grid (the
// most chunks, kv heads, members); a member without the threshold kernels (thr.row null) or with
// fewer chunks leaves its CTAs idle.
template <bool kCand>
__global__ void __launch_bounds__(kThreads)
    ThresholdBatchKernel(const __grid_constant__ ClusterBatchLaunch a, float top_p) {
  const ClusterBatchMember& m = a.m[blockIdx.z];
  const ClusterSummaryView& s = m.it.summary;
  if (m.thr.row == nullptr || static_cast<int>(blockIdx.x) >= Chunks(s.num_clusters)) return;
  if constexpr (kCand) {
    CandCta(s.size, m.gkey, s.num_clusters, m.it.budget_tokens, top_p, m.thr, blockIdx.x,
            blockIdx.y);
  } else {
    HistCta(s.size, m.gkey, s.num_clusters, m.it.budget_tokens, top_p, m.thr, blockIdx.x,
            blockIdx.y);
  }
}

}  // namespace

Err PreloadGroupThreshold() {
  Err e = LoadKernel(HistKernel);
  if (e.ok()) e = LoadKernel(CandKernel);
  if (e.ok()) e = LoadKernel(ThresholdBatchKernel<false>);
  return e.ok() ? LoadKernel(ThresholdBatchKernel<true>) : e;
}

Err LaunchGroupThresholdBatch(const ClusterBatchLaunch& a, int kv_heads, float top_p,
                              void* stream) {
  int chunks = 0;
  for (int i = 0; i < a.n; ++i)
    if (a.m[i].thr.row != nullptr)
      chunks = std::max(chunks, Chunks(a.m[i].it.summary.num_clusters));
  if (chunks == 0) return {};
  const cudaStream_t st = AsStream(stream);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(a.n));
  ThresholdBatchKernel<false><<<grid, kThreads, 0, st>>>(a, top_p);
  if (Err e = LastLaunchErr(); !e.ok()) return e;
  ThresholdBatchKernel<true><<<grid, kThreads, 0, st>>>(a, top_p);
  return LastLaunchErr();
}

Err LaunchGroupThreshold(const ClusterSummaryView& s, const float* group_key, int64_t budget,
                         float top_p, const ThresholdWs& w, void* stream) {
  const cudaStream_t st = AsStream(stream);
  const dim3 grid(static_cast<unsigned>(Chunks(s.num_clusters)), static_cast<unsigned>(s.kv_heads));
  HistKernel<<<grid, kThreads, 0, st>>>(s.size, group_key, s.num_clusters, budget, top_p, w);
  if (Err e = LastLaunchErr(); !e.ok()) return e;
  CandKernel<<<grid, kThreads, 0, st>>>(s.size, group_key, s.num_clusters, budget, top_p, w);
  return LastLaunchErr();
}

}  // namespace kvrt::gpu::detail
