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
    for (int h = 0; h < MG; ++h) acc[h] = -__int_as_float(0x7f800000);
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

}  // namespace

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
