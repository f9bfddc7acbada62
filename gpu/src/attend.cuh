#pragma once
// Decode attention of a few q rows over a set of K/V rows, split over the rows (flash-decoding:
// Dao et al., "Flash-Decoding for long-context inference", 2023): each CTA computes the partial
// state of one unit (a kv head of a sequence, with its `group` q heads, or one q row of a gather
// list) over one chunk of rows; a second kernel merges the chunks' states by log-sum-exp.
//
// Work split inside a CTA (kWarps warps): a row of head_dim elements is read by kTpr lanes with
// 16-byte loads; a warp covers 32 / kTpr rows at a time, kUnroll times per iteration so that
// several loads are in flight per thread. Each lane keeps an online-softmax state (m, l, acc) per q
// head over its rows and its slice of head_dim; states are merged across lanes with shuffles and
// across warps through shared memory. Scores are kept in base 2 (q is pre-scaled by
// scale * log2(e)) so that the inner loop uses exp2f.
#include <cmath>

#include "common.cuh"
#include "kvrt_common/nan_max.h"

namespace kvrt::gpu::detail {

template <typename T, int D>
struct AttnLayout {
  static constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  static constexpr int kTpr = (D / kPer16) < 32 ? D / kPer16 : 32;  // lanes per row
  static constexpr int kVec = D / kTpr;                             // elements per lane
  static constexpr int kRpw = 32 / kTpr;                            // rows per warp at a time
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Two rows per lane per iteration, one where a lane's slice is wider than 16 bytes (f32 d=256).
  static constexpr int kUnroll = kVec * static_cast<int>(sizeof(T)) > 16 ? 1 : 2;
  static constexpr int kStep = kWarps * kRpw * kUnroll;  // rows per CTA iteration
};

// Sinks + window of (sequence b, kv head g); unit u = b * kv_heads + g.
template <typename T>
struct TierSrc {
  const void* const* sink_k;
  const void* const* sink_v;
  const void* const* win_k;
  const void* const* win_v;
  const int32_t* n_sink;
  const int32_t* n_window;
  int kv_heads;
  struct Cursor {
    const T* sk;
    const T* sv;
    const T* wk;
    const T* wv;
    int ns;
    int n;
    int stride;
    __device__ __forceinline__ const T* K(int j) const {
      return j < ns ? sk + static_cast<size_t>(j) * stride
                    : wk + static_cast<size_t>(j - ns) * stride;
    }
    __device__ __forceinline__ const T* V(int j) const {
      return j < ns ? sv + static_cast<size_t>(j) * stride
                    : wv + static_cast<size_t>(j - ns) * stride;
    }
  };
  __device__ Cursor Bind(int u, int d) const {
    const int b = u / kv_heads, g = u % kv_heads;
    Cursor c;
    const int ns = n_sink[b];
    c.ns = ns;
    c.n = ns + n_window[b];
    c.stride = kv_heads * d;
    c.sk = static_cast<const T*>(sink_k[b]) + g * d;
    c.sv = static_cast<const T*>(sink_v[b]) + g * d;
    c.wk = static_cast<const T*>(win_k[b]) + g * d;
    c.wv = static_cast<const T*>(win_v[b]) + g * d;
    return c;
  }
};

// One q row's list of rows of a gathered buffer; unit u = q row.
template <typename T>
struct GatherSrc {
  const void* k;
  const void* v;
  const int32_t* offsets;
  const int32_t* ids;
  struct Cursor {
    const T* k;
    const T* v;
    const int32_t* ids;
    int base;
    int n;
    int d;
    __device__ __forceinline__ size_t Row(int j) const {
      return static_cast<size_t>(ids != nullptr ? ids[base + j] : base + j) * d;
    }
    __device__ __forceinline__ const T* K(int j) const { return k + Row(j); }
    __device__ __forceinline__ const T* V(int j) const { return v + Row(j); }
  };
  __device__ Cursor Bind(int u, int d) const {
    Cursor c;
    c.k = static_cast<const T*>(k);
    c.v = static_cast<const T*>(v);
    c.ids = ids;
    c.base = offsets[u];
    c.n = offsets[u + 1] - c.base;
    c.d = d;
    return c;
  }
};

// grid (units * subs, num_splits), block kThreads.
// q: [units * group, D] (f32 when q_is_f32, else T). Outputs when num_splits == 1: o [units *
// group, D], lse [units * group]; else part_o [units * group, num_splits, D] and part_lse
// [units * group, num_splits].
// A group wider than G q heads is split over subs = ceil(group / G) CTAs per unit, each taking G
// of its q heads over the same rows: the rows are read subs times, but a CTA's q and accumulators
// stay in registers (G = 16 at d = 128 would spill).
template <typename T, int D, int G, class Src>
__global__ void __launch_bounds__(AttnLayout<T, D>::kThreads)
    AttendKernel(Src src, const void* __restrict__ q, int q_is_f32, int group, int subs,
                 float scale_log2, int chunk, int num_splits, float* __restrict__ o,
                 float* __restrict__ lse, float* __restrict__ part_o,
                 float* __restrict__ part_lse) {
  using L = AttnLayout<T, D>;
  constexpr int kVec = L::kVec;
  const int u = blockIdx.x / subs, s = blockIdx.y;
  const int h0 = (blockIdx.x % subs) * G;  // this CTA's first q head of the unit's group
  const int heads = min(G, group - h0);    // and how many it takes
  const auto cur = src.Bind(u, D);
  const int begin = s * chunk;
  const int end = min(cur.n, begin + chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / L::kTpr, li = lane % L::kTpr;

  float qv[G][kVec];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < heads) {
      const size_t off = (static_cast<size_t>(u) * group + h0 + h) * D + li * kVec;
      if (q_is_f32) {
        LoadVec<float, kVec>(static_cast<const float*>(q) + off, qv[h]);
      } else {
        LoadVec<T, kVec>(static_cast<const T*>(q) + off, qv[h]);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) qv[h][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) qv[h][i] = 0.f;
    }
  }

