#pragma once
// The GPU hot cache of one (sequence, layer) (config.hot_cache_fraction; GPU backend, cluster
// kind): pages of cold K/V rows in device memory, so that the rows a decode step selects are
// attended on the GPU and only the groups it has not selected recently cross PCIe. Consecutive
// steps select mostly the same clusters, so most of a step's rows are hits.
//
// A step (DeviceTier::SelectClusters calls Attend): per q head, the row groups to attend (its
// selected clusters, the outliers, the rows no index covers yet); every group is looked up, the
// misses are inserted (LRU eviction of groups this step does not use), their rows gathered from
// the host store into pinned staging and copied up with the per-head row lists in ONE H2D, then
// scattered into their pages (one launch) and attended by one gather-attend launch over the pool.
// Groups that do not fit go back to the caller, which attends them on the CPU.
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "cold_tier.h"
#include "hot_cache_map.h"
#include "kvrt_runtime/runtime.h"
#include "kvrt_transfer/cuda_rt.h"
#include "kvrt_transfer/pinned_pool.h"
#include "oneapi/tbb/task_arena.h"

namespace kvrt::runtime {

class GpuContext;

// Pages per kv head that a pool of the cold tier's hot rows needs for cold_rows rows
// (config.hot_cache_fraction of them, at least one page of page_rows). A pool of `have` pages
// (0: none yet) is replaced only when the need outgrew it by more than a quarter, so that it
// grows with the cold tier a quarter at a time. Shared by DeviceHotCache and the direct step.
int64_t HotPoolPages(const RuntimeConfig& cfg, int64_t cold_rows, int page_rows);
inline bool HotPoolOutgrown(int64_t want, int64_t have) {
  return have == 0 || want > have + have / 4;
}

// What Attend did for one step.
struct HotCacheStep {
  bool on_device = false;                      // o, lse were written (some row attended)
  std::vector<std::vector<int64_t>> cpu_rows;  // [q_heads] rows of groups that did not fit
  std::vector<int64_t> attended;               // [q_heads] rows attended from the cache
  std::vector<std::vector<int64_t>> rows;      // [q_heads] their store rows (record_rows only)
};

class DeviceHotCache {
 public:
  static constexpr int kPageRows = 16;

  DeviceHotCache(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* ctx)
      : cfg_(config), counters_(counters), ctx_(ctx) {}
  ~DeviceHotCache() { Release(); }

  // Sizes the pool for cold_rows rows per kv head (hot_cache_fraction of them): allocated at first
  // use, re-allocated empty when the need grew by more than a quarter. False (no cache this step)
  // when the fraction is 0 or the pool does not fit under gpu_memory_limit.
  bool Fit(int64_t cold_rows, void* stream);
  // The cold tier's index changed: groups other than clusters may hold other rows now.
  void SyncVersion(int64_t index_version);
  // Attends groups[h] for every q head h (rows of kv head h / group's store) into o [q_heads, d],
  // lse [q_heads] (device, f32) on stream; q_dev: [q_heads, d] in the storage dtype (f32 when
  // q_is_f32). Requires Fit() true in this step. Leaves o, lse unwritten (out->on_device false)
  // when no row is attended from the cache.
  absl::Status Attend(const std::vector<std::vector<HotCacheMap::Group>>& groups,
                      const ColdTier& cold, const void* q_dev, bool q_is_f32, float* o, float* lse,
                      void* stream, tbb::task_arena& arena, bool record_rows, HotCacheStep* out);
  // Waits for the last step's copies and frees the pool.
  void Release();

 private:
  std::size_t row_bytes() const;

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  GpuContext* ctx_;
  // Per kv head a map over its own pages (heads are looked up in parallel): head g owns pool
  // pages [g * pages_per_head_, (g + 1) * pages_per_head_).
  std::vector<HotCacheMap> maps_;
  int64_t pages_per_head_ = 0;
  transfer::DeviceBuffer pool_k_, pool_v_;  // [kv_heads * pages_per_head_ * kPageRows, d]
  int64_t counted_bytes_ = 0;               // what the pool adds to the GPU counters
  int64_t version_ = -1;
  // Staging of a step's upload, reused once its H2D (done_) completed.
  transfer::PinnedBlock staging_;
  transfer::Event done_;
};

}  // namespace kvrt::runtime
