// K-means build of the cluster kind on the GPU (cluster_build.h).
//
// MapToMetricKernel: x = k L per kv head, a GEMM [rows, d] x [d, d] on tensor cores in 3xTF32
// (each f32 operand split into a tf32 high part and a tf32 remainder; hi*hi + hi*lo + lo*hi,
// f32 accumulation), which keeps f32 accuracy (about 2^-21 of sum |k_i L_ij|) at tensor-core
// speed. A CTA (256 threads) computes 8192 / d rows x all d columns, so that it also has whole
// rows for xn2: 8 warps of 32 x 32 outputs (2 x 2 WMMA 16x16x8 fragments). Keys (strided
// [rows, kv_heads, d], any dtype) and L are staged in shared memory as f32 in k-chunks of 32; the
// result goes through shared memory again to write x coalesced and reduce |x|^2 per row.
//
// AssignKernel: scores x . c - |c|^2 / 2 in bf16 on tensor cores (mma.sync m16n8k16, f32
// accumulators that start at -|c|^2 / 2, computed in f32 by PrepCentroidsKernel). A CTA is 4 warps
// and 4 * WM rows of one segment (WM = 32 for d <= 128, 16 for d = 256); each warp keeps the A
// fragments of its WM rows (all of d, converted from the f32 x on load) in registers for the
// whole kernel and streams the segment's bf16 centroids through shared memory in tiles of BN
// (64, or 32 for d = 256) with a cp.async double buffer. The accumulator layout of mma.sync is
// known, so the running argmax (ties: the lowest j, columns are visited in ascending order) stays
// in registers; the 4 lanes that share a row reduce it once at the end.
//
// UpdateKernel / SummarizeKernel: deterministic member sums without float atomics. A CTA (8
// warps) handles one (kv head, segment) and 8 * KW consecutive clusters; the segment's assign is
// staged in shared memory in chunks of kStageRows; each warp scans it 128 rows per step (an int4
// per lane), ballots the lanes that hold one of its KW clusters and visits those rows in
// ascending order, adding each row (lane l holds d/32 consecutive dims) to that cluster's f32
// registers. Every cluster's members are therefore summed in row order, as the host reference
// does.
//
// Budget of one 128K-token layer on an H200 (kv 8, d 128, 16 x 8192 rows, C 512, 6 iterations;
// estimates from the arithmetic, to be checked against the Timing128K test's print):
//   AssignKernel: 137 GFLOP of bf16 per call; 166 registers, 3 CTAs (12 warps) per SM, 35 KB of
//     shared memory each. A warp-tile is 128 mma.sync + 136 shared loads + ~300 ALU (the argmax),
//     so the tensor pipe is the limit: ~0.25 ms at the legacy-mma peak, ~0.3-0.45 ms expected;
//     reading x (537 MB of f32) is >= 0.11 ms of HBM under it. x 7 calls: ~2.1-3.2 ms.
//   MapToMetricKernel: 3 x 34 GFLOP of tf32 plus 0.8 GB of HBM traffic (bf16 keys in, f32 x
//     out): ~0.35-0.6 ms.
//   UpdateKernel: bound by reading x once (537 MB): ~0.12-0.15 ms; x 6: ~0.8 ms.
//   SummarizeKernel: keys + values + x (1.07 GB): ~0.25 ms. Seed and the centroid prep: ~0.01 ms.
//   Total: ~3.5-5 ms.
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "cluster_build_launch.h"
#include "common.cuh"
#include "mma.cuh"

namespace kvrt::gpu::detail {
namespace {

namespace wmma = nvcuda::wmma;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Two 16-bit elements packed in a word (the lower address in the low half) as f32, by bit
// operations (no address of a register is taken, which can push values to local memory).
template <typename T>
__device__ __forceinline__ float2 Word2F32(uint32_t w);
template <>
__device__ __forceinline__ float2 Word2F32<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 Word2F32<__half>(uint32_t w) {
  return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))),
                     __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
}

