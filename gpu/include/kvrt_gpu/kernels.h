#pragma once
// CUDA kernels of the GPU tier (launchers) and, for each, its host reference (the path without a
// GPU). This header compiles without CUDA: streams are `void*` (a cudaStream_t, null = the legacy
// default stream), device pointers are plain pointers. Every launcher only enqueues work on the
// given stream (no device-wide synchronisation), checks its arguments and returns an error instead
// of aborting: InvalidArgument for bad shapes or an unsupported head_dim / dtype,
// FailedPrecondition when kvrt was built without CUDA, Internal for a CUDA error.
//
// Layouts: rows are contiguous `head_dim` elements; "[a, b, d]" means row-major, d fastest.
// Storage dtype is the config's (f32, f16, bf16); accumulation and partial states are f32.
// Supported head dims: 64, 128, 256. Partial states follow docs/architecture.md "Numerics": `o`
// normalised, `lse` natural log-sum-exp of the scaled scores, an empty set gives (o = 0, lse =
// -inf).
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"
#include "kvrt_gpu/kernel_types.h"
#include "kvrt_gpu/tier_attention.h"

namespace kvrt::gpu {

// True when kvrt was built with CUDA and cudaGetDeviceCount reports at least one device.
bool DeviceAvailable();

// ---------------------------------------------------------------------------------------------
// (a) Tier attention: decode partial attention over sinks + window ring, batched over sequences.
// The pointer arrays and counts live in device memory for the kernel and in host memory for the
// host reference (struct TierBatch in kernel_types.h). Ring order does not matter to attention.

// Floats of scratch that TierAttention needs for `batch * q_heads` rows and `max_tokens`.
std::size_t TierAttentionWorkspaceFloats(const TierBatch& tier, const AttnParams& p);

// q: [batch, q_heads, d] (f32 or storage dtype). o: f32 [batch, q_heads, d]. lse: f32
// [batch, q_heads]. workspace: device f32 [TierAttentionWorkspaceFloats(...)] or null, in which
// case it is taken from the stream-ordered allocator (cudaMallocAsync) and freed in stream order.
absl::Status TierAttention(const TierBatch& tier, const void* q, const AttnParams& p, float* o,
                           float* lse, float* workspace, void* stream);
void TierAttentionBatchHost(const TierBatch& tier, const void* q, const AttnParams& p, float* o,
                            float* lse);

// ---------------------------------------------------------------------------------------------
// (b) Merge of two partial states per row, rows = sequences * q heads.
// o_a, o_b: f32 [rows, d]; lse_a, lse_b: f32 [rows]. out: [rows, d] in out_dtype (may alias o_a
// when f32). lse_out: f32 [rows] or null (may alias lse_a). Two empty states give an empty state.
absl::Status MergeStates(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                         int rows, int head_dim, void* out, DType out_dtype, float* lse_out,
                         void* stream);
void MergeStatesToHost(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                       int rows, int head_dim, void* out, DType out_dtype, float* lse_out);

// Merge of n partial states per row at once (a decode step's list: GPU tier, fetched rows, the
// CPU's states, an estimate). o: f32 [n_states, rows, d] and lse: f32 [n_states, rows],
// contiguous; out: [rows, d] in out_dtype; lse_out: f32 [rows] or null. An empty state
// (lse -inf) weighs 0 and its o is not read. The host reference is cpu_index::MergeStates.
absl::Status MergeStatesN(const float* o, const float* lse, int n_states, int rows, int head_dim,
                          void* out, DType out_dtype, float* lse_out, void* stream);
void MergeStatesNHost(const float* o, const float* lse, int n_states, int rows, int head_dim,
                      void* out, DType out_dtype, float* lse_out);

// ---------------------------------------------------------------------------------------------
// (c) Window ring append and eviction gather, batched over sequences (struct RingBatch).
// new_k, new_v: [batch, n_new, kv_heads, d]; token i of sequence b goes to ring slot
// (write_pos[b] + i) % capacity (n_new <= capacity). evict_k / evict_v: null, or
// [batch, n_new, kv_heads, d] staging that receives, before it is overwritten, the token that held
// the slot; row i of b is meaningful iff write_pos[b] + i >= capacity (it is position
// write_pos[b] + i - capacity of the window stream). write_pos is not advanced (the caller owns
// it).
absl::Status RingAppend(const RingBatch& ring, const void* new_k, const void* new_v, int n_new,
                        void* evict_k, void* evict_v, void* stream);
void RingAppendHost(const RingBatch& ring, const void* new_k, const void* new_v, int n_new,
                    void* evict_k, void* evict_v);

// RingAppend for a step that is replayed from a CUDA graph: no count of the host in it. Token i of
// sequence b goes to slot (write_pos[b] + i) % capacity; where that slot held ring position
// p = write_pos[b] + i - capacity (p >= 0), the row first goes to store row row_base[b] + p of
// each kv head (RingStoreTarget), so the step's attention finds it in the cold store; then
// write_pos[b] += n_new and, where rows is not null, rows[b] = row_base[b] + max(0, write_pos[b] -
// capacity): the store's row count after the call (DirectAttend's rows_now). write_pos: [batch]
// (device for the kernel, host for the reference); ring.write_pos is not read. A store row past
// store_rows is not written (the kernel skips it; the reference refuses the call, InvalidArgument,
// before it changes anything).
absl::Status RingAppendToStore(const RingBatch& ring, const void* new_k, const void* new_v,
                               int n_new, const RingStoreTarget& store, int64_t* write_pos,
                               int64_t* rows, void* stream);
absl::Status RingAppendToStoreHost(const RingBatch& ring, const void* new_k, const void* new_v,
                                   int n_new, const RingStoreTarget& store, int64_t* write_pos,
                                   int64_t* rows);

// One ring's append with every argument by value (a decode step's append, fused with its
// eviction: one launch). Rows i < n of new_k / new_v ([n, row_bytes], device) go to slots
// (slot0 + i) % capacity; evict_k / evict_v: null, or [n, row_bytes] that first receive the rows
// those slots held. The eviction may be pinned host memory (cudaHostAlloc: the kernel writes it
// over the bus; the host reads it after the stream passes the launch). n <= capacity.
absl::Status RingAppendRows(const RingRows& ring, const void* new_k, const void* new_v, int64_t n,
                            void* evict_k, void* evict_v, void* stream);
void RingAppendRowsHost(const RingRows& ring, const void* new_k, const void* new_v, int64_t n,
                        void* evict_k, void* evict_v);
// RingAppendRows whose leaving rows go into one store per kv head (HeadRows) instead of one
// token-major buffer: a decode append that writes the token it pushes out of the window straight
// into the cold store's next rows, so that no copy and no host settle stand between the eviction
// and the rows a direct step attends. Checks as RingAppendRows, and 1 <= heads <= kMaxHeads,
// row_bytes a multiple of 16 * heads, every k[g], v[g] of g < heads set (InvalidArgument).
absl::Status RingAppendRowsToHeads(const RingRows& ring, const void* new_k, const void* new_v,
                                   int64_t n, const HeadRows& evict, void* stream);
absl::Status RingAppendRowsToHeadsHost(const RingRows& ring, const void* new_k, const void* new_v,
                                       int64_t n, const HeadRows& evict);

// out_k, out_v: [batch, count, kv_heads, d] <- ring rows of positions start[b] + i (mod capacity)
// for i < count: the contiguous staging buffer that D2H copies of leaving tokens read.
// start: [batch] (device for the kernel). ring.write_pos is not read.
absl::Status RingGather(const RingBatch& ring, const int64_t* start, int count, void* out_k,
                        void* out_v, void* stream);
void RingGatherHost(const RingBatch& ring, const int64_t* start, int count, void* out_k,
                    void* out_v);

// ---------------------------------------------------------------------------------------------
// (d) Gather-attend (fetch mode): each q row attends to its own list of rows of a contiguous
// buffer that holds the K/V copied H2D for the tokens the CPU index selected (GatherBatch).
std::size_t GatherAttendWorkspaceFloats(const GatherBatch& g, int split_tokens);

// q: [rows_q, d] (f32 or storage dtype). o: f32 [rows_q, d], lse: f32 [rows_q].
absl::Status GatherAttend(const GatherBatch& g, const void* q, bool q_is_f32, float scale,
                          int split_tokens, float* o, float* lse, float* workspace, void* stream);
void GatherAttendHost(const GatherBatch& g, const void* q, bool q_is_f32, float scale, float* o,
                      float* lse);

// Row scatter (filling the hot cache's pages): row dst_rows[i] of dst_k / dst_v <- row i of
// src_k / src_v (contiguous [n] rows), for i < n. row_bytes: a multiple of 16. Rows of dst_rows
// are distinct.
absl::Status ScatterRows(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                         const int32_t* dst_rows, int64_t n, std::size_t row_bytes, void* stream);
void ScatterRowsHost(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                     const int32_t* dst_rows, int64_t n, std::size_t row_bytes);

// Row-id runs (the hot cache's page lists expanded on the device, so the CPU writes one entry per
// page instead of one per row): runs is int32 [n_runs, 3] = (src, dst, n) with 0 <= n <= 32;
// ids[dst + j] = src + j for j < n.
absl::Status ExpandRowRuns(const int32_t* runs, int64_t n_runs, int32_t* ids, void* stream);
void ExpandRowRunsHost(const int32_t* runs, int64_t n_runs, int32_t* ids);

// Up to kMaxCopySpans copies in one launch (a step's record: a mask and a few counters going to one
// pinned host block, which the kernel writes through its mapping: one launch instead of a
// cudaMemcpyAsync each). src: device memory; dst: device or mapped pinned host memory; both
// 4-byte aligned and bytes a multiple of 4; spans do not overlap. (CopySpan: kernel_types.h.)
absl::Status CopySpans(const CopySpan* spans, int n, void* stream);
void CopySpansHost(const CopySpan* spans, int n);

// out[i] = value for i < n (device f32), e.g. the lse -inf of empty partial states.
absl::Status FillF32(float* out, float value, int64_t n, void* stream);

// n elements of dtype t to f32 on the device (a decode step's q for the kernels that score in
// f32, without a trip through the host). The host reference is kvrt::ConvertToF32 (dtype.h).
absl::Status ConvertRowsToF32(const void* in, DType t, int64_t n, float* out, void* stream);

// ---------------------------------------------------------------------------------------------
// (e) Exact top-k of queries against keys (attention-aware index build).
// q: rows of head_dim at q + i * q_stride elements, i < nq (f32 or storage dtype); k: rows at
// k + j * k_stride, j < nk (storage dtype); strides let one kv head of [T, kv_heads, d] be read
// in place. ids: int32 [nq, topk], scores: f32 [nq, topk] (scale * q.k), best first, ties broken
// by the smaller id. topk <= min(kMaxTopK, nk). Scratch comes from cudaMallocAsync on the stream.
absl::Status ExactTopK(const TopKProblem& pr, int32_t* ids, float* scores, void* stream);
void ExactTopKHost(const TopKProblem& pr, int32_t* ids, float* scores);

}  // namespace kvrt::gpu
