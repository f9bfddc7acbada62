#pragma once
// The group selection's threshold, found by many CTAs (cluster_threshold.cu) before the select
// kernel (cluster_score.cu) compacts: the step's workspace section both read and write, per kv
// head (plain C++: the launchers size it). The select kernel walked every cluster of its q head
// three times in one CTA to find the threshold key (one CTA per q head: 32 of the H200's 132 SMs;
// 200 us of a 1M step, measured); here the walks are spread over the clusters' chunks, and the
// select kernel only compacts.
#include <cstddef>
#include <cstdint>

namespace kvrt::gpu::detail {

inline constexpr int kLinBins = 4096;     // linear bins of the selection's one histogram pass
inline constexpr int kCandCap = 1024;     // clusters of the threshold bin resolved in shared memory
inline constexpr int kKeyClusters = 256;  // clusters per CTA of GroupKeyKernel (one per thread)
// Clusters per kv head from which the threshold kernels run; below, the select kernel searches
// itself. NOTE: at 8192 clusters (128K tokens) both cost the same device time (7.5-10.6 against
// 7.7 us on the H200, docs/benchmarks.md), and the kernels are two more launches per step and
// batch member; at 65 536 they save ~30 us.
inline constexpr int kThresholdMinClusters = 12288;

// How a kv head's threshold stands after the threshold kernels. The select kernel takes it
// (kThresholdFound, kThresholdAll) or searches itself (any other: a range the linear bins cannot
// split, a threshold bin of more than kCandCap clusters, kernels that did not run).
inline constexpr int kThresholdPending = 0;
inline constexpr int kThresholdFound = 1;  // kt: the threshold key; above_*: the keys above it
inline constexpr int kThresholdAll = 2;    // the whole set does not reach the criterion
inline constexpr int kThresholdSearch = 3;

struct alignas(16) ThresholdRow {
  unsigned hist_done;  // CTAs of the histogram kernel done (the last one scans)
  unsigned cand_done;  // CTAs of the candidate kernel done (the last one resolves)
  int mode;            // kThreshold*
  int bin;             // the threshold bin, or -1
  int ncand;           // clusters of the threshold bin (may pass kCandCap)
  uint32_t kt;         // OrderedKey of the threshold key
  long long above_tok;
  float above_mass;
  float target_mass;  // top_p x the keys' total mass (top_p > 0)
  float lo, hi;       // the keys' range (the bins' map)
};

// Floats of the section for kv_heads rows of num_clusters clusters.
inline std::size_t ThresholdKeyCtas(int num_clusters) {
  return static_cast<std::size_t>((num_clusters + kKeyClusters - 1) / kKeyClusters);
}
inline std::size_t ThresholdRowFloats(int num_clusters) {
  return sizeof(ThresholdRow) / 4 + 3 * ThresholdKeyCtas(num_clusters) + 2 * kLinBins +
         3 * kCandCap;
}

// The section's arrays, kv head h's rows at h * (its row length).
struct ThresholdWs {
  ThresholdRow* row = nullptr;  // [kv_heads]
  float* part_lo = nullptr;     // [kv_heads, key CTAs]: each GroupKeyKernel CTA's keys' range
  float* part_hi = nullptr;
  float* part_mass = nullptr;    // and their total mass (top_p > 0)
  unsigned* hist_tok = nullptr;  // [kv_heads, kLinBins]
  float* hist_mass = nullptr;
  uint32_t* cand_key = nullptr;  // [kv_heads, kCandCap]
  int32_t* cand_n = nullptr;
  float* cand_mass = nullptr;
  int key_ctas = 0;
};

// The section at `base` (16-byte aligned) for kv_heads rows of num_clusters clusters.
inline ThresholdWs ThresholdLayout(float* base, int kv_heads, int num_clusters) {
  ThresholdWs w;
  const std::size_t kc = ThresholdKeyCtas(num_clusters);
  float* at = base;
  w.row = reinterpret_cast<ThresholdRow*>(at);
  at += static_cast<std::size_t>(kv_heads) * sizeof(ThresholdRow) / 4;
  w.part_lo = at;
  at += kv_heads * kc;
  w.part_hi = at;
  at += kv_heads * kc;
  w.part_mass = at;
  at += kv_heads * kc;
  w.hist_tok = reinterpret_cast<unsigned*>(at);
  at += static_cast<std::size_t>(kv_heads) * kLinBins;
  w.hist_mass = at;
  at += static_cast<std::size_t>(kv_heads) * kLinBins;
  w.cand_key = reinterpret_cast<uint32_t*>(at);
  at += static_cast<std::size_t>(kv_heads) * kCandCap;
  w.cand_n = reinterpret_cast<int32_t*>(at);
  at += static_cast<std::size_t>(kv_heads) * kCandCap;
  w.cand_mass = at;
  w.key_ctas = static_cast<int>(kc);
  return w;
}

}  // namespace kvrt::gpu::detail