// E consecutive elements of T at p (E * sizeof(T) = 4, 8, 16 or a multiple of 16 bytes, aligned
// to that, up to 16) as f32.
template <typename T, int E>
__device__ __forceinline__ void LoadRow(const T* __restrict__ p, float (&out)[E]) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (E % 4 == 0) {
#pragma unroll
      for (int l = 0; l < E / 4; ++l) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(p) + l);
        out[4 * l] = v.x;
        out[4 * l + 1] = v.y;
        out[4 * l + 2] = v.z;
        out[4 * l + 3] = v.w;
      }
    } else {
      static_assert(E == 2, "2 or a multiple of 4 floats");
      const float2 v = __ldg(reinterpret_cast<const float2*>(p));
      out[0] = v.x;
      out[1] = v.y;
    }
  } else {
    static_assert(sizeof(T) == 2, "16-bit storage types");
    if constexpr (E % 8 == 0) {
#pragma unroll
      for (int l = 0; l < E / 8; ++l) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + l);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = Word2F32<T>(w[i]);
          out[8 * l + 2 * i] = f.x;
          out[8 * l + 2 * i + 1] = f.y;
        }
      }
    } else if constexpr (E == 4) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      const float2 a = Word2F32<T>(v.x), b = Word2F32<T>(v.y);
      out[0] = a.x;
      out[1] = a.y;
      out[2] = b.x;
      out[3] = b.y;
    } else {
      static_assert(E == 2, "2, 4 or a multiple of 8 16-bit elements");
      const float2 a = Word2F32<T>(__ldg(reinterpret_cast<const unsigned*>(p)));
      out[0] = a.x;
      out[1] = a.y;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// MapToMetric

constexpr int kMapThreads = 256;
constexpr int kMapKc = 32;  // input dims per shared-memory stage

template <int D>
struct MapCfg {
  static constexpr int kRows = 8192 / D;   // 128, 64, 32 rows per CTA
  static constexpr int kLdA = kMapKc + 4;  // f32 per staged key row (padded)
  static constexpr int kLdB = D + 4;       // f32 per staged row of L
  static constexpr int kLdO = D + 4;       // f32 per output row
  static constexpr int kAFloats = kRows * kLdA;
  static constexpr int kStage = kAFloats + kMapKc * kLdB;
  static constexpr int kOut = kRows * kLdO;
  static constexpr int kSmem = kStage > kOut ? kStage : kOut;
  static constexpr int kWarpCols = D / 32;  // warps along the columns, 32 columns each
  static_assert((kRows / 32) * kWarpCols == kMapThreads / 32, "8 warps of 32 x 32 outputs");
  static_assert(kSmem * 4 <= 48 * 1024, "static shared memory");
};

using TfA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TfB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TfC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// hi holds f32 values on entry; leaves tf32(v) in hi and tf32(v - tf32(v)) in lo.
template <typename Frag>
__device__ __forceinline__ void SplitTf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float v = hi.x[t];
    const float h = wmma::__float_to_tf32(v);
    lo.x[t] = wmma::__float_to_tf32(v - h);
    hi.x[t] = h;
  }
}

// keys: [rows, kv_heads, D] of T; metric_l: f32 [kv_heads, D, D]; x: f32 [kv_heads, rows, D];
// xn2: f32 [kv_heads, rows]. Grid: kv_heads * row_tiles CTAs.
template <typename T, int D>
__global__ void __launch_bounds__(kMapThreads, 2)
    MapToMetricKernel(int kv_heads, int64_t rows, int row_tiles, const T* __restrict__ keys,
                      const float* __restrict__ metric_l, float* __restrict__ x,
                      float* __restrict__ xn2) {
  using P = MapCfg<D>;
  constexpr int kV = 16 / static_cast<int>(sizeof(T));  // key elements per 16-byte load
  constexpr int kVecA = P::kRows * kMapKc / kV;
  constexpr int kVecB = kMapKc * D / 4;
  __shared__ __align__(128) float sm[P::kSmem];
  float* as = sm;
  float* bs = sm + P::kAFloats;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = static_cast<int>(blockIdx.x) / row_tiles;
  const int64_t row0 = static_cast<int64_t>(static_cast<int>(blockIdx.x) % row_tiles) * P::kRows;
  const float* lg = metric_l + static_cast<size_t>(g) * D * D;
  const int wr = warp / P::kWarpCols, wc = warp % P::kWarpCols;

  // NOTE: the hi*hi products and the two correction products (2^-11 smaller) go to separate
  // accumulators: the tensor cores' f32 accumulation may truncate, and the main sum then takes
  // d / 8 additions instead of 3 d / 8, each of them a loss of at most an ulp of the partial.
  TfC acc[2][2], cor[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc[i][j], 0.f);
      wmma::fill_fragment(cor[i][j], 0.f);
    }
  }

  for (int k0 = 0; k0 < D; k0 += kMapKc) {
    for (int v = tid; v < kVecA; v += kMapThreads) {
      const int r = v / (kMapKc / kV), c = (v % (kMapKc / kV)) * kV;
      float* dst = as + r * P::kLdA + c;
      if (row0 + r < rows) {
        float e[kV];
        LoadRow<T, kV>(keys + ((row0 + r) * kv_heads + g) * D + k0 + c, e);
#pragma unroll
        for (int i = 0; i < kV; ++i) dst[i] = e[i];
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) dst[i] = 0.f;
      }
    }
    for (int v = tid; v < kVecB; v += kMapThreads) {
      const int r = v / (D / 4), c = (v % (D / 4)) * 4;
      *reinterpret_cast<float4*>(bs + r * P::kLdB + c) =
          __ldg(reinterpret_cast<const float4*>(lg + static_cast<size_t>(k0 + r) * D + c));
    }
    __syncthreads();
