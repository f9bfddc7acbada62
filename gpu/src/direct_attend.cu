// Kernels of the direct step (direct_attend.h).
//
// DirectAttendKernel: grid (kv heads, splits), 256 threads. Split s of kv head g takes clusters
// [s*C/S, (s+1)*C/S), extra entries [s*E/S, (s+1)*E/S) and tail rows [tb + s*T/S, ...). The CTA
// compacts its selected clusters, valid extra rows and tail share into a list of row segments
// (row, length, q-head bits) by block scans (in rounds of 256 clusters / 256 extra entries), then
// walks the list in tiles of 8 KB of K (and 8 KB of V):
//   - per tile row, one thread finds its segment, looks up the row's page and records the source
//     (pool row or store row) and the q-head bits, two tiles ahead (the page-table load is issued
//     before a tile's math and used after it);
//   - all threads load the tile with 16-byte loads, coalesced along each row, 2 K and 2 V loads
//     per thread issued before any is used; the next tile's loads are issued before the current
//     tile is scored (register double buffering), so a tile's latency (1-2 us over PCIe) overlaps
//     the previous tile's math and the other CTA of the SM (two fit: <= 128 registers);
//   - warps score the staged rows. Tensor-core path (bf16/f16, head_dim <= 128, groups of <= 8
//     q heads: the 8B shapes): the tile's rows in sets of 16, each set taken by 8 / sets warps;
//     such a warp computes S = Q K^T for the set's rows with mma.sync (q heads as the A rows, q as
//     bf16 hi + lo so that it keeps ~16 bits; K rows through ldmatrix from a swizzled tile), the
//     online softmax of each head over the rows whose bit it has, and O += P V for 32 of the
//     dims (P as hi + lo, V through ldmatrix.trans). Scalar path (f32, d = 256, larger groups):
//     a warp owns up to 4 q heads (2 at d = 256; q in registers, pre-scaled to base 2) and a
//     share of the tile's rows, two rows per pass; a row is read from shared memory by the
//     warp's 32 lanes (head_dim / 32 dims each), dots reduced by xor shuffles, and each q head
//     whose bit the row has folds it into its online softmax (m, l, acc), rescaling only when
//     its max grows.
// Every row's K and V cross the bus once per kv head, whatever the group size. At the end the
// warps' states are merged through shared memory into the split's partial state, and MergeStatesN
// (merge.cu) merges the splits.
//
// MarkSelectedKernel: one thread per (q head, selected entry), atomicOr into the cleared mask.
// FillPagesKernel: one warp per update, the block's K and V rows copied with 16-byte loads (with
// staged_pages only the page is assigned). CommitStagedKernel: one warp per staged row.
#include <cstdlib>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "common.cuh"
#include "direct_launch.h"
#include "kvrt_common/nan_max.h"
#include "mma.cuh"

// Only tools/gpu_bench/direct_attend_parts.cu sets it: 1 leaves the arithmetic out, 2 the K/V
// loads, so that the kernel's time can be taken apart.
#ifndef KVRT_DIRECT_PARTS
#define KVRT_DIRECT_PARTS 0
#endif

namespace kvrt::gpu::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSegCap = 2 * kThreads + 1;  // a round's segments: clusters, extra, the tail
constexpr int kTileBytes = 8192;  // K bytes staged per tile (as many of V): 2 loads per thread
constexpr uint64_t kLenMask = (1ull << 40) - 1;  // scan items: (count << 40) | rows

// kWarpHeads: q heads one warp scores (its q and accumulators live in registers); 2 for d = 256
// unless the group needs more than 8 warps x 2, so that two CTAs fit an SM without spills.
template <typename T, int D, int kWarpHeads>
struct DirectLayout {
  static constexpr int kMinBlocks = D * kWarpHeads > 512 ? 1 : 2;  // CTAs per SM, for registers
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  static constexpr int kChunks = kRowBytes / 16;  // 16-byte loads per row
  static constexpr int kTile = kTileBytes / kRowBytes;
  static constexpr int kLoads = kTile * kChunks / kThreads;  // K loads per thread per tile
  static constexpr int kE = D / 32;                          // dims per lane
  // Dims per shared-memory read: 16 bytes at most, so that a quarter warp's reads are
  // conflict-free; a lane's dims are vectors (v * 32 + lane) * kU + u, v < kNV.
  static constexpr int kU = kE * static_cast<int>(sizeof(T)) > 16 ? 16 / static_cast<int>(sizeof(T))
                                                                  : kE;
  static constexpr int kNV = kE / kU;
  static_assert(kLoads * kThreads == kTile * kChunks, "a tile is whole loads");
  static_assert(kTile % kWarps == 0 && kTile <= kThreads, "one metadata thread per tile row");
  // Shared bytes of the tile, reused by the final merge of the warps' states.
  static constexpr int kMergeBytes = kWarps * kWarpHeads * D * 4;
  static constexpr int kStageBytes = 2 * kTileBytes > kMergeBytes ? 2 * kTileBytes : kMergeBytes;
};

// U consecutive elements of T at p (4, 8 or 16 bytes, aligned) as f32.
template <typename T, int U>
__device__ __forceinline__ void SmemRead(const T* p, float* out) {
  constexpr int kBytes = U * static_cast<int>(sizeof(T));
  if constexpr (kBytes == 16) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < U; ++i) out[i] = ToF32(e[i]);
  } else if constexpr (kBytes == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < U; ++i) out[i] = ToF32(e[i]);
  } else {
    static_assert(kBytes == 4, "4, 8 or 16 bytes");
    const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < U; ++i) out[i] = ToF32(e[i]);
  }
}

// The tensor-core path (kMma; 16-bit T, D <= 128, a group of at most 8 q heads): a tile's rows in
// sets of 16 (kRowSets), each taken by kWarps / kRowSets warps that score all of the set's rows
// (the scores are cheap on tensor cores, so they are computed by each warp rather than shared)
// and accumulate 32 of the D output dims each.
template <typename T, int D>
struct DirectMmaLayout {
  static constexpr int kTile = kTileBytes / (D * static_cast<int>(sizeof(T)));
  static constexpr int kRowSets = kTile / 16;
  static constexpr int kDimWarps = kWarps / kRowSets;
  static constexpr int kDims = D / kDimWarps;  // output dims per warp: 4 n-tiles of 8
  static constexpr int kSteps = D / 16;        // k-steps of the scores
  static_assert(kRowSets >= 1 && kWarps % kRowSets == 0 && kDims == 32, "32 dims a warp");
};

// Shared-memory tiles of the tensor-core path: row r's 16-byte chunk c sits at chunk c ^ (r & 7),
// so that ldmatrix's 8 rows of one chunk fall in 8 different bank groups.
template <int kChunks>
__device__ __forceinline__ int SwizzledChunk(int r, int c) {
  return r * kChunks + (c ^ (r & 7));
}

