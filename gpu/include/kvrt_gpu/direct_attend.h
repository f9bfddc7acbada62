#pragma once
// The cluster kind's direct decode step (GPU backend): once ClusterStep (cluster_kernels.h) has
// chosen clusters per q head on the device, the chosen rows are attended there too, with no CPU
// in the step. Each row is read from the hot cache's pool when its store block (kDirectBlockRows
// consecutive store rows of one kv head) has a page there (block_page), else straight from the
// host store, which is registered (mapped) host memory: the GPU reads it over PCIe. Which blocks
// hold pages is decided on the host from the previous step's mask and applied by FillPages before
// the next DirectAttend, so consecutive steps (which choose mostly the same clusters) read mostly
// from device memory.
//
// Per q head h of kv head g = h / group, the rows attended are: the rows of every cluster c with
// bit (h % group) set in mask[g, c], every row of extra[g] (outliers, NaN/Inf rows: -1 pads), and
// rows [tail_begin[g], rows) (not clustered yet). These sets are disjoint by construction (the
// caller's duty). An empty set gives (o = 0, lse = -inf). A row holding NaN/Inf belongs in extra
// (every head of its group attends it, so its NaN reaches all of them): the tensor-core kernel
// (16-bit dtypes, head_dim <= 128, groups of <= 8) multiplies each value row by every head's
// weight, zero included, so such a row in a cluster that only some heads chose would reach the
// others too.
//
// Compiles without CUDA (streams are void*); each launcher has a host reference (...Host, the
// same arguments in host memory); conventions as kernels.h: InvalidArgument for bad shapes,
// FailedPrecondition without CUDA, Internal for a CUDA error; launchers only enqueue work.
// The references also check the data (a cluster, extra row or page outside its range, a partial
// block in FillPagesHost): InvalidArgument. The kernels cannot report on device data, so they
// skip what the references refuse (clamping cluster ranges to `rows`, reading the host store
// for a page >= pages).
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"