#pragma unroll 1
    for (int kk = 0; kk < kMapKc; kk += 8) {
      TfB bh[2], bl[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(bh[j], bs + kk * P::kLdB + wc * 32 + j * 16, P::kLdB);
        SplitTf32(bh[j], bl[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        TfA ah, al;
        wmma::load_matrix_sync(ah, as + (wr * 32 + i * 16) * P::kLdA + kk, P::kLdA);
        SplitTf32(ah, al);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(cor[i][j], al, bh[j], cor[i][j]);
          wmma::mma_sync(cor[i][j], ah, bl[j], cor[i][j]);
          wmma::mma_sync(acc[i][j], ah, bh[j], acc[i][j]);
        }
      }
    }
    __syncthreads();  // the stage is read by every warp before it is overwritten
  }
  // Accumulators -> shared memory (the stage area) -> x rows, coalesced, and |x|^2 per row.
  // (Accumulator fragments of one shape share one element layout: cor adds element-wise.)
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] += cor[i][j].x[t];
      wmma::store_matrix_sync(sm + (wr * 32 + i * 16) * P::kLdO + wc * 32 + j * 16, acc[i][j],
                              P::kLdO, wmma::mem_row_major);
    }
  __syncthreads();
  for (int r = warp; r < P::kRows; r += kMapThreads / 32) {
    const int64_t row = row0 + r;
    if (row >= rows) break;
    float* xo = x + (static_cast<size_t>(g) * rows + row) * D;
    float a = 0.f;
#pragma unroll
    for (int c = lane; c < D; c += 32) {
      const float v = sm[r * P::kLdO + c];
      xo[c] = v;
      a += v * v;
    }
    a = WarpSum(a);
    if (lane == 0) xn2[static_cast<size_t>(g) * rows + row] = a;
  }
}

// ---------------------------------------------------------------------------------------------
// SeedCentroids: one warp per centroid row (g, s, j) of n = kv_heads * segments * C.

constexpr int kSeedThreads = 256;

__global__ void __launch_bounds__(kSeedThreads)
    SeedKernel(int segs, int seg_rows, int c_n, int d, int64_t rows, int64_t n,
               const float* __restrict__ x, const int32_t* __restrict__ seed,
               float* __restrict__ centroid) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kSeedThreads / 32) + threadIdx.x / 32;
  if (i >= n) return;
  const int lane = threadIdx.x & 31;
  const int64_t gs = i / c_n;
  const int64_t g = gs / segs, s = gs % segs;
  const int r = __ldg(seed + i);
  float* dst = centroid + i * d;
  if (r < 0 || r >= seg_rows) {  // a caller bug: make it visible downstream instead of reading
    for (int c = lane; c < d; c += 32) dst[c] = __int_as_float(0x7fc00000);  // NaN
    return;
  }
  const float* src = x + (g * rows + s * seg_rows + r) * d;
  for (int c = lane * 4; c < d; c += 128) {
    *reinterpret_cast<float4*>(dst + c) = __ldg(reinterpret_cast<const float4*>(src + c));
  }
}

// ---------------------------------------------------------------------------------------------
// AssignClusters

// cb: bf16 [kv_heads * segments, cp, D] and hc: f32 [kv_heads * segments, cp] = |c|^2 / 2 from
// centroid f32 [kv_heads * segments, C, D]; rows j >= C are padding (zeros, +inf). One warp per
// padded row, n = kv_heads * segments * cp.
template <int D>
__global__ void __launch_bounds__(256)
    PrepCentroidsKernel(int c_n, int cp, int64_t n, const float* __restrict__ centroid,
                        __nv_bfloat16* __restrict__ cb, float* __restrict__ hc) {
  constexpr int E = D / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (i >= n) return;
  const int lane = threadIdx.x & 31;
  const int64_t gs = i / cp;
  const int j = static_cast<int>(i % cp);
  __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(cb + i * D + lane * E);
  if (j >= c_n) {
#pragma unroll
    for (int e = 0; e < E / 2; ++e) dst[e] = __floats2bfloat162_rn(0.f, 0.f);
    if (lane == 0) hc[i] = INFINITY;
    return;
  }
  float v[E];
  LoadRow<float, E>(centroid + (gs * c_n + j) * D + lane * E, v);
  float a = 0.f;
#pragma unroll
  for (int e = 0; e < E; e += 2) {
    a += v[e] * v[e] + v[e + 1] * v[e + 1];
    dst[e / 2] = __floats2bfloat162_rn(v[e], v[e + 1]);
  }
  a = WarpSum(a);
  if (lane == 0) hc[i] = 0.5f * a;
}