  float m[G], l[G], acc[G][kVec];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[h][i] = 0.f;
  }

  // NOTE: the loop bound is warp-uniform (j0 depends on the warp only) so that every lane takes
  // part in the shuffles; lanes whose row is past `end` compute on nothing and skip the update.
  // The next iteration's K/V are loaded before this one's are used (software pipelining): decode
  // attention is latency-bound at small batch, and this keeps 2 * kUnroll rows in flight per lane.
  using Raw = RawVec<T, kVec>;
  Raw kr[L::kUnroll], vr[L::kUnroll];
  bool valid[L::kUnroll];
  auto load = [&](int j0, Raw(&kk)[L::kUnroll], Raw(&vv)[L::kUnroll], bool(&ok)[L::kUnroll]) {
#pragma unroll
    for (int r = 0; r < L::kUnroll; ++r) {
      const int j = j0 + r * L::kRpw + sub;
      ok[r] = j < end;
      if (ok[r]) {
        kk[r].Load(cur.K(j) + li * kVec);
        vv[r].Load(cur.V(j) + li * kVec);
      }
    }
  };
  int j0 = begin + warp * L::kRpw * L::kUnroll;
  if (j0 < end) load(j0, kr, vr, valid);
  for (; j0 < end; j0 += L::kStep) {
    Raw kn[L::kUnroll], vn[L::kUnroll];
    bool vnext[L::kUnroll];
    if (j0 + L::kStep < end) load(j0 + L::kStep, kn, vn, vnext);
#pragma unroll
    for (int r = 0; r < L::kUnroll; ++r) {
      float dot[G];
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) a = fmaf(qv[h][i], kr[r].At(i), a);
        dot[h] = a;
      }