struct DirectArgs {
  DirectRowsView v;
  const uint32_t* mask;
  const float* q;
  float scale_log2;               // scale * log2(e): scores in base 2
  float* part_o;                  // [splits, q_heads, D]
  float* part_lse;                // [splits, q_heads]
  unsigned long long* read_rows;  // [2] or null
};

// One CTA of the direct step's attention: kv head g, split s of n_splits (DirectAttendKernel and
// DirectAttendBatchKernel map their grids onto it). rows_now (RowsNow): the one-member kernel's
// parameter, not a field of DirectArgs: the batch kernel's members (DirectArgs in shared memory)
// spilled 4-12 bytes more per thread with the argument 8 bytes longer.
template <typename T, int D, int kWarpHeads, bool kMma>
__device__ __forceinline__ void DirectAttendCta(const DirectArgs& a, const int64_t* rows_now,
                                                const int g, const int s, const int n_splits) {
  using L = DirectLayout<T, D, kWarpHeads>;
  constexpr int kE = L::kE, kU = L::kU, kTile = L::kTile, kRowBytes = L::kRowBytes;
  const DirectRowsView& v = a.v;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = v.q_heads / v.kv_heads;
  const uint32_t all_bits = group == 32 ? ~0u : (1u << group) - 1u;
  const int rows = static_cast<int>(RowsNow(v.rows, rows_now));

  // Warps = head sets x row sets: a group of more than kWarpHeads q heads is spread over 2, 4 or
  // 8 head sets, each warp scoring its set's hn <= kWarpHeads heads on its share of a tile's rows.
  int hsets = 1;
  while (hsets * kWarpHeads < group) hsets *= 2;
  const int rsets = kWarps / hsets;
  const int hpw = (group + hsets - 1) / hsets;
  const int hset = warp / rsets, rset = warp % rsets;
  const int h0 = hset * hpw;
  const int hn = max(0, min(hpw, group - h0));
  const uint32_t warp_bits = (1u << hn) - 1u;  // of (row bits >> h0)

  __shared__ __align__(16) unsigned char kv_s[L::kStageBytes];  // K tile, V tile; then the merge
  __shared__ int32_t seg_row[kSegCap];
  __shared__ int32_t seg_end[kSegCap];  // inclusive prefix of segment lengths
  __shared__ uint32_t seg_bits[kSegCap];
  __shared__ int32_t meta_src[3][kTile];    // >= 0: pool row; < 0: store row -(x + 1)
  __shared__ uint32_t meta_bits[3][kTile];  // 0: no row
  __shared__ int32_t meta_slot[3][kTile];   // staged_pages: the row's stage slot, or -1
  __shared__ float mrg_m[kWarps][kWarpHeads], mrg_l[kWarps][kWarpHeads];
  __shared__ unsigned long long cnt_s[2];
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;

  if (tid < 2) cnt_s[tid] = 0;  // ordered before use by the round's barriers

  const unsigned char* store_k = static_cast<const unsigned char*>(v.store_k[g]);
  const unsigned char* store_v = static_cast<const unsigned char*>(v.store_v[g]);
  const unsigned char* pool_k = static_cast<const unsigned char*>(v.pool_k);
  const unsigned char* pool_v = static_cast<const unsigned char*>(v.pool_v);
  const int32_t* page_of = v.block_page + static_cast<size_t>(g) * v.blocks_per_head;
  unsigned char* stage_k = static_cast<unsigned char*>(v.stage_k);
  unsigned char* stage_v = static_cast<unsigned char*>(v.stage_v);

  // Scalar path: each warp's q heads in registers (lane: dims (v * 32 + lane) * kU + u), and
  // their online softmax states.
  float qv[kWarpHeads][kE];
  float m[kWarpHeads], l[kWarpHeads], acc[kWarpHeads][kE];
  // Tensor-core path: lane's q head hq = lane / 4 (rows hq + 8 of the A fragments are zero), its
  // A fragments per k-step as hi + lo pairs in shared memory (qa_s[step][lane]: a[0], a[2] of hi,
  // then of lo; the same for every warp), and its state: max, sum, and the accumulators of dims
  // dq * 32 + nt * 8 + 2 * (lane % 4) + {0, 1}.
  using ML = DirectMmaLayout<std::conditional_t<kMma, T, __nv_bfloat16>, (kMma ? D : 128)>;
  const int hq = lane >> 2, tq = lane & 3;
  __shared__ uint4 qa_s[kMma ? ML::kSteps : 1][32];
  float o_acc[4][2];
  float m_q = -INFINITY, l_q = 0.f;
  if constexpr (kMma) {
    const float* qh = a.q + static_cast<size_t>(g * group + hq) * D;
    for (int st = warp; st < ML::kSteps; st += kWarps) {  // ordered before use by the barriers
      uint32_t hi[2], lo[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int dim = st * 16 + half * 8 + 2 * tq;
        const float2 x = hq < group
                             ? make_float2(qh[dim] * a.scale_log2, qh[dim + 1] * a.scale_log2)
                             : make_float2(0.f, 0.f);
        Split16<T>(x, hi[half], lo[half]);
      }
      qa_s[st][lane] = make_uint4(hi[0], hi[1], lo[0], lo[1]);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) o_acc[nt][0] = o_acc[nt][1] = 0.f;
  } else {
#pragma unroll
    for (int hh = 0; hh < kWarpHeads; ++hh) {
      const float* qh = a.q + static_cast<size_t>(g * group + h0 + hh) * D;
#pragma unroll
      for (int nv = 0; nv < L::kNV; ++nv) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          qv[hh][nv * kU + u] = hh < hn ? qh[(nv * 32 + lane) * kU + u] * a.scale_log2 : 0.f;
        }
      }
    }