constexpr int kAsgWarps = 4;
constexpr int kAsgThreads = 32 * kAsgWarps;

template <int D>
struct AsgCfg {
  static constexpr int kWm = D <= 128 ? 32 : 16;  // rows per warp (A fragments in registers)
  static constexpr int kBn = D <= 128 ? 64 : 32;  // centroids per shared-memory tile
  static constexpr int kMi = kWm / 16;            // m16 row blocks per warp
  static constexpr int kNi = kBn / 8;             // n8 centroid blocks per tile
  static constexpr int kKs = D / 16;              // k16 steps
  static constexpr int kBm = kAsgWarps * kWm;     // rows per CTA
  static constexpr int kLdB = D + 8;  // bf16 per smem row: conflict-free 32-bit fragment loads
  static constexpr int kChunks = kBn * D / 8;  // 16-byte copies per tile
  static_assert(kAssignPad % kBn == 0, "padded segments hold whole tiles");
  static_assert(64 % kWm == 0, "S % 64 == 0: a warp's rows are all in the segment or none");
  static_assert((2 * kBn * kLdB * 2 + 2 * kBn * 4) <= 48 * 1024, "static shared memory");
};

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Better(float v, int j, float& best, int& bj) {
  if (v > best) {  // strict: among equal scores the first (lowest) j visited stays
    best = v;
    bj = j;
  }
}