namespace kvrt::gpu {

inline constexpr int kDirectBlockRows = 8;  // store rows per hot-cache page
inline constexpr int kDirectMaxGroup = 32;  // q heads per kv head (one mask bit each)
// staged_pages: a block_page entry's page bits and where its row bits start.
inline constexpr int32_t kStagedPageMask = (1 << 24) - 1;
inline constexpr int kStagedBitsShift = 24;
// The staged entry's encoding, in one place (the kernels use them too): -1 = no page, else the
// page in the low bits and bit (kStagedBitsShift + row % kDirectBlockRows) per row it holds.
// Host and device functions by name: the kernels' sources are also compiled without
// --expt-relaxed-constexpr (tools/gpu_bench's *_parts programs).
#if defined(__CUDACC__)
#define KVRT_STAGED_FN __host__ __device__ constexpr
#else
#define KVRT_STAGED_FN constexpr
#endif
KVRT_STAGED_FN int32_t StagedPage(int32_t entry) {
  return entry == -1 ? -1 : entry & kStagedPageMask;
}
KVRT_STAGED_FN uint32_t StagedRowBit(int64_t row) {
  return 1u << (kStagedBitsShift + static_cast<int>(row % kDirectBlockRows));
}
KVRT_STAGED_FN bool StagedHolds(int32_t entry, int64_t row) {
  return entry != -1 && (static_cast<uint32_t>(entry) & StagedRowBit(row)) != 0;
}
// Rows the entry holds (popcount of the result is their number).
KVRT_STAGED_FN uint32_t StagedRows(int32_t entry) {
  return entry == -1 ? 0u : static_cast<uint32_t>(entry) >> kStagedBitsShift;
}
// A page holding every row of its block.
KVRT_STAGED_FN int32_t StagedWholeBlock(int32_t page) {
  return static_cast<int32_t>(static_cast<uint32_t>(page) |
                              (((1u << kDirectBlockRows) - 1) << kStagedBitsShift));
}
#undef KVRT_STAGED_FN
static_assert(kStagedBitsShift + kDirectBlockRows <= 32, "a row bit per block row");
// FillPages, staged pages: an update's page | kFillPagesCopy copies the block in from the host
// store and marks all its rows valid (for blocks every step reads: they need no stage).
inline constexpr int32_t kFillPagesCopy = 1 << 30;

// Device pointers for the kernels, host pointers for the references.
struct DirectRowsView {
  int kv_heads = 0;
  int q_heads = 0;   // a multiple of kv_heads, at most kDirectMaxGroup per kv head
  int head_dim = 0;  // 64, 128, 256
  DType dtype = DType::kBF16;
  int64_t rows = 0;                      // store rows of every kv head (< 2^31: ids are int32)
  const void* const* store_k = nullptr;  // [kv_heads] keys [rows, d], mapped host, 16B-aligned
  const void* const* store_v = nullptr;  // [kv_heads] its values [rows, d]
  int32_t* block_page = nullptr;         // [kv_heads, blocks_per_head]: pool page or -1
  int64_t blocks_per_head = 0;           // >= ceil(rows / kDirectBlockRows)
  void* pool_k = nullptr;                // [pages * kDirectBlockRows, d], storage dtype
  void* pool_v = nullptr;
  int64_t pages = 0;                       // pool rows (pages * kDirectBlockRows) < 2^31
  const int32_t* cluster_begin = nullptr;  // [kv_heads, C] first store row of cluster c
  const int32_t* cluster_size = nullptr;   // [kv_heads, C] its rows (0: padding)
  int num_clusters = 0;                    // C
  const int32_t* extra = nullptr;          // [kv_heads, E] store rows, -1 = padding
  int num_extra = 0;                       // E (may be 0)
  const int64_t* tail_begin = nullptr;     // [kv_heads]
  // Staged pages (false: FillPages copies whole blocks over PCIe and a page holds all its rows).
  // With staged_pages, a block_page entry is -1 or (page | bits << 24), pages < 2^24 - 1, bit r
  // set when pool row r of the page holds the block's row r; FillPages only assigns pages (bits
  // clear, nothing copied); DirectAttend reads a row from the pool only where its bit is set, and
  // copies every row it reads from the host store into the stage (first stage_cap rows of the
  // calls since the last CommitStaged; slot order unspecified); CommitStaged writes the staged
  // rows whose blocks hold pages into them and sets their bits. A row crosses PCIe once, and
  // joins the pool at device-memory speed.
  bool staged_pages = false;
  void* stage_k = nullptr;          // [stage_cap, d]
  void* stage_v = nullptr;          // [stage_cap, d]
  int64_t* stage_row = nullptr;     // [stage_cap] (kv_head << 32) | store row
  uint32_t* stage_count = nullptr;  // [1] rows read from the host since the last CommitStaged
  // Optional [1], zero between calls: CommitStaged's CTAs count themselves here so that the last
  // one resets stage_count (and this) in the kernel; null: a memset after the kernel (a driver
  // call more per commit).
  uint32_t* stage_commits = nullptr;
  int64_t stage_cap = 0;            // < 2^31
};

// Rows of cluster `at` (= kv_head * num_clusters + c) that MissPenaltyOffsets counts as read from
// the host store: without their bit (staged_pages) or in a block without a page, and rows past
// `rows` or the table; 0 for a padding cluster. Host and device: the kernel and its reference
// count with this one function. One page-table entry per block the cluster spans (its row bits
// counted at once): a load per row made the kernel latency-bound (15 us per 128K step, ncu).
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline int32_t
    ClusterRowsNotInPool(const DirectRowsView& v, int64_t at) {
  const int64_t g = at / v.num_clusters, begin = v.cluster_begin[at];
  const int64_t size = v.cluster_size[at];
  if (size <= 0) return 0;
  const int64_t lo = begin > 0 ? begin : 0;
  const int64_t end = begin + size, hi = end < v.rows ? end : v.rows;
  int32_t held = 0;
  for (int64_t b = lo / kDirectBlockRows; lo < hi && b <= (hi - 1) / kDirectBlockRows; ++b) {
    if (b >= v.blocks_per_head) break;
    const int32_t e = v.block_page[g * v.blocks_per_head + b];
    const int64_t first = b * kDirectBlockRows;
    const int64_t r0 = lo > first ? lo : first;
    const int64_t r1 = hi < first + kDirectBlockRows ? hi : first + kDirectBlockRows;
    const uint32_t want = ((1u << (r1 - r0)) - 1u) << (r0 - first);
    const uint32_t have =
        v.staged_pages ? StagedRows(e) : (e >= 0 ? (1u << kDirectBlockRows) - 1u : 0u);
#if defined(__CUDA_ARCH__)
    held += __popc(want & have);
#else
    held += __builtin_popcount(want & have);
#endif
  }
  return static_cast<int32_t>(size) - held;
}

// mask [kv_heads, C] <- for each q head h, bit (h % group) of mask[h / group, c] for every
// selected[h, j], j < count[h] (ClusterStepOutputs::selected / selected_count; ids >= C are
// ignored). The mask is cleared first.
absl::Status MarkSelected(const int32_t* selected, const int32_t* count, int q_heads, int kv_heads,
                          int num_clusters, uint32_t* mask, void* stream);
absl::Status MarkSelectedHost(const int32_t* selected, const int32_t* count, int q_heads,
                              int kv_heads, int num_clusters, uint32_t* mask);

// Loads every kernel a direct decode step of this shape launches (the cluster selection, the mask,
// the attention and its merge, the page fills, q's conversion, the ring append) into the current
// device's context. Under CUDA's lazy loading (the default) each loads at its first launch: on
// the first decode token, 1-2 ms of the decode path at 128K (profiled). InvalidArgument for a
// shape the kernels do not support; FailedPrecondition without CUDA.
absl::Status PreloadDirectStepKernels(DType dtype, int head_dim, int q_heads, int kv_heads);

// Floats of device scratch DirectAttend needs.
std::size_t DirectAttendWorkspaceFloats(const DirectRowsView& v);

// The row count an attention reads: *rows_now clamped to [0, rows], or rows where rows_now is
// null. Host and device (the kernel and the reference read it with this one function).
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline int64_t
    RowsNow(int64_t rows, const int64_t* rows_now) {
  if (rows_now == nullptr) return rows;
  const int64_t n = *rows_now;
  return n < 0 ? 0 : (n > rows ? rows : n);
}

// q: f32 [q_heads, d]; o: f32 [q_heads, d]; lse: f32 [q_heads]. scale 0 = 1/sqrt(d).
// read_rows: null, or int64 [2] that the kernel adds to (device: atomically): rows read from the
// pool, rows read from the host store (a row counts once per kv head, not per q head).
// workspace: device f32 [DirectAttendWorkspaceFloats] or null (then cudaMallocAsync on stream).
// rows_now: null, or int64 [1] (device for the kernel, host for the reference): the store's row
// count as the attention runs (RowsNow), v.rows then being its bound, which sizes the grid
// (DirectAttendSplits) and the checks. What a step captured in a CUDA graph needs: a replay reads
// the count its caller wrote there (a copy on the stream before the replay), not the captured one.
absl::Status DirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q,
                          float scale, float* o, float* lse, int64_t* read_rows, float* workspace,
                          void* stream, const int64_t* rows_now = nullptr);
