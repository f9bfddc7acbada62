// The code scan (code_scan.h): one thread per row, 256 rows per CTA, one kv head per grid row.
// The group's queries sit in shared memory (the heads past the group zero, so that every thread
// runs the same MG sums); a thread decodes its row channel by channel (centroid + offset + step x
// code: the centroid rows of a cluster's neighbouring rows and the segment's grid come from L1)
// and folds each channel into the MG dot products. Scores are written per q head, rows
// consecutive across the CTA's threads (coalesced). NOTE: a first, CUDA-core version; tensor
// cores (the codes of a tile decoded to bf16 in shared memory) are the next step once measured.
#include <cstdint>

#include "code_scan_launch.h"
#include "common.cuh"

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

// CodeClusterMass: one warp per cluster at a time (kMassPerWarp consecutive clusters, so the
// segment and its folded grid rarely change), q heads in chunks of kMassHeads. The warp folds
// scale x q x step of its cluster's segment into shared memory ([d][kMassHeads], read as one float4
// per channel: a broadcast), takes the cluster's base scale x q . (centroid + offset) as one warp
// sum, then two lanes score each row (rows r, r + 16, ... for lanes r and r + 16, each half of the
// row's codes as 32-bit words; one shuffle adds the halves) into an online log-sum-exp, merged over
// the warp at the end. No row's score is written. NOTE: on the H100 the first form (one lane per
// row, lanes 16-31 idle for clusters of 16) took 168 us at the 8B shape's 128K.
constexpr int kMassWarps = 8;
constexpr int kMassPerWarp = 4;
constexpr int kMassHeads = 4;
constexpr int kMassMaxDim = 256;