// x: f32 [kv_heads, rows, D]; xn2: f32 [kv_heads, rows]; cb, hc: PrepCentroidsKernel's;
// assign: int32 [kv_heads, rows]; dist: f32 [kv_heads, rows].
// Grid: kv_heads * segs * row_tiles CTAs (row tile fastest, so that the CTAs of one segment run
// together and its centroids stay in L2).
template <int D>
__global__ void __launch_bounds__(kAsgThreads, 3)
    AssignKernel(int segs, int seg_rows, int cp, int64_t rows, int row_tiles,
                 const float* __restrict__ x, const float* __restrict__ xn2,
                 const __nv_bfloat16* __restrict__ cb, const float* __restrict__ hc,
                 int32_t* __restrict__ assign, float* __restrict__ dist) {
  using P = AsgCfg<D>;
  __shared__ __align__(16) __nv_bfloat16 bs[2][P::kBn * P::kLdB];
  __shared__ __align__(16) float hs[2][P::kBn];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = lane >> 2, tig = lane & 3;
  const int tile = static_cast<int>(blockIdx.x) % row_tiles;
  const int gs = static_cast<int>(blockIdx.x) / row_tiles;  // g * segs + s
  const int g = gs / segs, s = gs % segs;
  const __nv_bfloat16* cseg = cb + static_cast<size_t>(gs) * cp * D;
  const float* hseg = hc + static_cast<size_t>(gs) * cp;
  const int local0 = tile * P::kBm + warp * P::kWm;  // first segment-local row of this warp
  const bool active = local0 < seg_rows;             // warp-uniform
  const int64_t row0 = static_cast<int64_t>(g) * rows + static_cast<int64_t>(s) * seg_rows + local0;
  const int ctiles = cp / P::kBn;

  auto load_tile = [&](int t) {
    const int buf = t & 1;
    const __nv_bfloat16* src = cseg + static_cast<size_t>(t) * P::kBn * D;
    for (int c = tid; c < P::kChunks; c += kAsgThreads) {
      const int r = c / (D / 8), k = (c % (D / 8)) * 8;
      CpAsync16(&bs[buf][r * P::kLdB + k], src + static_cast<size_t>(r) * D + k);
    }
    if (tid < P::kBn / 4) {
      CpAsync16(&hs[buf][tid * 4], hseg + static_cast<size_t>(t) * P::kBn + tid * 4);
    }
  };
  load_tile(0);
  CpAsyncCommit();

  // The warp's rows as bf16 A fragments, for all of D.
  uint32_t a[P::kMi][P::kKs][4];
#pragma unroll
  for (int mi = 0; mi < P::kMi; ++mi) {
#pragma unroll
    for (int ks = 0; ks < P::kKs; ++ks) {
      if (active) {
        const float* p0 = x + static_cast<size_t>(row0 + mi * 16 + grp) * D + ks * 16 + 2 * tig;
        const float* p1 = p0 + 8 * D;
        a[mi][ks][0] = Pack16<__nv_bfloat16>(__ldg(reinterpret_cast<const float2*>(p0)));
        a[mi][ks][1] = Pack16<__nv_bfloat16>(__ldg(reinterpret_cast<const float2*>(p1)));
        a[mi][ks][2] = Pack16<__nv_bfloat16>(__ldg(reinterpret_cast<const float2*>(p0 + 8)));
        a[mi][ks][3] = Pack16<__nv_bfloat16>(__ldg(reinterpret_cast<const float2*>(p1 + 8)));
      } else {
        a[mi][ks][0] = a[mi][ks][1] = a[mi][ks][2] = a[mi][ks][3] = 0u;
      }
    }
  }

  // Running best per (row block, upper / lower 8 rows) over this lane's columns.
  float best[P::kMi][2];
  int bj[P::kMi][2];
#pragma unroll
  for (int mi = 0; mi < P::kMi; ++mi) {
    best[mi][0] = best[mi][1] = -INFINITY;
    bj[mi][0] = bj[mi][1] = 0;
  }

  for (int t = 0; t < ctiles; ++t) {
    if (t + 1 < ctiles) load_tile(t + 1);
    CpAsyncCommit();   // possibly empty: keeps "all groups but the newest" = tile t
    CpAsyncWait<1>();  // this thread's copies of tile t have landed
    __syncthreads();   // everyone's have
    if (active) {
      const __nv_bfloat16* bt = bs[t & 1];
      const float* ht = hs[t & 1];
      float acc[P::kMi][P::kNi][4];
#pragma unroll
      for (int ni = 0; ni < P::kNi; ++ni) {
        const float2 h = *reinterpret_cast<const float2*>(ht + ni * 8 + 2 * tig);
#pragma unroll
        for (int mi = 0; mi < P::kMi; ++mi) {
          acc[mi][ni][0] = -h.x;
          acc[mi][ni][1] = -h.y;
          acc[mi][ni][2] = -h.x;
          acc[mi][ni][3] = -h.y;
        }
      }
#pragma unroll
      for (int ks = 0; ks < P::kKs; ++ks) {
#pragma unroll
        for (int ni = 0; ni < P::kNi; ++ni) {
          const uint32_t* bp =
              reinterpret_cast<const uint32_t*>(bt + (ni * 8 + grp) * P::kLdB + ks * 16 + 2 * tig);
          const uint32_t b0 = bp[0], b1 = bp[4];  // k + 8: 4 words on
#pragma unroll
          for (int mi = 0; mi < P::kMi; ++mi) MmaBf16(acc[mi][ni], a[mi][ks], b0, b1);
        }
      }
      const int jt = t * P::kBn + 2 * tig;
#pragma unroll
      for (int ni = 0; ni < P::kNi; ++ni) {  // ascending columns for every row slot
        const int j = jt + ni * 8;
#pragma unroll
        for (int mi = 0; mi < P::kMi; ++mi) {
          Better(acc[mi][ni][0], j, best[mi][0], bj[mi][0]);
          Better(acc[mi][ni][1], j + 1, best[mi][0], bj[mi][0]);
          Better(acc[mi][ni][2], j, best[mi][1], bj[mi][1]);
          Better(acc[mi][ni][3], j + 1, best[mi][1], bj[mi][1]);
        }
      }
    }
    __syncthreads();  // tile t's buffer is reused by the copy issued in the next iteration
  }

  if (active) {
#pragma unroll
    for (int mi = 0; mi < P::kMi; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = best[mi][h];
        int j = bj[mi][h];
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {  // the 4 lanes of a quad hold the same row
          const float ov = __shfl_xor_sync(0xffffffffu, v, o);
          const int oj = __shfl_xor_sync(0xffffffffu, j, o);
          if (ov > v || (ov == v && oj < j)) {
            v = ov;
            j = oj;
          }
        }
        if (tig == 0) {
          const int64_t r = row0 + mi * 16 + h * 8 + grp;
          assign[r] = j;
          dist[r] = fmaxf(0.f, __ldg(xn2 + r) - 2.f * v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Member sums (UpdateCentroids, SummarizeClusters)

constexpr int kSumWarps = 8;
constexpr int kSumThreads = 32 * kSumWarps;
constexpr int kStageRows = 4096;  // assign entries staged in shared memory at a time
constexpr int kUpdateKw = 4;      // clusters per warp in UpdateKernel
template <int D>
constexpr int SummaryKw() {  // clusters per warp in SummarizeKernel (3 row sums each)
  return D == 256 ? 2 : 4;
}

__device__ __forceinline__ bool InCluster(int a, int c0, int kw) {
  return static_cast<unsigned>(a) - static_cast<unsigned>(c0) < static_cast<unsigned>(kw);
}

// Calls f(k, r) for every segment-local row r whose assign is c0 + k (0 <= k < KW), in ascending
// r, on all lanes of the warp at once (warp-uniform). Called by every thread of the CTA (it
// synchronises the CTA between shared-memory stages). seg_assign: int32 [seg_rows], 16-byte
// aligned; st: shared int4 [kStageRows / 4].
template <int KW, typename F>
__device__ __forceinline__ void ForEachMember(const int32_t* __restrict__ seg_assign, int seg_rows,
                                              int c0, int4* st, F&& f) {
  const int lane = threadIdx.x & 31;
  for (int r0 = 0; r0 < seg_rows; r0 += kStageRows) {
    const int n = min(kStageRows, seg_rows - r0);  // a multiple of 64
    const int n4 = (n + 127) / 128 * 32;           // int4 slots, whole warp steps of 128 rows
    __syncthreads();                               // every warp is done with the last stage
    for (int i = threadIdx.x; i < n4; i += kSumThreads) {
      st[i] = 4 * i < n ? __ldg(reinterpret_cast<const int4*>(seg_assign + r0) + i)
                        : make_int4(-1, -1, -1, -1);
    }
    __syncthreads();
    for (int b = 0; b < n4; b += 32) {
      const int4 v = st[b + lane];
      const bool hit = InCluster(v.x, c0, KW) || InCluster(v.y, c0, KW) || InCluster(v.z, c0, KW) ||
                       InCluster(v.w, c0, KW);
      unsigned m = __ballot_sync(0xffffffffu, hit);
      while (m != 0u) {  // lanes in ascending order: rows in ascending order
        const int src = __ffs(static_cast<int>(m)) - 1;
        m &= m - 1u;
        const int4 w = st[b + src];  // broadcast
        const int r = r0 + 4 * (b + src);
#pragma unroll 1
        for (int e = 0; e < 4; ++e) {  // one copy of the body
          const int a = e == 0 ? w.x : e == 1 ? w.y : e == 2 ? w.z : w.w;
          if (InCluster(a, c0, KW)) f(a - c0, r + e);
        }
      }
    }
  }
}

// x: f32 [kv_heads, rows, D]; assign: int32 [kv_heads, rows]; centroid: f32 [kv_heads, segs, C,
// D]. Grid: kv_heads * segs * cblocks CTAs, each 8 * kUpdateKw clusters of one segment.
template <int D>
__global__ void __launch_bounds__(kSumThreads, 4)
    UpdateKernel(int segs, int seg_rows, int c_n, int cblocks, int64_t rows,
                 const float* __restrict__ x, const int32_t* __restrict__ assign,
                 float* __restrict__ centroid) {
  constexpr int KW = kUpdateKw, E = D / 32;
  __shared__ int4 st[kStageRows / 4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cblk = static_cast<int>(blockIdx.x) % cblocks;
  const int gs = static_cast<int>(blockIdx.x) / cblocks;
  const int g = gs / segs, s = gs % segs;
  const int c0 = (cblk * kSumWarps + warp) * KW;
  const int64_t seg0 = static_cast<int64_t>(g) * rows + static_cast<int64_t>(s) * seg_rows;
  const float* xs = x + static_cast<size_t>(seg0) * D + lane * E;
  float acc[KW][E];
  int cnt[KW];
#pragma unroll
  for (int k = 0; k < KW; ++k) {
    cnt[k] = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[k][e] = 0.f;
  }
  ForEachMember<KW>(assign + seg0, seg_rows, c0, st, [&](int k, int r) {
    float v[E];
    LoadRow<float, E>(xs + static_cast<size_t>(r) * D, v);
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {  // unrolled select keeps acc in registers
      if (k == kk) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[kk][e] += v[e];
        ++cnt[kk];
      }
    }
  });
#pragma unroll
  for (int k = 0; k < KW; ++k) {
    const int c = c0 + k;
    if (c >= c_n || cnt[k] == 0) continue;  // empty: the centroid stays as it is
    float* dst = centroid + (static_cast<size_t>(gs) * c_n + c) * D + lane * E;
    const float n = static_cast<float>(cnt[k]);
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = acc[k][e] / n;
  }
}

// keys, values: T [rows, kv_heads, D]; x: f32 [kv_heads, rows, D]; xn2: f32 [kv_heads, rows];
// assign: int32 [kv_heads, rows]; trace: f32 [kv_heads]. Grid as UpdateKernel's.
template <typename T, int D>
__global__ void __launch_bounds__(kSumThreads, 2)
    SummarizeKernel(int kv_heads, int segs, int seg_rows, int c_n, int cblocks, int64_t rows,
                    const T* __restrict__ keys, const T* __restrict__ values,
                    const float* __restrict__ x, const float* __restrict__ xn2,
                    const int32_t* __restrict__ assign, const float* __restrict__ trace,
                    ClusterStats out) {
  constexpr int KW = SummaryKw<D>(), E = D / 32;
  __shared__ int4 st[kStageRows / 4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cblk = static_cast<int>(blockIdx.x) % cblocks;
  const int gs = static_cast<int>(blockIdx.x) / cblocks;
  const int g = gs / segs, s = gs % segs;
  const int c0 = (cblk * kSumWarps + warp) * KW;
  const int64_t seg0 = static_cast<int64_t>(s) * seg_rows;  // first row of the segment
  const int64_t hrow0 = static_cast<int64_t>(g) * rows + seg0;
  float ksum[KW][E], vsum[KW][E], xsum[KW][E], qsum[KW];
  int cnt[KW];
#pragma unroll
  for (int k = 0; k < KW; ++k) {
    cnt[k] = 0;
    qsum[k] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) ksum[k][e] = vsum[k][e] = xsum[k][e] = 0.f;
  }
  ForEachMember<KW>(assign + hrow0, seg_rows, c0, st, [&](int k, int r) {
    const size_t kv_off = (static_cast<size_t>(seg0 + r) * kv_heads + g) * D + lane * E;
    float kr[E], vr[E], xr[E];
    LoadRow<T, E>(keys + kv_off, kr);
    LoadRow<T, E>(values + kv_off, vr);
    LoadRow<float, E>(x + static_cast<size_t>(hrow0 + r) * D + lane * E, xr);
    const float q = __ldg(xn2 + hrow0 + r);
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      if (k == kk) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          ksum[kk][e] += kr[e];
          vsum[kk][e] += vr[e];
          xsum[kk][e] += xr[e];
        }
        qsum[kk] += q;
        ++cnt[kk];
      }
    }
  });
  const float tr = __ldg(trace + g);
#pragma unroll
  for (int k = 0; k < KW; ++k) {
    const int c = c0 + k;
    if (c >= c_n) continue;  // warp-uniform
    const size_t idx = static_cast<size_t>(gs) * c_n + c;
    float* km = out.key_mean + idx * D + lane * E;
    float* vm = out.value_mean + idx * D + lane * E;
    float spread = 0.f;
    if (cnt[k] > 0) {
      const float n = static_cast<float>(cnt[k]);
      float mx2 = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        km[e] = ksum[k][e] / n;
        vm[e] = vsum[k][e] / n;
        const float mx = xsum[k][e] / n;
        mx2 += mx * mx;
      }
      mx2 = WarpSum(mx2);
      spread = fmaxf(0.f, qsum[k] / n - mx2) / tr;
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) km[e] = vm[e] = 0.f;
    }
    if (lane == 0) {
      out.count[idx] = cnt[k];
      out.spread[idx] = spread;
    }
  }
}