#pragma unroll
    for (int hh = 0; hh < kWarpHeads; ++hh) {
      m[hh] = -INFINITY;
      l[hh] = 0.f;
#pragma unroll
      for (int i = 0; i < kE; ++i) acc[hh][i] = 0.f;
    }
  }

  const int n_cl = v.num_clusters, n_ex = v.num_extra;
  const int c0 = static_cast<int>(int64_t{n_cl} * s / n_splits);
  const int c1 = static_cast<int>(int64_t{n_cl} * (s + 1) / n_splits);
  const int e0 = static_cast<int>(int64_t{n_ex} * s / n_splits);
  const int e1 = static_cast<int>(int64_t{n_ex} * (s + 1) / n_splits);
  const int64_t tb = min(max(v.tail_begin[g], int64_t{0}), int64_t{rows});
  const int64_t t_len = rows - tb;
  const int t0 = static_cast<int>(tb + t_len * s / n_splits);
  const int t1 = static_cast<int>(tb + t_len * (s + 1) / n_splits);
  const int rounds =
      max(1, max((c1 - c0 + kThreads - 1) / kThreads, (e1 - e0 + kThreads - 1) / kThreads));
  const uint32_t* mask_g = a.mask + static_cast<size_t>(g) * n_cl;
  const int32_t* begin_g = v.cluster_begin + static_cast<size_t>(g) * n_cl;
  const int32_t* size_g = v.cluster_size + static_cast<size_t>(g) * n_cl;
  const int32_t* extra_g = v.extra + static_cast<size_t>(g) * n_ex;

  int cnt_pool = 0, cnt_host = 0;
  uint4 kreg[L::kLoads], vreg[L::kLoads];
  unsigned loaded = 0;  // bit i: kreg[i] / vreg[i] hold a row's chunk

  for (int round = 0; round < rounds; ++round) {
    // Segments of the round: selected clusters, then valid extra rows, then (round 0) the tail.
    unsigned long long item = 0, excl = 0, total = 0;
    int32_t row0 = 0;
    uint32_t bits = 0;
    const int c = c0 + round * kThreads + tid;
    if (c < c1) {
      bits = mask_g[c] & all_bits;
      const int32_t b = begin_g[c], n = size_g[c];
      if (bits != 0 && n > 0 && b >= 0 && b < rows) {
        item = (1ull << 40) | static_cast<unsigned long long>(min(n, rows - b));
        row0 = b;
      }
    }
    Scan(scan_tmp).ExclusiveSum(item, excl, total);
    if (item != 0) {
      const int slot = static_cast<int>(excl >> 40);
      seg_row[slot] = row0;
      seg_end[slot] = static_cast<int32_t>((excl & kLenMask) + (item & kLenMask));
      seg_bits[slot] = bits;
    }
    const int n_cseg = static_cast<int>(total >> 40);
    const int n_crows = static_cast<int>(total & kLenMask);
    __syncthreads();  // scan_tmp is reused
    item = 0;
    const int e = e0 + round * kThreads + tid;
    if (e < e1) {
      const int32_t x = extra_g[e];
      if (x >= 0 && x < rows) {
        item = (1ull << 40) | 1ull;
        row0 = x;
      }
    }
    Scan(scan_tmp).ExclusiveSum(item, excl, total);
    if (item != 0) {
      const int slot = n_cseg + static_cast<int>(excl >> 40);
      seg_row[slot] = row0;
      seg_end[slot] = n_crows + static_cast<int32_t>(excl & kLenMask) + 1;
      seg_bits[slot] = all_bits;
    }
    int n_seg = n_cseg + static_cast<int>(total >> 40);
    int n_rows = n_crows + static_cast<int>(total & kLenMask);
    if (round == 0 && t1 > t0) {
      if (tid == 0) {
        seg_row[n_seg] = t0;
        seg_end[n_seg] = n_rows + (t1 - t0);
        seg_bits[n_seg] = all_bits;
      }
      ++n_seg;
      n_rows += t1 - t0;
    }
    __syncthreads();

    // Tile row `tile * kTile + tid`'s store row and q-head bits (threads tid < kTile), and the
    // load of its page-table entry, whose value is only used by commit(): fetch() runs before a
    // tile's math and commit() after it, so that the entry's latency hides behind the math.
    int m_row = 0, m_page = -1;
    uint32_t m_bits = 0;
    auto fetch = [&](int tile) {
      m_bits = 0;
      const int f = tile * kTile + tid;
      if (tid >= kTile || f >= n_rows) return;
      int lo = 0, hi = n_seg - 1;  // the first segment whose end > f
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (seg_end[mid] > f) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      m_row = seg_row[lo] + (f - (lo > 0 ? seg_end[lo - 1] : 0));
      if (m_row < 0 || m_row >= rows) return;
      m_bits = seg_bits[lo];
      m_page = page_of[m_row / kDirectBlockRows];
    };
    auto commit = [&](int buf) {
      if (tid >= kTile) return;
      int32_t src = 0;
      bool host = false;
      if (m_bits != 0) {
        // Staged pages: the page only where it holds the row.
        const int32_t page = !v.staged_pages                ? m_page
                             : StagedHolds(m_page, m_row) ? StagedPage(m_page)
                                                          : -1;
        if (page >= 0 && page < v.pages) {
          src = page * kDirectBlockRows + m_row % kDirectBlockRows;
          ++cnt_pool;
        } else {
          src = -m_row - 1;
          ++cnt_host;
          host = true;
        }
      }
      meta_src[buf][tid] = src;
      meta_bits[buf][tid] = m_bits;
      if (!v.staged_pages) return;
      // A stage slot per row read from the host: one atomic per warp of metadata threads.
      const unsigned act = __activemask();
      const unsigned want = __ballot_sync(act, host);
      const int leader = __ffs(act) - 1;
      uint32_t base = 0;
      if (lane == leader && want != 0) base = atomicAdd(v.stage_count, __popc(want));
      base = __shfl_sync(act, base, leader);
      int32_t slot = -1;
      if (host) {
        const uint32_t at = base + __popc(want & ((1u << lane) - 1u));
        if (at < v.stage_cap) {
          slot = static_cast<int32_t>(at);
          v.stage_row[at] = (static_cast<int64_t>(g) << 32) | m_row;
        }
      }
      meta_slot[buf][tid] = slot;
    };
    // Issues the tile's K and V loads (every one before any is used).
    auto load = [&](int buf) {
      loaded = 0;
      if constexpr ((KVRT_DIRECT_PARTS & 2) != 0) return;
#pragma unroll
      for (int i = 0; i < L::kLoads; ++i) {
        const int ci = tid + i * kThreads;
        const int r = ci / L::kChunks, ch = ci % L::kChunks;
        if (meta_bits[buf][r] != 0) {
          const int32_t src = meta_src[buf][r];
          const size_t off = static_cast<size_t>(src >= 0 ? src : -src - 1) * kRowBytes + ch * 16;
          const unsigned char* kp = (src >= 0 ? pool_k : store_k) + off;
          const unsigned char* vp = (src >= 0 ? pool_v : store_v) + off;
          kreg[i] = __ldg(reinterpret_cast<const uint4*>(kp));
          vreg[i] = __ldg(reinterpret_cast<const uint4*>(vp));
          loaded |= 1u << i;
        }
      }
    };
    // Stores the tile's loads in shared memory and, with staged_pages, the rows read from the
    // host store in their stage slots (CommitStaged moves them into the pool after the step).
    // The tensor-core path's tiles are swizzled (SwizzledChunk), and rows not loaded are zero: a
    // zero weight times a stale NaN would reach every q head through the mma.
    auto stage = [&](int buf) {
#pragma unroll
      for (int i = 0; i < L::kLoads; ++i) {
        const int ci = tid + i * kThreads;
        const int at = kMma ? SwizzledChunk<L::kChunks>(ci / L::kChunks, ci % L::kChunks) : ci;
        if constexpr (kMma) {
          if (((loaded >> i) & 1u) == 0) {
            *reinterpret_cast<uint4*>(kv_s + static_cast<size_t>(at) * 16) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(kv_s + kTileBytes + static_cast<size_t>(at) * 16) =
                make_uint4(0, 0, 0, 0);
          }
        }
        if ((loaded >> i) & 1u) {
          *reinterpret_cast<uint4*>(kv_s + static_cast<size_t>(at) * 16) = kreg[i];
          *reinterpret_cast<uint4*>(kv_s + kTileBytes + static_cast<size_t>(at) * 16) = vreg[i];
          if (v.staged_pages) {
            const int r = ci / L::kChunks, ch = ci % L::kChunks;
            const int32_t slot = meta_slot[buf][r];
            if (slot >= 0) {
              const size_t off = static_cast<size_t>(slot) * kRowBytes + ch * 16;
              *reinterpret_cast<uint4*>(stage_k + off) = kreg[i];
              *reinterpret_cast<uint4*>(stage_v + off) = vreg[i];
            }
          }
        }
      }
    };
    // Tensor-core path: this warp's set of 16 rows, S = Q K^T (heads as the A rows; two n-tiles
    // of 8 rows), the online softmax of head hq over the rows whose bit it has, then
    // O += P V for the warp's 32 dims (P hi + lo as A, V rows through ldmatrix.trans as B).
    auto compute_mma = [&](int buf, int n_tile) {
      if constexpr (kMma) {
        const int rs = warp % ML::kRowSets, dq = warp / ML::kRowSets;
        const int r0 = rs * 16;
        if (r0 >= n_tile) return;  // warp-uniform
        uint32_t rb[2][2];
        bool any = false;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            rb[nt][j] = meta_bits[buf][r0 + nt * 8 + 2 * tq + j];
            any |= rb[nt][j] != 0;
          }
        }
        if (!__any_sync(0xffffffffu, any)) return;  // no head takes these rows
        const unsigned char* ks = kv_s;
        const unsigned char* vs = kv_s + kTileBytes;
        // Scores in two independent chains per n-tile (q hi, q lo), summed after: one chain of
        // 2 * kSteps dependent mma was the warp's latency.
        float sc[2][2] = {}, sc_lo[2][2] = {};
        // ldmatrix: lanes 8j..8j+7 give rows r0 + (j >> 1) * 8 + (lane & 7) of chunk 2st + (j & 1):
        // r[0], r[1] the B fragment of rows r0..r0+7, r[2], r[3] of rows r0+8..r0+15.
        const int k_row = r0 + ((lane >> 4) & 1) * 8 + (lane & 7), k_half = (lane >> 3) & 1;
#pragma unroll
        for (int st = 0; st < ML::kSteps; ++st) {
          uint32_t b[4];
          LdMatrixX4<false>(b, ks + SwizzledChunk<L::kChunks>(k_row, 2 * st + k_half) * 16);
          const uint4 qa = qa_s[st][lane];  // hi a[0], a[2], lo a[0], a[2]
          MmaTopRows<T>(sc[0], qa.x, qa.y, b[0], b[1]);
          MmaTopRows<T>(sc_lo[0], qa.z, qa.w, b[0], b[1]);
          MmaTopRows<T>(sc[1], qa.x, qa.y, b[2], b[3]);
          MmaTopRows<T>(sc_lo[1], qa.z, qa.w, b[2], b[3]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          sc[nt][0] += sc_lo[nt][0];
          sc[nt][1] += sc_lo[nt][1];
        }
        // sc[nt][j]: head hq, row r0 + nt * 8 + 2 tq + j (j < 2).
        float x[2][2], mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            x[nt][j] = ((rb[nt][j] >> hq) & 1u) != 0 ? sc[nt][j] : -INFINITY;
            mx = MaxPropagateNan(mx, x[nt][j]);
          }
        }
        mx = MaxPropagateNan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = MaxPropagateNan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float nm = MaxPropagateNan(m_q, mx);  // NaN score: NaN state
        float p[2][2] = {};
        if (nm != -INFINITY) {  // else: no row of this head yet, nothing to add
          if (nm != m_q) {
            const float corr = exp2f(m_q - nm);  // m = -inf: 0
            l_q *= corr;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              o_acc[nt][0] *= corr;
              o_acc[nt][1] *= corr;
            }
            m_q = nm;
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              p[nt][j] = exp2f(x[nt][j] - nm);
              l_q += p[nt][j];
            }
          }
        }
        uint32_t phi[2], plo[2];  // a[0], a[2]: rows 2tq..+1 and 8 + 2tq..+1
        Split16<T>(make_float2(p[0][0], p[0][1]), phi[0], plo[0]);
        Split16<T>(make_float2(p[1][0], p[1][1]), phi[1], plo[1]);
        // ldmatrix.trans: lanes 8j..8j+7 give rows r0 + (j & 1) * 8 + (lane & 7) of chunk
        // dq * 4 + 2x + (j >> 1): r[0], r[1] the B fragment of n-tile 2x, r[2], r[3] of 2x + 1.
        const int v_row = r0 + ((lane >> 3) & 1) * 8 + (lane & 7), v_half = (lane >> 4) & 1;