absl::Status DirectAttendHost(const DirectRowsView& v, const uint32_t* mask, const float* q,
                              float scale, float* o, float* lse, int64_t* read_rows,
                              const int64_t* rows_now = nullptr);

// The most split states DirectAttendPartial leaves (DirectAttendSplits(v) <= this).
inline constexpr int kDirectAttendMaxSplits = 64;
// Split states DirectAttend computes for v (a function of the view's host fields).
int DirectAttendSplits(const DirectRowsView& v);
// DirectAttend without the merge of its splits, for a caller that merges them with states of its
// own in one MergeStatesN (a launch fewer on the step's chain): split s's state goes to
// part_o + s * q_heads * d (f32 [q_heads, d]) and part_lse + s * q_heads, s <
// DirectAttendSplits(v); merged, they are DirectAttend's o and lse. No workspace. rows_now: as
// DirectAttend's.
absl::Status DirectAttendPartial(const DirectRowsView& v, const uint32_t* mask, const float* q,
                                 float scale, float* part_o, float* part_lse, int64_t* read_rows,
                                 void* stream, const int64_t* rows_now = nullptr);

// One member of DirectAttendPartialBatch: DirectAttendPartial's arguments.
struct DirectAttendItem {
  DirectRowsView v;
  const uint32_t* mask = nullptr;
  const float* q = nullptr;
  float* part_o = nullptr;
  float* part_lse = nullptr;
  int64_t* read_rows = nullptr;
};
inline constexpr int kDirectAttendBatchMax = 32;
// DirectAttendPartial for n members in one launch (a batch decode step: one launch instead of one
// per member, its CTAs side by side on the device): member i's DirectAttendSplits(items[i].v)
// split states in items[i].part_o / part_lse, bit for bit DirectAttendPartial's (without
// rows_now: the batch kernel reads each view's rows, kept in shared memory). The members share
// dtype, head_dim, q_heads and kv_heads; 1 <= n <= kDirectAttendBatchMax (else InvalidArgument,
// naming the member and the field).
absl::Status DirectAttendPartialBatch(const DirectAttendItem* items, int n, float scale,
                                      void* stream);