template <int BITS>
__global__ void __launch_bounds__(kMassWarps * 32)
    CodeClusterMassKernel(CodeScanView v, const float* __restrict__ q, int g,
                          const int64_t* __restrict__ begin, const int32_t* __restrict__ size,
                          float scale, float* __restrict__ lse) {
  __shared__ float4 fold[kMassWarps][kMassMaxDim];
  constexpr int kPerWord = 32 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1;
  const int kv = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = v.head_dim, words = d * BITS / 32;
  const int c0 = (blockIdx.x * kMassWarps + warp) * kMassPerWarp;
  const int64_t segments = (v.rows + v.segment_rows - 1) / v.segment_rows;
  const float kNegInf = -INFINITY;
  float4* f = fold[warp];
  for (int h0 = 0; h0 < g; h0 += kMassHeads) {
    const float* qh[kMassHeads];
#pragma unroll
    for (int i = 0; i < kMassHeads; ++i)  // heads past the group read head h0 (never written)
      qh[i] = q + (static_cast<int64_t>(kv) * g + (h0 + i < g ? h0 + i : h0)) * d;
    int64_t folded = -1;
    for (int c = c0; c < c0 + kMassPerWarp && c < v.num_clusters; ++c) {
      const int64_t at = static_cast<int64_t>(kv) * v.num_clusters + c;
      const int64_t b = begin[at];
      const int n = size[at];
      if (n <= 0) {
        if (lane < kMassHeads && h0 + lane < g)
          lse[(static_cast<int64_t>(kv) * g + h0 + lane) * v.num_clusters + c] = kNegInf;
        continue;
      }
      const int64_t seg = b / v.segment_rows;
      const int64_t grid = (static_cast<int64_t>(kv) * segments + seg) * d;
      if (seg != folded) {
        __syncwarp();
        for (int t = lane; t < d; t += 32) {
          const float st = scale * v.step[grid + t];
          f[t] = make_float4(qh[0][t] * st, qh[1][t] * st, qh[2][t] * st, qh[3][t] * st);
        }
        __syncwarp();
        folded = seg;
      }
      // base_i = scale x q_i . (centroid + offset), every lane holding the sums.
      const auto* cen = reinterpret_cast<const __nv_bfloat16*>(v.centroid) + at * d;
      float base[kMassHeads] = {};
      for (int t = lane; t < d; t += 32) {
        const float k = __bfloat162float(cen[t]) + v.offset[grid + t];
#pragma unroll
        for (int i = 0; i < kMassHeads; ++i) base[i] = fmaf(qh[i][t], k, base[i]);
      }
#pragma unroll
      for (int i = 0; i < kMassHeads; ++i) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) base[i] += __shfl_xor_sync(0xffffffffu, base[i], o);
        base[i] *= scale;
      }
      float m[kMassHeads], l[kMassHeads];
#pragma unroll
      for (int i = 0; i < kMassHeads; ++i) {
        m[i] = kNegInf;
        l[i] = 0.f;
      }
      // Two lanes per row (lane and lane ^ 16, each half of the row's words): a cluster of 16
      // rows fills the warp, and each lane's chain of dependent FMAs is half a row long.
      const int half = lane >> 4;
      const int w_begin = half == 0 ? 0 : (words + 1) / 2;
      const int w_end = half == 0 ? (words + 1) / 2 : words;
      for (int r0 = 0; r0 < n; r0 += 16) {  // uniform: the shuffle below needs every lane
        const int r = r0 + (lane & 15);
        const bool valid = r < n;
        const auto* code = reinterpret_cast<const uint32_t*>(v.code) +
                           (static_cast<int64_t>(kv) * v.rows + b + (valid ? r : 0)) * words;
        float acc[kMassHeads] = {};
        for (int w = w_begin; w < w_end; ++w) {
          const uint32_t word = valid ? __ldg(code + w) : 0u;
#pragma unroll
          for (int j = 0; j < kPerWord; ++j) {
            const float x = static_cast<float>((word >> (j * BITS)) & kMask);
            const float4 a = f[w * kPerWord + j];
            acc[0] = fmaf(a.x, x, acc[0]);
            acc[1] = fmaf(a.y, x, acc[1]);
            acc[2] = fmaf(a.z, x, acc[2]);
            acc[3] = fmaf(a.w, x, acc[3]);
          }
        }
#pragma unroll
        for (int i = 0; i < kMassHeads; ++i) {
          const float sc = base[i] + acc[i] + __shfl_xor_sync(0xffffffffu, acc[i], 16);
          if (!valid || half != 0) continue;  // the row's state is kept by its first lane
          if (sc > m[i]) {
            l[i] = (m[i] == kNegInf ? 0.f : l[i] * __expf(m[i] - sc)) + 1.f;
            m[i] = sc;
          } else {
            l[i] += __expf(sc - m[i]);
          }
        }
      }
      // The cluster's log-sum-exp per head: the lanes' max, then their sums rescaled to it.
#pragma unroll
      for (int i = 0; i < kMassHeads; ++i) {
        float mm = m[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
        float ll = m[i] == kNegInf ? 0.f : l[i] * __expf(m[i] - mm);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ll += __shfl_xor_sync(0xffffffffu, ll, o);
        m[i] = mm;
        l[i] = ll;
      }
      if (lane < kMassHeads && h0 + lane < g) {
        float mi = m[0], li = l[0];  // lane i writes head h0 + i (registers indexed statically)
#pragma unroll
        for (int i = 1; i < kMassHeads; ++i)
          if (lane == i) {
            mi = m[i];
            li = l[i];
          }
        lse[(static_cast<int64_t>(kv) * g + h0 + lane) * v.num_clusters + c] = mi + __logf(li);
      }
    }
  }
}

}  // namespace

Err LaunchCodeClusterMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                          const int32_t* size, float scale, float* lse, void* stream) {
  if (v.kv_heads > 65535) return Err{0, "too many kv heads for one grid"};
  constexpr int kPerCta = kMassWarps * kMassPerWarp;
  const dim3 grid(static_cast<unsigned>((v.num_clusters + kPerCta - 1) / kPerCta),
                  static_cast<unsigned>(v.kv_heads));
  const int g = q_heads / v.kv_heads;
  const cudaStream_t st = AsStream(stream);
  switch (v.bits) {
    case 1:
      CodeClusterMassKernel<1><<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
      break;
    case 2:
      CodeClusterMassKernel<2><<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
      break;
    case 4:
      CodeClusterMassKernel<4><<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
      break;
    default:
      CodeClusterMassKernel<8><<<grid, kMassWarps * 32, 0, st>>>(v, q, g, begin, size, scale, lse);
      break;
  }
  return LastLaunchErr();
}

Err PreloadCodeClusterMass() {
  Err e = LoadKernel(CodeClusterMassKernel<1>);
  if (e.ok()) e = LoadKernel(CodeClusterMassKernel<2>);
  if (e.ok()) e = LoadKernel(CodeClusterMassKernel<4>);
  if (e.ok()) e = LoadKernel(CodeClusterMassKernel<8>);
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
