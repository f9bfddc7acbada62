#pragma once
// The second stage of a two-stage cluster selection on the GPU: the scores of every coded cold row
// of one (sequence, layer) for all q heads of each kv head, from the rows' compact codes
// (cpu_index/include/kvrt_cpu_index/cluster.h, EncodeResiduals: per channel `bits` of the key's
// residual from its cluster's bf16 centroid, on a per-segment grid offset + step x code) and the
// summary's centroids: score = q . (centroid + offset + step x code). A scan of 2-bit codes reads
// head_dim / 4 bytes per row and kv head, 1/8 of the bf16 keys (docs/gpu.md, "The device form
// with codes"), and each cluster's log-sum-exp over them (CodeClusterLse, or CodeClusterMass
// without the rows' scores: what the GPU backend's selection on codes runs, feeding
// ClusterStepParams::cluster_lse). Selection of single rows and attention over them are not here.
// Compiles without CUDA (streams are void*); CodeScanHost is the reference (double sums);
// launchers follow kernels.h's conventions (InvalidArgument for bad shapes, FailedPrecondition
// without CUDA, Internal for a CUDA error; they only enqueue work).
#include <cstdint>

#include "absl/status/status.h"

namespace kvrt::gpu {

inline constexpr int kCodeScanMaxGroup = 16;  // q heads per kv head

// Device pointers for the kernel, host pointers for the reference. Every kv head has `rows` rows.
struct CodeScanView {
  int kv_heads = 0;
  int head_dim = 0;          // 1..256
  int bits = 0;              // 1, 2, 4 or 8
  int64_t rows = 0;          // per kv head
  int64_t segment_rows = 0;  // row r's grid is segment r / segment_rows's
  int num_clusters = 0;      // per kv head
  // [kv_heads, rows, (head_dim * bits + 7) / 8]: channel t at bit t * bits of its row.
  const uint8_t* code = nullptr;
  const int32_t* cluster = nullptr;    // [kv_heads, rows]: the row's cluster; < 0: not coded
  const uint16_t* centroid = nullptr;  // bf16 [kv_heads, num_clusters, head_dim]
  // [kv_heads, segments, head_dim] each, segments = ceil(rows / segment_rows).
  const float* offset = nullptr;
  const float* step = nullptr;
};

// scores: f32 [q_heads, rows], q head h of kv head h / (q_heads / kv_heads); unscaled q . key,
// -inf for rows not coded. q: f32 [q_heads, head_dim]. q_heads a multiple of kv_heads, at most
// kCodeScanMaxGroup per kv head.
absl::Status CodeScan(const CodeScanView& v, const float* q, int q_heads, float* scores,
                      void* stream);
absl::Status CodeScanHost(const CodeScanView& v, const float* q, int q_heads, float* scores);

// Per cluster and q head, the log-sum-exp of its rows' scaled scores (CodeScan's output):
// lse [q_heads, num_clusters] = log sum_{r in [begin, begin + size)} exp(scale * scores[h, r]),
// -inf for an empty cluster. begin [kv_heads, C] (rows of the kv head), size [kv_heads, C]; each
// range must lie within [0, rows) (not checked: the kernel's arrays are device memory).
// density_c = lse_c - log size_c is what the cluster step ranks by; from codes it replaces the
// centroid's estimate (docs/gpu.md, "A smaller first integration").
absl::Status CodeClusterLse(const CodeScanView& v, int q_heads, const float* scores,
                            const int64_t* begin, const int32_t* size, float scale, float* lse,
                            void* stream);
absl::Status CodeClusterLseHost(const CodeScanView& v, int q_heads, const float* scores,
                                const int64_t* begin, const int32_t* size, float scale, float* lse);

// CodeScan then CodeClusterLse in one pass, without writing the rows' scores: lse [q_heads, C] as
// CodeClusterLse gives for the scores CodeScan would write (up to float rounding). Reads neither
// v.cluster (may be null: each cluster's rows are [begin, begin + size)) nor rows outside the
// clusters. Needs head_dim a multiple of 32 (at most 256), v.code 4-byte aligned (q, offset and
// step 16-byte, the centroids 8-byte), and each cluster's rows within one segment (the cluster
// index clusters segment by segment; not checked).
// What the GPU backend's selection on codes runs (docs/gpu.md). The kernel runs on tensor cores:
// q x step rounded once to f16 per segment moves a row's scaled score by at most
// 2^-11 x (2^bits - 1) x scale x sum_t |q_t x step_t| from the reference's (double sums).
absl::Status CodeClusterMass(const CodeScanView& v, const float* q, int q_heads,
                             const int64_t* begin, const int32_t* size, float scale, float* lse,
                             void* stream);
absl::Status CodeClusterMassHost(const CodeScanView& v, const float* q, int q_heads,
                                 const int64_t* begin, const int32_t* size, float scale,
                                 float* lse);

}  // namespace kvrt::gpu
