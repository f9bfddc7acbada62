// Exact top-k of queries against keys, for the attention-aware index build (docs/architecture.md,
// One decode step: "for a sample of them it finds their exact top keys"). Keys are processed in
// chunks: a tiled f32 GEMM writes scale * Q K^T for the chunk into scratch, then one CTA per query
// merges the chunk into that query's running top-k (kept in the outputs between chunks) with a
// threshold test and, only when some score beats the current k-th best, a bitonic sort of 256
// candidates in shared memory.
#include <climits>

#include "common.cuh"

namespace kvrt::gpu::detail {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32;

template <typename T>
__device__ __forceinline__ float LoadElem(const void* p, size_t i, bool as_f32) {
  return as_f32 ? static_cast<const float*>(p)[i] : ToF32(static_cast<const T*>(p)[i]);
}

// grid (ceil(cn / 64), ceil(nq / 64)), block 256; each thread computes a 4x4 tile.
// q: rows at q + i * q_stride (f32 or T), i < nq; k: rows at k + (k0 + j) * k_stride, j < cn;
// scores: f32 [nq, cn].
template <typename T, int D>
__global__ void __launch_bounds__(256)
    ScoresKernel(const void* __restrict__ q, int64_t q_stride, int q_is_f32,
                 const void* __restrict__ k, int64_t k_stride, int64_t nq, int64_t k0, int cn,
                 float scale, float* __restrict__ scores) {
  __shared__ float qs[kBK][kBM + 4];
  __shared__ float ks[kBK][kBN + 4];
  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  const int64_t q_base = static_cast<int64_t>(blockIdx.y) * kBM;
  const int j_base = blockIdx.x * kBN;
  float acc[4][4] = {};
  const int lr = t / 4, lc = (t % 4) * 8;  // loader: row lr, 8 columns from lc
  for (int d0 = 0; d0 < D; d0 += kBK) {
    {
      const int64_t qi = q_base + lr;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        qs[lc + c][lr] = qi < nq ? LoadElem<T>(q, qi * q_stride + d0 + lc + c, q_is_f32) : 0.f;
      }
      const int kj = j_base + lr;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        ks[lc + c][lr] = kj < cn ? LoadElem<T>(k, (k0 + kj) * k_stride + d0 + lc + c, false) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = qs[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = ks[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t qi = q_base + ty + 16 * r;
    if (qi >= nq) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = j_base + tx + 16 * c;
      if (j < cn) scores[qi * cn + j] = acc[r][c] * scale;
    }
  }
}

struct Cand {
  float s;
  int id;
};
__device__ __forceinline__ bool Before(float sa, int ia, float sb, int ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// grid nq, block 128. scores: f32 [nq, cn] for keys k0 + j; ids/out_scores: [nq, topk] running
// state (read unless first).
__global__ void __launch_bounds__(128)
    TopKMergeKernel(const float* __restrict__ scores, int cn, int64_t k0, int topk, int first,
                    int32_t* __restrict__ ids, float* __restrict__ out_scores) {
  __shared__ float s[256];
  __shared__ int id[256];
  const int t = threadIdx.x;
  const int64_t qi = blockIdx.x;
  if (!first && t < topk) {
    s[t] = out_scores[qi * topk + t];
    id[t] = ids[qi * topk + t];
  } else {
    s[t] = -INFINITY;
    id[t] = INT_MAX;
  }
  __syncthreads();
  float thresh = s[topk - 1];
  const float* row = scores + qi * cn;
  for (int base = 0; base < cn; base += 128) {
    const int j = base + t;
    const float v = j < cn ? row[j] : -INFINITY;
    // NOTE: ids grow with j and across chunks, so a later score equal to the threshold always
    // loses the tie (smaller id first): the strict test keeps the order exact.
    const bool keep = j < cn && v > thresh;
    if (!__syncthreads_or(keep)) continue;
    s[128 + t] = keep ? v : -INFINITY;
    id[128 + t] = keep ? static_cast<int>(k0 + j) : INT_MAX;
    __syncthreads();
    for (int size = 2; size <= 256; size <<= 1) {
      for (int stride = size / 2; stride > 0; stride >>= 1) {
        const int i = 2 * t - (t & (stride - 1));
        const int jx = i + stride;
        const bool up = (i & size) == 0;
        const float sa = s[i], sb = s[jx];
        const int ia = id[i], ib = id[jx];
        const bool ab = Before(sa, ia, sb, ib);
        if (up != ab) {
          s[i] = sb;
          id[i] = ib;
          s[jx] = sa;
          id[jx] = ia;
        }
        __syncthreads();
      }
    }
    thresh = s[topk - 1];
    __syncthreads();
  }
  if (t < topk) {
    out_scores[qi * topk + t] = s[t];
    ids[qi * topk + t] = id[t];
  }
}

}  // namespace

Err LaunchExactTopK(const TopKProblem& pr, int32_t* ids, float* scores, void* stream) {
  if (pr.nq == 0) return {};
  const cudaStream_t st = AsStream(stream);
  // NOTE: ~256 MB of scores scratch per chunk at most, and chunks of at least 1024 keys.
  int64_t cn = (int64_t{1} << 26) / pr.nq;
  cn = cn < 1024 ? 1024 : cn;
  if (pr.key_chunk > 0) cn = pr.key_chunk;
  cn = cn > pr.nk ? pr.nk : cn;
  float* buf = nullptr;
  if (Err e = CudaErr(cudaMallocAsync(reinterpret_cast<void**>(&buf),
                                      static_cast<size_t>(pr.nq) * cn * sizeof(float), st));
      !e.ok()) {
    return e;
  }
  Err err{};
  KVRT_DISPATCH_DTYPE(
      pr.dtype, T, {KVRT_DISPATCH_HEAD_DIM(pr.head_dim, D, {
        for (int64_t k0 = 0; k0 < pr.nk && err.ok(); k0 += cn) {
          const int n = static_cast<int>(pr.nk - k0 < cn ? pr.nk - k0 : cn);
          const dim3 grid((n + kBN - 1) / kBN, static_cast<unsigned>((pr.nq + kBM - 1) / kBM));
          ScoresKernel<T, D><<<grid, 256, 0, st>>>(pr.q, pr.q_stride, pr.q_is_f32 ? 1 : 0, pr.k,
                                                   pr.k_stride, pr.nq, k0, n, pr.scale, buf);
          TopKMergeKernel<<<static_cast<unsigned>(pr.nq), 128, 0, st>>>(
              buf, n, k0, pr.topk, k0 == 0 ? 1 : 0, ids, scores);
          err = LastLaunchErr();
        }
      })})
  const Err fe = CudaErr(cudaFreeAsync(buf, st));
  return err.ok() ? fe : err;
}

}  // namespace kvrt::gpu::detail
