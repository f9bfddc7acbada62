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

}  // namespace

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