Err Blocks(int64_t n, unsigned* out) {
  if (n <= 0 || n > INT_MAX) return Err{0, "grid too large"};
  *out = static_cast<unsigned>(n);
  return Err{};
}

template <typename T>
Err MapToMetricT(const KMeansShape& s, const T* keys, const float* metric_l, float* x, float* xn2,
                 cudaStream_t st) {
  const int64_t rows = s.rows();
  KVRT_DISPATCH_HEAD_DIM(s.head_dim, D, {
    constexpr int kRows = MapCfg<D>::kRows;
    const int64_t row_tiles = (rows + kRows - 1) / kRows;
    unsigned blocks = 0;
    if (Err e = Blocks(row_tiles * s.kv_heads, &blocks); !e.ok()) return e;
    MapToMetricKernel<T, D><<<blocks, kMapThreads, 0, st>>>(
        s.kv_heads, rows, static_cast<int>(row_tiles), keys, metric_l, x, xn2);
  })
  return LastLaunchErr();
}

template <typename T>
Err SummarizeT(const KMeansShape& s, const T* keys, const T* values, const float* x,
               const float* xn2, const int32_t* assign, const float* metric_trace,
               const ClusterStats& out, cudaStream_t st) {
  KVRT_DISPATCH_HEAD_DIM(s.head_dim, D, {
    const int per_block = kSumWarps * SummaryKw<D>();
    const int cblocks = (s.clusters + per_block - 1) / per_block;
    unsigned blocks = 0;
    if (Err e = Blocks(static_cast<int64_t>(s.kv_heads) * s.segments * cblocks, &blocks); !e.ok()) {
      return e;
    }
    SummarizeKernel<T, D><<<blocks, kSumThreads, 0, st>>>(
        s.kv_heads, s.segments, s.segment_rows, s.clusters, cblocks, s.rows(), keys, values, x, xn2,
        assign, metric_trace, out);
  })
  return LastLaunchErr();
}

}  // namespace