#pragma unroll
        for (int x2 = 0; x2 < 2; ++x2) {
          uint32_t b[4];
          LdMatrixX4<true>(b, vs + SwizzledChunk<L::kChunks>(v_row, dq * 4 + 2 * x2 + v_half) * 16);
          MmaTopRows<T>(o_acc[2 * x2], phi[0], phi[1], b[0], b[1]);
          MmaTopRows<T>(o_acc[2 * x2], plo[0], plo[1], b[0], b[1]);
          MmaTopRows<T>(o_acc[2 * x2 + 1], phi[0], phi[1], b[2], b[3]);
          MmaTopRows<T>(o_acc[2 * x2 + 1], plo[0], plo[1], b[2], b[3]);
        }
      }
    };
    // Scores the staged tile against this warp's q heads.
    auto compute = [&](int buf, int n_tile) {
      const T* ks = reinterpret_cast<const T*>(kv_s);
      const T* vs = reinterpret_cast<const T*>(kv_s + kTileBytes);
      // kR rows per pass (rset, rset + rsets, ...): their shared-memory reads, dots and
      // butterflies are independent, so they overlap; the softmax updates then run in row order.
      // NOTE: every head's butterfly runs, also past hn (their q is zero), so that the chains
      // interleave: one row at a time, each shuffle behind an `hh < hn` branch, the arithmetic
      // was 80% of the kernel's time (tools/gpu_bench/direct_attend_parts.cu, docs/benchmarks.md).
      constexpr int kR = 2;
      if constexpr ((KVRT_DIRECT_PARTS & 1) != 0) return;
      if constexpr (kMma) {
        compute_mma(buf, n_tile);
      } else {
        for (int r0 = rset; r0 < n_tile; r0 += kR * rsets) {
          uint32_t rb[kR], any = 0;
#pragma unroll
          for (int j = 0; j < kR; ++j) {
            const int r = r0 + j * rsets;
            rb[j] = r < n_tile ? (meta_bits[buf][r] >> h0) & warp_bits : 0u;
            any |= rb[j];
          }
          if (any == 0) continue;  // warp-uniform: no head of this warp takes these rows
          float kf[kR][kE], vf[kR][kE], dot[kR][kWarpHeads];
#pragma unroll
          for (int j = 0; j < kR; ++j) {
            const int r =
                rb[j] != 0 ? r0 + j * rsets : r0;  // a row not taken: read one in the tile
#pragma unroll
            for (int nv = 0; nv < L::kNV; ++nv) {
              const int at = r * D + (nv * 32 + lane) * kU;
              SmemRead<T, kU>(ks + at, kf[j] + nv * kU);
              SmemRead<T, kU>(vs + at, vf[j] + nv * kU);
            }
#pragma unroll
            for (int hh = 0; hh < kWarpHeads; ++hh) {
              float x = 0.f;
#pragma unroll
              for (int i = 0; i < kE; ++i) x = fmaf(qv[hh][i], kf[j][i], x);
              dot[j][hh] = x;
            }
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (int j = 0; j < kR; ++j) {
#pragma unroll
              for (int hh = 0; hh < kWarpHeads; ++hh)
                dot[j][hh] += __shfl_xor_sync(0xffffffffu, dot[j][hh], off);
            }
          }
#pragma unroll
          for (int j = 0; j < kR; ++j) {
#pragma unroll
            for (int hh = 0; hh < kWarpHeads; ++hh) {
              if (hh >= hn || ((rb[j] >> hh) & 1u) == 0) continue;
              const float nm = MaxPropagateNan(m[hh], dot[j][hh]);  // NaN score: NaN state
              if (nm == -INFINITY) continue;                        // -inf score, empty state
              if (nm != m[hh]) {  // rare after the first rows: rescale only when the max grows
                const float corr = exp2f(m[hh] - nm);  // m = -inf: 0
                l[hh] *= corr;
#pragma unroll
                for (int i = 0; i < kE; ++i) acc[hh][i] *= corr;
                m[hh] = nm;
              }
              const float p = exp2f(dot[j][hh] - nm);
              l[hh] += p;
#pragma unroll
              for (int i = 0; i < kE; ++i) acc[hh][i] = fmaf(p, vf[j][i], acc[hh][i]);
            }
          }
        }
      }
    };

    // Three meta buffers: tile t's is read by compute(t), t + 1's by load(t + 1), and t + 2's
    // is written after compute(t).
    const int n_tiles = (n_rows + kTile - 1) / kTile;
    for (int t = 0; t < min(n_tiles, 2); ++t) {
      fetch(t);
      commit(t);
    }
    __syncthreads();
    if (n_tiles > 0) load(0);
    for (int t = 0; t < n_tiles; ++t) {
      stage(t % 3);
      __syncthreads();  // the tile is staged; meta (t + 1) % 3 is visible
      if (t + 1 < n_tiles) load((t + 1) % 3);
      if (t + 2 < n_tiles) fetch(t + 2);
      compute(t % 3, min(kTile, n_rows - t * kTile));
      if (t + 2 < n_tiles) commit((t + 2) % 3);
      __syncthreads();  // the tile and meta buffer t % 3 are free again
    }
  }

  // Merge the states of each q head through shared memory: state set w, head slot hh at
  // [w * kSlotHeads + hh] (m, l) and o at mo[(w * kSlotHeads + hh) * D + dim]. Scalar path: a
  // warp's heads are its slots, and head h's sets are the row sets of its head set. Tensor-core
  // path: a row set's 8 heads are its slots (its kDimWarps warps hold the same max and sum, each
  // 32 of the dims; lanes 4hq..4hq+3 share head hq's max, their sums add up).
  constexpr int kSlotHeads = kMma ? 8 : kWarpHeads;
  static_assert(!kMma || ML::kRowSets * 8 <= kWarps * kWarpHeads, "merge slots fit");
  __syncthreads();
  float* mo = reinterpret_cast<float*>(kv_s);
  float* mrg_m_at = &mrg_m[0][0];
  float* mrg_l_at = &mrg_l[0][0];
  if constexpr (kMma) {
    l_q += __shfl_xor_sync(0xffffffffu, l_q, 1);
    l_q += __shfl_xor_sync(0xffffffffu, l_q, 2);
    const int rs = warp % ML::kRowSets, dq = warp / ML::kRowSets;
    if (hq < group) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int dim = dq * 32 + nt * 8 + 2 * tq;
        mo[(rs * kSlotHeads + hq) * D + dim] = o_acc[nt][0];
        mo[(rs * kSlotHeads + hq) * D + dim + 1] = o_acc[nt][1];
      }
      if (dq == 0 && tq == 0) {
        mrg_m_at[rs * kSlotHeads + hq] = m_q;
        mrg_l_at[rs * kSlotHeads + hq] = l_q;
      }
    }
  } else {
#pragma unroll
    for (int hh = 0; hh < kWarpHeads; ++hh) {
#pragma unroll
      for (int nv = 0; nv < L::kNV; ++nv) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          mo[(warp * kSlotHeads + hh) * D + (nv * 32 + lane) * kU + u] = acc[hh][nv * kU + u];
        }
      }
      if (lane == 0) {
        mrg_m_at[warp * kSlotHeads + hh] = m[hh];
        mrg_l_at[warp * kSlotHeads + hh] = l[hh];
      }
    }
  }
  if (a.read_rows != nullptr) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      cnt_pool += __shfl_xor_sync(0xffffffffu, cnt_pool, off);
      cnt_host += __shfl_xor_sync(0xffffffffu, cnt_host, off);
    }
    if (lane == 0 && (cnt_pool | cnt_host) != 0) {
      atomicAdd(&cnt_s[0], static_cast<unsigned long long>(cnt_pool));
      atomicAdd(&cnt_s[1], static_cast<unsigned long long>(cnt_host));
    }
  }
  __syncthreads();
  const int n_sets = kMma ? ML::kRowSets : rsets;
  for (int idx = tid; idx < group * D; idx += kThreads) {
    const int h = idx / D, dim = idx % D;
    const int w0 = kMma ? 0 : (h / hpw) * rsets, hh = kMma ? h : h % hpw;
    float mm = -INFINITY;
    for (int rs = 0; rs < n_sets; ++rs)
      mm = MaxPropagateNan(mm, mrg_m_at[(w0 + rs) * kSlotHeads + hh]);
    float ll = 0.f, oo = 0.f;
    if (mm != -INFINITY) {
      for (int rs = 0; rs < n_sets; ++rs) {
        const int at = (w0 + rs) * kSlotHeads + hh;
        const float cw = exp2f(mrg_m_at[at] - mm);  // an empty set (m = -inf): 0
        ll += mrg_l_at[at] * cw;
        oo += mo[at * D + dim] * cw;
      }
      oo /= ll;
    }
    const size_t qrow = static_cast<size_t>(s) * v.q_heads + g * group + h;
    a.part_o[qrow * D + dim] = oo;
    if (dim == 0) {
      a.part_lse[qrow] = mm == -INFINITY ? -INFINITY : (mm + log2f(ll)) * 0.69314718055994531f;
    }
  }
  if (tid == 0 && a.read_rows != nullptr && (cnt_s[0] | cnt_s[1]) != 0) {
    atomicAdd(&a.read_rows[0], cnt_s[0]);
    atomicAdd(&a.read_rows[1], cnt_s[1]);
  }
}

