#pragma once
// The rest's estimate from value codes on the GPU (docs/gpu.md, "The rest from value codes on the
// device"): what the cluster index's RestFromValueCodes computes on the CPU
// (cpu_index/src/cluster_index.cc, ClusterConfig::value_bits), for a selection made on the device.
// Per q head, the rows of every cluster that head does not attend enter with the softmax of their
// scaled key-code scores (as CodeClusterMass scores them) over their decoded values (the
// cluster's bf16 value mean + the segment's offset + step x code). Compiles without CUDA;
// CodeValueRestHost is the reference (double sums). Launchers follow kernels.h's conventions.
// The runtime's device selection calls it after ClusterStep (runtime/src/device_tier.cc,
// DeviceTier::LaunchValueRest), with the selection made a mask by AttendedFromSelection.
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_gpu/code_scan.h"

namespace kvrt::gpu {

// The value codes beside the key codes of a CodeScanView (same rows, clusters and segments).
struct CodeValueView {
  int bits = 0;  // 2 on the device (the reference takes 1, 2, 4 or 8)
  // [kv_heads, rows, (head_dim * bits + 7) / 8]: channel t at bit t * bits of its row.
  const uint8_t* code = nullptr;
  const uint16_t* value_mean = nullptr;  // bf16 [kv_heads, num_clusters, head_dim]
  // [kv_heads, segments, head_dim] each.
  const float* offset = nullptr;
  const float* step = nullptr;
};

// Whether CodeValueRest's device form takes this shape: 2-bit value codes, head_dim 64, 128 or
// 256, at most 8 q heads per kv head (one MMA column tile). The runtime selects on the CPU
// otherwise.
bool CodeValueRestTakes(int value_bits, int head_dim, int group);

// Floats of device workspace CodeValueRest needs (16-byte aligned).
int64_t CodeValueRestWorkspaceFloats(const CodeScanView& keys, int q_heads);

// o [q_heads, head_dim] (normalized) and lse [q_heads] (natural log of the sum of exp of the
// scaled scores) of the rows of the clusters each q head does not attend: attended [q_heads, C]
// (non-zero: the head attends cluster c, its rows left out), the clusters' rows [begin, begin +
// size) as CodeClusterMass takes them. (0, -inf) for a head with no such row. cluster_lse
// [q_heads, C]: CodeClusterMass's output for the same q (the kernel's stabilizer: the result
// does not depend on it beyond rounding). The device form needs what CodeClusterMass needs plus
// values.bits 2, at most 8 q heads per kv head, head_dim a multiple of 32, and 4-byte aligned
// value codes (16-byte offset and step).
absl::Status CodeValueRest(const CodeScanView& keys, const CodeValueView& values, const float* q,
                           int q_heads, const int64_t* begin, const int32_t* size,
                           const uint8_t* attended, const float* cluster_lse, float scale,
                           float* workspace, float* o, float* lse, void* stream);
absl::Status CodeValueRestHost(const CodeScanView& keys, const CodeValueView& values,
                               const float* q, int q_heads, const int64_t* begin,
                               const int32_t* size, const uint8_t* attended, float scale, float* o,
                               float* lse);

// attended [q_heads, num_clusters] (1: head h attends cluster c, 0: it does not) from a selection
// as ClusterStep writes it: selected [q_heads, num_clusters], of which row h's first count[h]
// entries are cluster ids (ids outside [0, num_clusters) are skipped). One launch; every byte of
// attended is written.
absl::Status AttendedFromSelection(const int32_t* selected, const int32_t* count, int q_heads,
                                   int num_clusters, uint8_t* attended, void* stream);
absl::Status AttendedFromSelectionHost(const int32_t* selected, const int32_t* count, int q_heads,
                                       int num_clusters, uint8_t* attended);

}  // namespace kvrt::gpu