// Applies n page-table updates, in order: updates int32 [n, 2] = (kv_head * blocks_per_head +
// block, page). page >= 0: rows of that store block copied from the host store into pool page
// `page`, then block_page[...] = page (only whole blocks: (block + 1) * kDirectBlockRows <= rows,
// else InvalidArgument, so that a page never misses rows appended later); page -1:
// block_page[...] = -1. The pages of one call are distinct, and so are its blocks. With
// staged_pages a page is only assigned (no row valid), unless it carries kFillPagesCopy (then
// copied, every row valid); without, kFillPagesCopy is ignored.
// The launcher checks what it can without reading device memory (n, pointers, pages > 0); the
// kernel skips an update it cannot apply (block past `rows`, page >= pages, index out of range),
// which FillPagesHost refuses (InvalidArgument, before applying any update of the call).
absl::Status FillPages(const DirectRowsView& v, const int32_t* updates, int n, void* stream);
absl::Status FillPagesHost(const DirectRowsView& v, const int32_t* updates, int n);

// Residency-aware selection (ClusterStepParams::key_offset): offset [kv_heads, C] <- penalty x
// the share of cluster c's rows (v.cluster_begin / cluster_size) that a DirectAttend would read
// from the host store now (not held by the pool: with staged_pages a row without its bit, else a
// block without a page; rows past v.rows or the table count as not held); 0 for padding clusters.
// Reads only the view's table and cluster arrays. InvalidArgument for a penalty that is not
// finite and >= 0, null arrays, or kv_heads <= 0.
absl::Status MissPenaltyOffsets(const DirectRowsView& v, float penalty, float* offset,
                                void* stream);
absl::Status MissPenaltyOffsetsHost(const DirectRowsView& v, float penalty, float* offset);

// staged_pages only (else InvalidArgument): the staged rows (min(stage_count, stage_cap)) whose
// blocks hold a page are written into it and marked valid; stage_count is reset to 0. Enqueue it
// after the FillPages that assign the step's pages and before the next DirectAttend.
absl::Status CommitStaged(const DirectRowsView& v, void* stream);
absl::Status CommitStagedHost(const DirectRowsView& v);

}  // namespace kvrt::gpu