// grid (kv_heads, splits).
template <typename T, int D, int kWarpHeads, bool kMma>
__global__ void __launch_bounds__(kThreads, (DirectLayout<T, D, kWarpHeads>::kMinBlocks))
    DirectAttendKernel(const __grid_constant__ DirectArgs a, const int64_t* rows_now) {
  DirectAttendCta<T, D, kWarpHeads, kMma>(a, rows_now, blockIdx.x, blockIdx.y, gridDim.y);
}

// A batch's members in one launch: grid (kv_heads, the members' splits in all), member i's
// splits at y in [split_end[i - 1], split_end[i]); each CTA is the one DirectAttendKernel would
// run for it. The members sit in the kernel's parameter (no upload).
struct DirectBatchArgs {
  int n;
  int split_end[kDirectAttendBatchMax];
  DirectArgs m[kDirectAttendBatchMax];
};
static_assert(sizeof(DirectBatchArgs) <= 32764, "a kernel parameter holds at most 32764 bytes");

template <typename T, int D, int kWarpHeads, bool kMma>
__global__ void __launch_bounds__(kThreads, (DirectLayout<T, D, kWarpHeads>::kMinBlocks))
    DirectAttendBatchKernel(const __grid_constant__ DirectBatchArgs b) {
  const int y = blockIdx.y;
  int i = 0;
  while (i + 1 < b.n && y >= b.split_end[i]) ++i;  // block-uniform, at most 31 steps
  const int first = i == 0 ? 0 : b.split_end[i - 1];
  // The member's arguments in shared memory: read from the parameter at a member index known only
  // at run time, each use needed registers (40-52 bytes of spills in the tensor-core instances).
  static_assert(sizeof(DirectArgs) % 8 == 0 && std::is_trivially_copyable_v<DirectArgs>);
  __shared__ __align__(16) unsigned long long args_s[sizeof(DirectArgs) / 8];
  const auto* src = reinterpret_cast<const unsigned long long*>(&b.m[i]);
  for (int w = threadIdx.x; w < static_cast<int>(sizeof(DirectArgs) / 8); w += blockDim.x)
    args_s[w] = src[w];
  __syncthreads();
  DirectAttendCta<T, D, kWarpHeads, kMma>(*reinterpret_cast<const DirectArgs*>(args_s), nullptr,
                                          blockIdx.x, y - first, b.split_end[i] - first);
}