#pragma unroll
      for (int off = L::kTpr / 2; off > 0; off >>= 1) {
#pragma unroll
        for (int h = 0; h < G; ++h) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], off);
      }
      if (valid[r]) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float nm = MaxPropagateNan(m[h], dot[h]);  // NaN score: NaN state
          // A -inf score on an empty state has no weight (as the host reference's): the
          // update's exp2(-inf - -inf) would be NaN.
          if (h < heads && nm != -INFINITY) {
            const float corr = exp2f(m[h] - nm);  // m = -inf, nm finite: 0
            const float p = exp2f(dot[h] - nm);
            l[h] = l[h] * corr + p;
#pragma unroll
            for (int i = 0; i < kVec; ++i) acc[h][i] = fmaf(p, vr[r].At(i), acc[h][i] * corr);
            m[h] = nm;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < L::kUnroll; ++r) {
      kr[r] = kn[r];
      vr[r] = vn[r];
      valid[r] = (j0 + L::kStep < end) && vnext[r];
    }
  }

  // Merge the rows-at-a-time lanes of a warp (lanes li, li + kTpr, ...).
#pragma unroll
  for (int off = L::kTpr; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], off);
      const float nm = MaxPropagateNan(m[h], mo);
      const float ca = nm == -INFINITY ? 0.f : exp2f(m[h] - nm);
      const float cb = nm == -INFINITY ? 0.f : exp2f(mo - nm);
      l[h] = l[h] * ca + lo * cb;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[h][i], off);
        acc[h][i] = acc[h][i] * ca + ao * cb;
      }
      m[h] = nm;
    }
  }

  __shared__ float sm_acc[L::kWarps][G][D];
  __shared__ float sm_m[L::kWarps][G];
  __shared__ float sm_l[L::kWarps][G];
  if (sub == 0) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sm_acc[warp][h][li * kVec + i] = acc[h][i];
      if (li == 0) {
        sm_m[warp][h] = m[h];
        sm_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * D; idx += L::kThreads) {
    const int h = idx / D, e = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) mm = MaxPropagateNan(mm, sm_m[w][h]);
    float ll = 0.f, oo = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < L::kWarps; ++w) {
        const float c = exp2f(sm_m[w][h] - mm);
        ll += sm_l[w][h] * c;
        oo += sm_acc[w][h][e] * c;
      }
      oo /= ll;
    }
    const float lse_val = mm == -INFINITY ? -INFINITY : (mm + log2f(ll)) * 0.69314718055994531f;
    const size_t row = static_cast<size_t>(u) * group + h0 + h;
    if (num_splits == 1) {
      o[row * D + e] = oo;
      if (e == 0) lse[row] = lse_val;
    } else {
      const size_t pr = row * num_splits + s;
      part_o[pr * D + e] = oo;
      if (e == 0) part_lse[pr] = lse_val;
    }
  }
}

// grid rows, block 128: one CTA per row merges its num_splits partial states, its 4 warps taking
// every 4th split (the splits' loads overlap instead of forming one warp's chain of them).
// part_o: [rows, num_splits, D], part_lse: [rows, num_splits]; o: [rows, D], lse: [rows].
constexpr int kMergeSplitWarps = 4;