Err LaunchMapToMetric(const KMeansShape& s, const void* keys, DType dtype, const float* metric_l,
                      float* x, float* xn2, void* stream) {
  KVRT_DISPATCH_DTYPE(dtype, T, {
    return MapToMetricT<T>(s, static_cast<const T*>(keys), metric_l, x, xn2, AsStream(stream));
  })
  return Err{};
}

Err LaunchSeedCentroids(const KMeansShape& s, const float* x, const int32_t* seed, float* centroid,
                        void* stream) {
  const int64_t n = static_cast<int64_t>(s.kv_heads) * s.segments * s.clusters;
  unsigned blocks = 0;
  if (Err e = Blocks((n + kSeedThreads / 32 - 1) / (kSeedThreads / 32), &blocks); !e.ok()) return e;
  SeedKernel<<<blocks, kSeedThreads, 0, AsStream(stream)>>>(
      s.segments, s.segment_rows, s.clusters, s.head_dim, s.rows(), n, x, seed, centroid);
  return LastLaunchErr();
}

Err LaunchAssignClusters(const KMeansShape& s, const float* x, const float* xn2,
                         const float* centroid, int32_t* assign, float* dist, void* stream) {
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256) return BadHeadDim();
  const cudaStream_t st = AsStream(stream);
  const int cp = AssignPaddedClusters(s.clusters);
  const int64_t nseg = static_cast<int64_t>(s.kv_heads) * s.segments;
  const size_t cb_bytes = static_cast<size_t>(nseg) * cp * s.head_dim * sizeof(__nv_bfloat16);
  const size_t hc_bytes = static_cast<size_t>(nseg) * cp * sizeof(float);
  unsigned prep_blocks = 0;
  if (Err e = Blocks((nseg * cp + 7) / 8, &prep_blocks); !e.ok()) return e;
  void* ws = nullptr;
  if (Err e = CudaErr(cudaMallocAsync(&ws, cb_bytes + hc_bytes, st)); !e.ok()) return e;
  auto* cb = static_cast<__nv_bfloat16*>(ws);
  auto* hc = reinterpret_cast<float*>(static_cast<char*>(ws) + cb_bytes);  // 16-byte aligned
  Err err{};
  KVRT_DISPATCH_HEAD_DIM(s.head_dim, D, {
    PrepCentroidsKernel<D>
        <<<prep_blocks, 256, 0, st>>>(s.clusters, cp, nseg * cp, centroid, cb, hc);
    err = LastLaunchErr();
    const int row_tiles = (s.segment_rows + AsgCfg<D>::kBm - 1) / AsgCfg<D>::kBm;
    unsigned blocks = 0;
    if (err.ok()) err = Blocks(nseg * row_tiles, &blocks);
    if (err.ok()) {
      AssignKernel<D><<<blocks, kAsgThreads, 0, st>>>(s.segments, s.segment_rows, cp, s.rows(),
                                                      row_tiles, x, xn2, cb, hc, assign, dist);
      err = LastLaunchErr();
    }
  })
  const Err fe = CudaErr(cudaFreeAsync(ws, st));
  return err.ok() ? fe : err;
}