// grid (ceil(C / 256), q_heads), 256 threads: thread j of q head h marks selected[h, j].
__global__ void __launch_bounds__(256)
    MarkSelectedKernel(const int32_t* __restrict__ selected, const int32_t* __restrict__ count,
                       int group, int num_clusters, uint32_t* __restrict__ mask) {
  const int h = blockIdx.y;
  const int j = blockIdx.x * 256 + threadIdx.x;
  if (j >= min(count[h], num_clusters)) return;
  const int32_t c = selected[static_cast<size_t>(h) * num_clusters + j];
  if (c < 0 || c >= num_clusters) return;
  atomicOr(&mask[static_cast<size_t>(h / group) * num_clusters + c], 1u << (h % group));
}

// grid ceil(n / 8), 256 threads: one warp per update; kRowBytes = head_dim * sizeof(dtype).
template <int kRowBytes>
__global__ void __launch_bounds__(256)
    FillPagesKernel(DirectRowsView v, const int32_t* __restrict__ updates, int n) {
  constexpr int kPerLane = kDirectBlockRows * kRowBytes / 16 / 32;  // 16-byte loads of K
  constexpr int kBatch = kPerLane < 8 ? kPerLane : 8;               // in flight (and of V)
  const int i = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= n) return;
  const int32_t idx = updates[2 * i], raw = updates[2 * i + 1];
  if (idx < 0 || idx >= int64_t{v.kv_heads} * v.blocks_per_head || raw < -1) return;
  if (raw < 0) {
    if (lane == 0) v.block_page[idx] = -1;
    return;
  }
  const bool copy = !v.staged_pages || (raw & kFillPagesCopy) != 0;
  const int32_t page = raw & ~kFillPagesCopy;
  const int64_t g = idx / v.blocks_per_head, b = idx % v.blocks_per_head;
  if (page >= v.pages || (b + 1) * kDirectBlockRows > v.rows) return;  // FillPagesHost refuses
  if (!copy) {  // rows arrive through the stage (CommitStaged)
    if (lane == 0) v.block_page[idx] = page;
    return;
  }
  constexpr size_t kPageBytes = size_t{kDirectBlockRows} * kRowBytes;
  const uint4* sk = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(v.store_k[g]) +
                                                   b * kPageBytes);
  const uint4* sv = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(v.store_v[g]) +
                                                   b * kPageBytes);
  uint4* dk = reinterpret_cast<uint4*>(static_cast<unsigned char*>(v.pool_k) + page * kPageBytes);
  uint4* dv = reinterpret_cast<uint4*>(static_cast<unsigned char*>(v.pool_v) + page * kPageBytes);