template <int D>
__global__ void __launch_bounds__(kMergeSplitWarps * 32)
    MergeSplitsKernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                      int num_splits, float* __restrict__ o, float* __restrict__ lse) {
  constexpr int kPer = D / 32;
  __shared__ float part_acc[kMergeSplitWarps][D];
  const int row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* pl = part_lse + static_cast<size_t>(row) * num_splits;
  // Max and sum over the splits with the lanes in parallel (every warp alike), then each warp's
  // share of the weighted sum of the splits' o rows.
  float mm = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mm = MaxPropagateNan(mm, pl[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    mm = MaxPropagateNan(mm, __shfl_xor_sync(0xffffffffu, mm, off));
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  float ll = 0.f;
  if (mm != -INFINITY) {
    for (int s = lane; s < num_splits; s += 32) ll += __expf(pl[s] - mm);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ll += __shfl_xor_sync(0xffffffffu, ll, off);
#pragma unroll 4
    for (int s = warp; s < num_splits; s += kMergeSplitWarps) {
      const float w = __expf(pl[s] - mm);  // empty split: exp(-inf) = 0
      const float* po = part_o + (static_cast<size_t>(row) * num_splits + s) * D;
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] = fmaf(w, po[lane + 32 * i], acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) part_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  const float inv = mm == -INFINITY ? 0.f : 1.f / ll;
  for (int t = threadIdx.x; t < D; t += kMergeSplitWarps * 32) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kMergeSplitWarps; ++w) a += part_acc[w][t];
    o[static_cast<size_t>(row) * D + t] = a * inv;
  }
  if (threadIdx.x == 0) lse[row] = mm == -INFINITY ? -INFINITY : mm + logf(ll);
}

template <typename T, int D, int G, class Src>
Err RunAttend(const Src& src, int units, int group, const void* q, bool q_is_f32, float scale,
              const SplitPlan& plan, float* o, float* lse, float* workspace, void* stream) {
  using L = AttnLayout<T, D>;
  if (units == 0) return {};
  const int subs = (group + G - 1) / G;
  if (static_cast<int64_t>(units) * subs > 0x7fffffff) return Err{0, "too many units for one grid"};
  const cudaStream_t st = AsStream(stream);
  const int rows = units * group;
  float* part_o = workspace;
  float* part_lse =
      plan.num_splits > 1 ? workspace + static_cast<size_t>(rows) * plan.num_splits * D : nullptr;
  const dim3 grid(units * subs, plan.num_splits);
  AttendKernel<T, D, G, Src><<<grid, L::kThreads, 0, st>>>(
      src, q, q_is_f32 ? 1 : 0, group, subs, scale * 1.4426950408889634f, plan.chunk,
      plan.num_splits, o, lse, part_o, part_lse);
  if (Err e = LastLaunchErr(); !e.ok()) return e;
  if (plan.num_splits > 1) {
    MergeSplitsKernel<D>
        <<<rows, kMergeSplitWarps * 32, 0, st>>>(part_o, part_lse, plan.num_splits, o, lse);
    return LastLaunchErr();
  }
  return {};
}

// Per-dtype entry points (one translation unit each, to compile in parallel).
template <typename T>
Err TierAttentionT(const TierBatch& tier, const void* q, const AttnParams& p, float scale,
                   const SplitPlan& plan, float* o, float* lse, float* workspace, void* stream) {
  TierSrc<T> src{tier.sink_k, tier.sink_v,   tier.window_k, tier.window_v,
                 tier.n_sink, tier.n_window, tier.kv_heads};
  const int group = p.q_heads / tier.kv_heads;
  const int units = tier.batch * tier.kv_heads;
  KVRT_DISPATCH_HEAD_DIM(tier.head_dim, D, {
    if (group <= 4) {
      return RunAttend<T, D, 4>(src, units, group, q, p.q_is_f32, scale, plan, o, lse, workspace,
                                stream);
    }
    // Wider groups: kTierGroupTile q heads per CTA (RunAttend splits the group).
    return RunAttend<T, D, kTierGroupTile>(src, units, group, q, p.q_is_f32, scale, plan, o, lse,
                                           workspace, stream);
  })
  return {};
}

template <typename T>
Err GatherAttendT(const GatherBatch& g, const void* q, bool q_is_f32, float scale,
                  const SplitPlan& plan, float* o, float* lse, float* workspace, void* stream) {
  GatherSrc<T> src{g.k, g.v, g.row_offsets, g.row_ids};
  KVRT_DISPATCH_HEAD_DIM(g.head_dim, D, {
    return RunAttend<T, D, 1>(src, g.rows_q, 1, q, q_is_f32, scale, plan, o, lse, workspace,
                              stream);
  })
  return {};
}

}  // namespace kvrt::gpu::detail
