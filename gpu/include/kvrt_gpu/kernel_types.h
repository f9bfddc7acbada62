#pragma once
// Argument structs of the GPU-tier kernels (kernels.h). Plain data, no CUDA and no Abseil, so the
// CUDA translation units can include it. See kernels.h for what each launcher does with them.
#include <cstddef>
#include <cstdint>

#include "kvrt_common/dtype.h"

namespace kvrt::gpu {

// q heads per kv head that one CTA of the tier kernel takes; a wider group (GLM-4's 16, an MQA
// model's all) is split over several CTAs, each reading the kv head's rows.
inline constexpr int kTierGroupTile = 8;
inline constexpr int kMaxTopK = 128;  // largest k of ExactTopK

struct TierBatch {
  const void* const* sink_k = nullptr;    // [batch] -> [n_sink[b], kv_heads, head_dim]
  const void* const* sink_v = nullptr;    // [batch] -> [n_sink[b], kv_heads, head_dim]
  const int32_t* n_sink = nullptr;        // [batch]
  const void* const* window_k = nullptr;  // [batch] -> [window_capacity, kv_heads, head_dim] ring
  const void* const* window_v = nullptr;  // [batch] -> same; rows [0, n_window[b]) valid
  const int32_t* n_window = nullptr;      // [batch]
  int batch = 0;
  int max_tokens = 0;  // host-known bound on n_sink[b] + n_window[b]; sizes the split-K grid
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
};

// The arrays of a TierBatch for `batch` sequences packed in one buffer (uploaded once, read by
// the kernel): [sink_k | sink_v | window_k | window_v] pointers, then [n_sink | n_window] int32,
// each [batch]. Pack fills a host copy; View points a TierBatch at a (device) copy.
struct TierArrays {
  static std::size_t Bytes(int batch) {
    return static_cast<std::size_t>(batch) * (4 * sizeof(void*) + 2 * sizeof(int32_t));
  }
  struct Entry {
    const void* sink_k;
    const void* sink_v;
    const void* window_k;
    const void* window_v;
    int32_t n_sink;
    int32_t n_window;
  };
  static void Pack(const Entry* entries, int batch, void* host) {
    auto* ptrs = static_cast<const void**>(host);
    auto* counts = reinterpret_cast<int32_t*>(ptrs + 4 * batch);
    for (int b = 0; b < batch; ++b) {
      ptrs[b] = entries[b].sink_k;
      ptrs[batch + b] = entries[b].sink_v;
      ptrs[2 * batch + b] = entries[b].window_k;
      ptrs[3 * batch + b] = entries[b].window_v;
      counts[b] = entries[b].n_sink;
      counts[batch + b] = entries[b].n_window;
    }
  }
  static void View(const void* packed, int batch, TierBatch* t) {
    auto* ptrs = static_cast<const void* const*>(packed);
    auto* counts = reinterpret_cast<const int32_t*>(ptrs + 4 * batch);
    t->sink_k = ptrs;
    t->sink_v = ptrs + batch;
    t->window_k = ptrs + 2 * batch;
    t->window_v = ptrs + 3 * batch;
    t->n_sink = counts;
    t->n_window = counts + batch;
    t->batch = batch;
  }
};

// Shapes the kernels support, stated once (the runtime checks configs against these).
inline bool SupportedHeadDim(int d) { return d == 64 || d == 128 || d == 256; }

struct AttnParams {
  int q_heads = 0;       // per sequence; a multiple of kv_heads (any group)
  float scale = 0.f;     // 0 = 1/sqrt(head_dim)
  bool q_is_f32 = true;  // q in f32, else in the storage dtype
  int split_tokens = 0;  // tokens per split (flash-decoding); 0 = chosen from the SM count
};

// One sequence's ring, passed by value (RingAppendRows): nothing to upload per call.
struct RingRows {
  void* k = nullptr;          // [capacity, row_bytes]
  void* v = nullptr;          // [capacity, row_bytes]
  int64_t capacity = 0;       // slots
  int64_t slot0 = 0;          // slot of the first row appended, < capacity
  std::size_t row_bytes = 0;  // a multiple of 16 (a token's kv heads x head_dim in its dtype)
};

// Where RingAppendRowsToHeads puts the rows that leave one ring: the slice of leaving row i that
// belongs to kv head g (row_bytes / heads bytes) goes to k[g] + i * (row_bytes / heads), and its
// value to v[g] likewise. A decode append's target is the cold store's next rows, one store per kv
// head (registered host memory, mapped at the same address: the direct step's stores).
struct HeadRows {
  static constexpr int kMaxHeads = 64;  // a kernel argument of 1 KiB
  void* k[kMaxHeads] = {};
  void* v[kMaxHeads] = {};
  int heads = 0;
};

struct RingBatch {
  void* const* ring_k = nullptr;       // [batch] -> [capacity, kv_heads, head_dim]
  void* const* ring_v = nullptr;       // [batch] -> [capacity, kv_heads, head_dim]
  const int64_t* write_pos = nullptr;  // [batch] tokens appended to this ring before the call
  int batch = 0;
  int capacity = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
};

// Where RingAppendToStore puts the tokens that leave a batch's rings: for sequence b and kv head
// g, key and value rows of head_dim elements (the storage dtype), row r at
// store_k[b * kv_heads + g] + r * head_dim (device memory, or mapped host memory: a cold store).
struct RingStoreTarget {
  void* const* store_k = nullptr;     // [batch * kv_heads]
  void* const* store_v = nullptr;     // [batch * kv_heads]
  const int64_t* row_base = nullptr;  // [batch]: the store row of ring position 0
  int64_t store_rows = 0;             // rows each store holds (a row past them is not written)
};

struct GatherBatch {
  const void* k = nullptr;               // [n_rows, head_dim] storage dtype
  const void* v = nullptr;               // [n_rows, head_dim]
  const int32_t* row_offsets = nullptr;  // [rows_q + 1]: q row r uses list [off[r], off[r + 1])
  const int32_t* row_ids = nullptr;      // [off[rows_q]] rows of k/v, or null: list entry = row
  int rows_q = 0;                        // sequences * q heads
  int max_rows = 0;                      // host-known bound on a list's length (split-K grid)
  int head_dim = 0;
  DType dtype = DType::kF32;
};

struct TopKProblem {
  const void* q = nullptr;
  int64_t q_stride = 0;
  bool q_is_f32 = true;
  const void* k = nullptr;
  int64_t k_stride = 0;
  int64_t nq = 0;
  int64_t nk = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
  float scale = 1.f;
  int topk = 0;
  int64_t key_chunk = 0;  // keys scored per pass (bounds the scratch); 0 = chosen from nq
};

// One copy of CopySpans (kernels.h): src -> dst, bytes.
struct CopySpan {
  const void* src = nullptr;
  void* dst = nullptr;
  std::size_t bytes = 0;
};
constexpr int kMaxCopySpans = 4;

}  // namespace kvrt::gpu