#pragma unroll
  for (int b0 = 0; b0 < kPerLane; b0 += kBatch) {
    uint4 kr[kBatch], vr[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      kr[j] = __ldg(sk + (b0 + j) * 32 + lane);
      vr[j] = __ldg(sv + (b0 + j) * 32 + lane);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      dk[(b0 + j) * 32 + lane] = kr[j];
      dv[(b0 + j) * 32 + lane] = vr[j];
    }
  }
  if (lane == 0) {
    v.block_page[idx] = v.staged_pages ? StagedWholeBlock(page) : page;
  }
}

// Warps over the stage's slots (grid-stride); kRowBytes = head_dim * sizeof(dtype).
template <int kRowBytes>
__global__ void __launch_bounds__(256) CommitStagedKernel(DirectRowsView v) {
  constexpr int kChunks = kRowBytes / 16;
  const int lane = threadIdx.x & 31;
  const int64_t n = min(static_cast<int64_t>(*v.stage_count), v.stage_cap);
  for (int64_t i = blockIdx.x * 8 + (threadIdx.x >> 5); i < n; i += int64_t{gridDim.x} * 8) {
    const int64_t id = v.stage_row[i];
    const int64_t g = id >> 32, r = id & 0xffffffff;
    if (g < 0 || g >= v.kv_heads || r >= v.rows) continue;  // CommitStagedHost refuses
    int32_t* entry = v.block_page + g * v.blocks_per_head + r / kDirectBlockRows;
    const int32_t page = StagedPage(*entry);
    if (page < 0 || page >= v.pages) continue;  // no page (any more)
    const size_t to =
        (static_cast<size_t>(page) * kDirectBlockRows + r % kDirectBlockRows) * kRowBytes;
    const uint4* sk = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(v.stage_k) +
                                                     static_cast<size_t>(i) * kRowBytes);
    const uint4* sv = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(v.stage_v) +
                                                     static_cast<size_t>(i) * kRowBytes);
    uint4* dk = reinterpret_cast<uint4*>(static_cast<unsigned char*>(v.pool_k) + to);
    uint4* dv = reinterpret_cast<uint4*>(static_cast<unsigned char*>(v.pool_v) + to);
    for (int c = lane; c < kChunks; c += 32) {
      dk[c] = sk[c];
      dv[c] = sv[c];
    }
    __syncwarp();
    if (lane == 0) {
      atomicOr(reinterpret_cast<unsigned*>(entry), StagedRowBit(r));
    }
  }
  if (v.stage_commits == nullptr) return;  // the launch resets stage_count
  // Every CTA has read stage_count once its count is in: the last one resets it for the next
  // step's attention (no memset launch after the kernel).
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(v.stage_commits, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last && threadIdx.x == 0) {
    *v.stage_count = 0;
    *v.stage_commits = 0;
  }
}

// One thread per (kv head, cluster): ClusterRowsNotInPool, as MissPenaltyOffsetsHost counts.
__global__ void __launch_bounds__(256)
    MissPenaltyKernel(DirectRowsView v, float penalty, float* __restrict__ offset) {
  const int64_t at = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (at >= static_cast<int64_t>(v.kv_heads) * v.num_clusters) return;
  const int32_t n = v.cluster_size[at];
  offset[at] =
      n <= 0 ? 0.f
             : penalty * static_cast<float>(ClusterRowsNotInPool(v, at)) / static_cast<float>(n);
}

// Kernel for (T, D) by group size (if constexpr: no d = 256-only variant for other dims).
using DirectKernel = void (*)(DirectArgs, const int64_t*);

// KVRT_DIRECT_SCALAR=1 keeps every shape on the scalar path: a measurement knob (the tensor-core
// path against the scalar one in one build, in one run), read once.
bool ScalarOnly() {
  static const bool scalar = [] {
    const char* env = std::getenv("KVRT_DIRECT_SCALAR");
    return env != nullptr && env[0] == '1';
  }();
  return scalar;
}

// The instance (kWarpHeads, kMma) for a group size: fn(warp heads, mma) as integral constants,
// for the one-member kernel and the batch kernel alike (the batch's CTAs must be the one-member
// launch's, bit for bit).
template <typename T, int D, typename Fn>
auto WithDirectInstance(int group, Fn&& fn) {
  if constexpr (!std::is_same_v<T, float> && D <= 128) {
    if (group <= 8 && !ScalarOnly()) return fn(std::integral_constant<int, 4>{}, std::true_type{});
  }
  if constexpr (D == 256) {
    if (group <= kWarps * 2) return fn(std::integral_constant<int, 2>{}, std::false_type{});
  }
  return fn(std::integral_constant<int, 4>{}, std::false_type{});
}

using DirectBatchKernel = void (*)(DirectBatchArgs);

// The one-member kernel (kBatch false) or the batch kernel of the instance for a group size.
template <typename T, int D, bool kBatch = false>
auto DirectAttendKernelFor(int group) {
  using Kernel = std::conditional_t<kBatch, DirectBatchKernel, DirectKernel>;
  return WithDirectInstance<T, D>(group, [](auto heads, auto mma) -> Kernel {
    constexpr int kHeads = decltype(heads)::value;
    constexpr bool kMma = decltype(mma)::value;
    if constexpr (kBatch) {
      return DirectAttendBatchKernel<T, D, kHeads, kMma>;
    } else {
      return DirectAttendKernel<T, D, kHeads, kMma>;
    }
  });
}

// The kernels' arguments for one member (scores in base 2), the same for both launches.
DirectArgs MakeDirectArgs(const DirectAttendItem& it, float scale) {
  const float scale_log2 = scale * 1.4426950408889634f;
  auto* reads = reinterpret_cast<unsigned long long*>(it.read_rows);
  return DirectArgs{it.v, it.mask, it.q, scale_log2, it.part_o, it.part_lse, reads};
}

template <typename T, int D>
Err RunDirectAttend(const DirectArgs& a, const int64_t* rows_now, dim3 grid, cudaStream_t st) {
  DirectAttendKernelFor<T, D>(a.v.q_heads / a.v.kv_heads)<<<grid, kThreads, 0, st>>>(a, rows_now);
  return LastLaunchErr();
}

template <typename T, int D>
Err RunDirectAttendBatch(const DirectBatchArgs& b, dim3 grid, cudaStream_t st) {
  const DirectRowsView& v = b.m[0].v;
  DirectAttendKernelFor<T, D, true>(v.q_heads / v.kv_heads)<<<grid, kThreads, 0, st>>>(b);
  return LastLaunchErr();
}

}  // namespace