Err LaunchUpdateCentroids(const KMeansShape& s, const float* x, const int32_t* assign,
                          float* centroid, void* stream) {
  const int per_block = kSumWarps * kUpdateKw;
  const int cblocks = (s.clusters + per_block - 1) / per_block;
  unsigned blocks = 0;
  if (Err e = Blocks(static_cast<int64_t>(s.kv_heads) * s.segments * cblocks, &blocks); !e.ok()) {
    return e;
  }
  KVRT_DISPATCH_HEAD_DIM(s.head_dim, D, {
    UpdateKernel<D><<<blocks, kSumThreads, 0, AsStream(stream)>>>(
        s.segments, s.segment_rows, s.clusters, cblocks, s.rows(), x, assign, centroid);
  })
  return LastLaunchErr();
}

Err LaunchSummarizeClusters(const KMeansShape& s, const void* keys, const void* values, DType dtype,
                            const float* x, const float* xn2, const int32_t* assign,
                            const float* metric_trace, const ClusterStats& out, void* stream) {
  KVRT_DISPATCH_DTYPE(dtype, T, {
    return SummarizeT<T>(s, static_cast<const T*>(keys), static_cast<const T*>(values), x, xn2,
                         assign, metric_trace, out, AsStream(stream));
  })
  return Err{};
}

}  // namespace kvrt::gpu::detail
