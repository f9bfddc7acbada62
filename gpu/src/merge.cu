// Merge of two partial attention states per row (GPU tier with CPU-retrieved tokens), batched over
// sequences and q heads. docs/architecture.md "Numerics": lse = logaddexp(lse_a, lse_b),
// o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.
#include "common.cuh"
#include "kvrt_common/nan_max.h"

namespace kvrt::gpu::detail {
namespace {

// grid ceil(rows / 4), block 128: one warp per row.
// o_a, o_b: f32 [rows, D]; lse_a, lse_b: f32 [rows]; out: OutT [rows, D]; lse_out: f32 [rows] or
// null. out may alias o_a and lse_out lse_a: every lane reads its elements and both lse values
// before any lane writes (the __syncwarp orders lane 0's lse write after the others' reads).
template <typename OutT, int D>
__global__ void __launch_bounds__(128)
    MergeStatesKernel(const float* o_a, const float* lse_a, const float* __restrict__ o_b,
                      const float* __restrict__ lse_b, int rows, OutT* out, float* lse_out) {
  constexpr int kPer = D / 32;
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float a = lse_a[row], b = lse_b[row];
  const size_t base = static_cast<size_t>(row) * D;
  float va[kPer], vb[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    va[i] = o_a[base + lane + 32 * i];
    vb[i] = o_b[base + lane + 32 * i];
  }
  __syncwarp();
  // NOTE: fmaxf drops a NaN operand: with a = -inf (empty) and b = NaN it gave -inf and the row 0.
  const float mx = MaxPropagateNan(a, b);
  float wa, wb, l;
  if (mx == -INFINITY) {  // both empty: empty (flashinfer issue 4051 returned NaN here)
    wa = wb = 0.f;
    l = -INFINITY;
  } else {
    const float ea = __expf(a - mx), eb = __expf(b - mx);  // an empty side gets weight 0
    const float s = ea + eb;
    wa = ea / s;
    wb = eb / s;
    l = mx + __logf(s);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    // NOTE: a weight of exactly 0 must not multiply the other side's o (it may be garbage or Inf
    // for an empty state that a producer left unwritten), hence the selects.
    const float x = (wa != 0.f ? wa * va[i] : 0.f) + (wb != 0.f ? wb * vb[i] : 0.f);
    out[base + lane + 32 * i] = FromF32<OutT>(x);
  }
  if (lse_out != nullptr && lane == 0) lse_out[row] = l;
}

// grid ceil(rows * D / 32 / 4), block 128: one warp per (row, 32 dims of it), lane l taking dim
// chunk * 32 + l of the n states. o: f32 [n, rows, D]; lse: f32 [n, rows]; out: OutT [rows, D];
// lse_out: f32 [rows] or null. Same weights as cpu_index::MergeStates (the host reference):
// w_i = exp(lse_i - m) / sum.
// NOTE: a warp per (row, dim chunk) and a round's 32 states' values loaded before any is used:
// with a warp per row, each lane walking the states in a chain of dependent rounds, the direct
// step's merge of its 32 split states took ~10 us for 32 rows (ncu, two merges per layer-step).
template <typename OutT, int D>
__global__ void __launch_bounds__(128)
    MergeStatesNKernel(const float* __restrict__ o, const float* __restrict__ lse, int n, int rows,
                       OutT* __restrict__ out, float* __restrict__ lse_out) {
  constexpr int kChunks = D / 32;
  const int w = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int row = w / kChunks, dim = (w % kChunks) * 32 + (threadIdx.x & 31);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float m = -INFINITY;
  for (int i = lane; i < n; i += 32)
    m = MaxPropagateNan(m, lse[static_cast<size_t>(i) * rows + row]);  // NaN: NaN out
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    m = MaxPropagateNan(m, __shfl_xor_sync(0xffffffffu, m, off));
  float acc = 0.f, sum = 0.f;
  if (m != -INFINITY) {
    float part = 0.f;
    for (int i0 = 0; i0 < n; i0 += 32) {
      const int i = i0 + lane;
      const float l = i < n ? lse[static_cast<size_t>(i) * rows + row] : -INFINITY;
      const float e = l == -INFINITY ? 0.f : __expf(l - m);
      part += e;
      // An empty state's o is not read (it may be unwritten).
      const unsigned live = __ballot_sync(0xffffffffu, l != -INFINITY);
      float v[32];
#pragma unroll
      for (int k = 0; k < 32; ++k)
        v[k] =
            ((live >> k) & 1u) != 0 ? o[(static_cast<size_t>(i0 + k) * rows + row) * D + dim] : 0.f;
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        const float wk = __shfl_sync(0xffffffffu, e, k);
        if (((live >> k) & 1u) != 0) acc += wk * v[k];
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    sum = part;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  out[static_cast<size_t>(row) * D + dim] = FromF32<OutT>(acc * inv);
  if (lse_out != nullptr && dim == 0) lse_out[row] = m == -INFINITY ? -INFINITY : m + __logf(sum);
}

}  // namespace

Err LaunchMergeStatesN(const float* o, const float* lse, int n, int rows, int head_dim, void* out,
                       DType out_dtype, float* lse_out, void* stream) {
  if (rows == 0) return {};
  const cudaStream_t st = AsStream(stream);
  const int blocks = (rows * (head_dim / 32) + 3) / 4;
  KVRT_DISPATCH_DTYPE(out_dtype, T, {KVRT_DISPATCH_HEAD_DIM(head_dim, D, {
                        MergeStatesNKernel<T, D><<<blocks, 128, 0, st>>>(
                            o, lse, n, rows, static_cast<T*>(out), lse_out);
                      })})
  return LastLaunchErr();
}

Err PreloadMergeStatesN(int head_dim) {
  KVRT_DISPATCH_HEAD_DIM(head_dim, D, { return LoadKernel(MergeStatesNKernel<float, D>); })
  return {};
}

Err LaunchMergeStates(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                      int rows, int head_dim, void* out, DType out_dtype, float* lse_out,
                      void* stream) {
  if (rows == 0) return {};
  const cudaStream_t st = AsStream(stream);
  const int blocks = (rows + 3) / 4;
  KVRT_DISPATCH_DTYPE(out_dtype, T, {KVRT_DISPATCH_HEAD_DIM(head_dim, D, {
                        MergeStatesKernel<T, D><<<blocks, 128, 0, st>>>(
                            o_a, lse_a, o_b, lse_b, rows, static_cast<T*>(out), lse_out);
                      })})
  return LastLaunchErr();
}

}  // namespace kvrt::gpu::detail