Err LaunchMarkSelected(const int32_t* selected, const int32_t* count, int q_heads, int kv_heads,
                       int num_clusters, uint32_t* mask, void* stream) {
  if (num_clusters == 0) return {};
  const cudaStream_t st = AsStream(stream);
  if (Err e = CudaErr(cudaMemsetAsync(
          mask, 0, static_cast<size_t>(kv_heads) * num_clusters * sizeof(uint32_t), st));
      !e.ok()) {
    return e;
  }
  const dim3 grid((num_clusters + 255) / 256, q_heads);
  MarkSelectedKernel<<<grid, 256, 0, st>>>(selected, count, q_heads / kv_heads, num_clusters, mask);
  return LastLaunchErr();
}

Err LaunchDirectAttendSplits(const DirectRowsView& v, const uint32_t* mask, const float* q,
                             float scale, float* part_o, float* part_lse, int64_t* read_rows,
                             void* stream, const int64_t* rows_now) {
  const DirectArgs a = MakeDirectArgs({v, mask, q, part_o, part_lse, read_rows}, scale);
  const dim3 grid(v.kv_heads, DirectSplits(v));
  KVRT_DISPATCH_DTYPE(v.dtype, T, {KVRT_DISPATCH_HEAD_DIM(v.head_dim, D, {
                        return RunDirectAttend<T, D>(a, rows_now, grid, AsStream(stream));
                      })})
  return {};
}

Err LaunchDirectAttendBatch(const DirectAttendItem* items, int n, float scale, void* stream) {
  if (n <= 0) return {};
  // Heap, not stack: ~7 KiB. The launch copies it.
  auto b = std::make_unique<DirectBatchArgs>();
  b->n = n;
  int splits = 0;
  for (int i = 0; i < n; ++i) {
    const DirectAttendItem& it = items[i];
    b->m[i] = MakeDirectArgs(it, scale);
    splits += DirectSplits(it.v);
    b->split_end[i] = splits;
  }
  const DirectRowsView& v = items[0].v;
  const dim3 grid(v.kv_heads, splits);
  KVRT_DISPATCH_DTYPE(v.dtype, T, {KVRT_DISPATCH_HEAD_DIM(v.head_dim, D, {
                        return RunDirectAttendBatch<T, D>(*b, grid, AsStream(stream));
                      })})
  return {};
}

Err LaunchDirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q, float scale,
                       float* o, float* lse, int64_t* read_rows, float* workspace, void* stream,
                       const int64_t* rows_now) {
  const cudaStream_t st = AsStream(stream);
  const int splits = DirectSplits(v);
  const size_t need = DirectWorkspaceFloats(v);
  float* ws = workspace;
  if (ws == nullptr) {
    if (Err e = CudaErr(cudaMallocAsync(reinterpret_cast<void**>(&ws), need * sizeof(float), st));
        !e.ok()) {
      return e;
    }
  }
  float* part_o = ws;
  float* part_lse = ws + static_cast<size_t>(splits) * v.q_heads * v.head_dim;
  Err err =
      LaunchDirectAttendSplits(v, mask, q, scale, part_o, part_lse, read_rows, stream, rows_now);
  if (err.ok()) {
    err = LaunchMergeStatesN(part_o, part_lse, splits, v.q_heads, v.head_dim, o, DType::kF32, lse,
                             stream);
  }
  if (ws != workspace) {
    const Err fe = CudaErr(cudaFreeAsync(ws, st));
    if (err.ok()) err = fe;
  }
  return err;
}

template <int RB>
Err LoadPageKernels() {
  const Err e = LoadKernel(FillPagesKernel<RB>);
  return e.ok() ? LoadKernel(CommitStagedKernel<RB>) : e;
}

Err PreloadDirectStep(DType dtype, int head_dim, int q_heads, int kv_heads) {
  Err err = LoadKernel(MarkSelectedKernel);
  if (!err.ok()) return err;
  KVRT_DISPATCH_DTYPE(dtype, T, {KVRT_DISPATCH_HEAD_DIM(head_dim, D, {
                        err = LoadKernel(DirectAttendKernelFor<T, D>(q_heads / kv_heads));
                      })})
  if (!err.ok()) return err;
  switch (head_dim * static_cast<int>(DTypeSize(dtype))) {
    case 128: return LoadPageKernels<128>();
    case 256: return LoadPageKernels<256>();
    case 512: return LoadPageKernels<512>();
    case 1024: return LoadPageKernels<1024>();
    default: return BadHeadDim();
  }
}

Err LaunchFillPages(const DirectRowsView& v, const int32_t* updates, int n, void* stream) {
  if (n == 0) return {};
  const cudaStream_t st = AsStream(stream);
  const unsigned blocks = static_cast<unsigned>((n + 7) / 8);
  switch (v.head_dim * static_cast<int>(DTypeSize(v.dtype))) {
    case 128: FillPagesKernel<128><<<blocks, 256, 0, st>>>(v, updates, n); break;
    case 256: FillPagesKernel<256><<<blocks, 256, 0, st>>>(v, updates, n); break;
    case 512: FillPagesKernel<512><<<blocks, 256, 0, st>>>(v, updates, n); break;
    case 1024: FillPagesKernel<1024><<<blocks, 256, 0, st>>>(v, updates, n); break;
    default: return BadHeadDim();
  }
  return LastLaunchErr();
}

Err LaunchMissPenaltyOffsets(const DirectRowsView& v, float penalty, float* offset, void* stream) {
  const int64_t n = static_cast<int64_t>(v.kv_heads) * v.num_clusters;
  if (n == 0) return {};
  MissPenaltyKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, AsStream(stream)>>>(
      v, penalty, offset);
  return LastLaunchErr();
}

Err LaunchCommitStaged(const DirectRowsView& v, void* stream) {
  const cudaStream_t st = AsStream(stream);
  if (v.stage_cap > 0) {
    // Enough warps for a step's misses in one pass; the grid-stride loop takes the rest.
    const unsigned blocks =
        static_cast<unsigned>(std::min<int64_t>((v.stage_cap + 7) / 8, int64_t{1024}));
    switch (v.head_dim * static_cast<int>(DTypeSize(v.dtype))) {
      case 128: CommitStagedKernel<128><<<blocks, 256, 0, st>>>(v); break;
      case 256: CommitStagedKernel<256><<<blocks, 256, 0, st>>>(v); break;
      case 512: CommitStagedKernel<512><<<blocks, 256, 0, st>>>(v); break;
      case 1024: CommitStagedKernel<1024><<<blocks, 256, 0, st>>>(v); break;
      default: return BadHeadDim();
    }
    if (Err e = LastLaunchErr(); !e.ok()) return e;
    if (v.stage_commits != nullptr) return {};  // reset by the kernel's last CTA
  }
  return CudaErr(cudaMemsetAsync(v.stage_count, 0, sizeof(uint32_t), st));
}

}  // namespace kvrt::gpu::detail
