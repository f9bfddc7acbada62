#pragma once
// Device helpers of the selection's threshold search (cluster_threshold.h has the layout), shared
// by the select kernel (cluster_score.cu) and the threshold kernels (cluster_threshold.cu).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

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

// One bin of the selection's histogram.
struct BinCount {
  unsigned tok;
  float mass;
};

// The threshold bin of a histogram over kLinBins linear bins: the highest bin at which the
// tokens (mass) of it and the bins above reach the criterion. load(b) gives bin b's BinCount. Every
// thread gets the bin (-1: the whole histogram does not reach it) and in *above_tok / *above_mass
// the bins above it. A block-wide call.
template <int kThreads, typename Load>
__device__ int ThresholdBin(Load load, int64_t budget, bool use_p, float target,
                            long long* above_tok, float* above_mass) {
  constexpr int kPer = kLinBins / kThreads;
  using ScanI = cub::BlockScan<int, kThreads>;
  using ScanF = cub::BlockScan<float, kThreads>;
  using RedLL = cub::BlockReduce<long long, kThreads>;
  __shared__ union {
    typename ScanI::TempStorage i;
    typename ScanF::TempStorage f;
    typename RedLL::TempStorage ll;
  } tmp;
  __shared__ long long s_first, s_tok;
  __shared__ float s_mass;
  const int t = threadIdx.x;
  // Thread t holds bins kLinBins - 1 - (t * kPer + k): an inclusive scan from the top.
  int ct[kPer], it[kPer];
  float cm[kPer], im[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const BinCount c = load(kLinBins - 1 - (t * kPer + k));
    ct[k] = static_cast<int>(c.tok);
    cm[k] = use_p ? c.mass : 0.f;
  }
  ScanI(tmp.i).InclusiveSum(ct, it);
  __syncthreads();
  if (use_p) {
    ScanF(tmp.f).InclusiveSum(cm, im);
    __syncthreads();
  }
  long long first = LLONG_MAX;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const bool hit = it[k] >= budget || (use_p && im[k] >= target);
    if (hit && first == LLONG_MAX) first = t * kPer + k;
  }
  first = RedLL(tmp.ll).Reduce(first, [](long long a, long long b) { return a < b ? a : b; });
  if (t == 0) {
    s_first = first;
    s_tok = 0;
    s_mass = 0.f;
  }
  __syncthreads();
  first = s_first;
  if (first != LLONG_MAX && first / kPer == t) {
    const int k = static_cast<int>(first % kPer);
    s_tok = it[k] - ct[k];
    s_mass = use_p ? im[k] - cm[k] : 0.f;
  }
  __syncthreads();
  *above_tok = s_tok;
  *above_mass = s_mass;
  return first == LLONG_MAX ? -1 : kLinBins - 1 - static_cast<int>(first);
}

// The exact threshold key among the threshold bin's nc clusters (OrderedKey, size, mass, in
// shared memory), at/am the tokens and mass of the bins above it: the largest key whose tokens
// (mass) at or above it reach the criterion. None reaching it is f32 rounding of the bins' mass:
// the lowest key then takes the whole bin. Every thread gets the key, and in *above_tok /
// *above_mass the tokens and mass above it (at, am and the candidates' share). A block-wide call.
template <int kThreads>
__device__ uint32_t ResolveThreshold(const uint32_t* key, const int32_t* n, const float* mass,
                                     int nc, long long at, float am, int64_t budget, bool use_p,
                                     float target, long long* above_tok, float* above_mass) {
  using RedLL = cub::BlockReduce<long long, kThreads>;
  using RedF = cub::BlockReduce<float, kThreads>;
  __shared__ union {
    typename RedLL::TempStorage ll;
    typename RedF::TempStorage f;
  } tmp;
  __shared__ uint32_t s_kt;
  __shared__ long long s_tok;
  __shared__ float s_mass;
  const int t = threadIdx.x;
  long long best = -1, lowest = LLONG_MAX;
  for (int i = t; i < nc; i += kThreads) {
    const uint32_t ki = key[i];
    long long ge_t = 0;
    float ge_m = 0.f;
    for (int x = 0; x < nc; ++x) {
      if (key[x] >= ki) {
        ge_t += n[x];
        ge_m += mass[x];
      }
    }
    if (at + ge_t >= budget || (use_p && am + ge_m >= target))
      best = best > static_cast<long long>(ki) ? best : static_cast<long long>(ki);
    lowest = lowest < static_cast<long long>(ki) ? lowest : static_cast<long long>(ki);
  }
  auto max_ll = [](long long a, long long b) { return a > b ? a : b; };
  auto min_ll = [](long long a, long long b) { return a < b ? a : b; };
  best = RedLL(tmp.ll).Reduce(best, max_ll);
  __syncthreads();
  lowest = RedLL(tmp.ll).Reduce(lowest, min_ll);
  if (t == 0) s_kt = static_cast<uint32_t>(best >= 0 ? best : lowest);
  __syncthreads();
  const uint32_t kt = s_kt;
  long long gt_t = 0;
  float gt_m = 0.f;
  for (int i = t; i < nc; i += kThreads) {
    if (key[i] > kt) {
      gt_t += n[i];
      gt_m += mass[i];
    }
  }
  gt_t = RedLL(tmp.ll).Sum(gt_t);
  __syncthreads();
  gt_m = RedF(tmp.f).Sum(gt_m);
  if (t == 0) {
    s_tok = at + gt_t;
    s_mass = am + gt_m;
  }
  __syncthreads();
  *above_tok = s_tok;
  *above_mass = s_mass;
  return kt;
}

}  // namespace kvrt::gpu::detail
