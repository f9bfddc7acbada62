#include "device_hot_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "device_tier.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

// Fewer rows than this gathered by one thread (a thread's memcpy of a few MB is as fast).
constexpr int64_t kParallelGatherRows = 8192;

std::size_t Align16(std::size_t x) { return (x + 15) / 16 * 16; }

}  // namespace

std::size_t DeviceHotCache::row_bytes() const {
  return static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
}

bool DeviceHotCache::Fit(int64_t cold_rows, void* stream) {
  if (cfg_->hot_cache_fraction <= 0.f) return false;
  const int64_t want_rows = static_cast<int64_t>(
      std::ceil(static_cast<double>(cfg_->hot_cache_fraction) * cold_rows * cfg_->num_kv_heads));
  const int64_t want = std::max<int64_t>(1, (want_rows + kPageRows - 1) / kPageRows);
  if (map_.has_value() && want <= map_->pages() + map_->pages() / 4) return true;
  // (Re)allocate, empty: the pages of a smaller pool are dropped (a rare event: the pool grows
  // with the cold tier, by a quarter at a time).
  if (map_.has_value()) {
    if (!done_.empty()) (void)done_.Synchronize();
    (void)transfer::StreamSynchronize(stream);  // the last step's attend still reads the pool
  }
  Release();
  const std::size_t bytes = static_cast<std::size_t>(want) * kPageRows * row_bytes();
  const int64_t limit = cfg_->gpu_memory_limit;
  if (limit > 0 && counters_->gpu_allocated_bytes.load() + 2 * static_cast<int64_t>(bytes) > limit)
    return false;
  auto k = transfer::DeviceBuffer::Allocate(bytes);
  if (!k.ok()) return false;
  auto v = transfer::DeviceBuffer::Allocate(bytes);
  if (!v.ok()) return false;
  pool_k_ = std::move(*k);
  pool_v_ = std::move(*v);
  counted_bytes_ = 2 * static_cast<int64_t>(bytes);
  counters_->gpu_allocated_bytes += counted_bytes_;
  counters_->hot_cache_gpu_bytes += counted_bytes_;
  map_.emplace(want, kPageRows);
  return true;
}

void DeviceHotCache::SyncVersion(int64_t index_version) {
  if (index_version == version_) return;
  if (map_.has_value()) map_->DropUnstable();
  version_ = index_version;
}

absl::Status DeviceHotCache::Attend(const std::vector<std::vector<HotCacheMap::Group>>& groups,
                                    const ColdTier& cold, const void* q_dev, bool q_is_f32,
                                    float* o, float* lse, void* stream, tbb::task_arena& arena,
                                    bool record_rows, HotCacheStep* out) {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const std::size_t rb = row_bytes();
  HotCacheMap& map = *map_;
  map.NextStep();
  out->cpu_rows.assign(H, {});
  out->attended.assign(H, 0);
  out->rows.assign(record_rows ? H : 0, {});

  // Look every group up; misses get pages now and their rows are copied below.
  struct Miss {
    int32_t kv_head;
    int64_t begin;
    int32_t rows;
    const std::vector<int32_t>* pages;
  };
  std::vector<Miss> misses;
  std::vector<int32_t> offsets(H + 1, 0);
  std::vector<int32_t> row_ids;
  int64_t miss_rows = 0, hits = 0;
  int max_rows = 0;
  for (int h = 0; h < H; ++h) {
    for (const HotCacheMap::Group& g : groups[h]) {
      const std::vector<int32_t>* pages = map.Find(g);
      if (pages != nullptr) {
        if (!map.used_before_in_step()) ++hits;
      } else {
        pages = map.Insert(g);
        if (pages == nullptr) {
          for (int64_t r = g.begin; r < g.begin + g.rows; ++r) out->cpu_rows[h].push_back(r);
          continue;
        }
        misses.push_back({g.kv_head, g.begin, g.rows, pages});
        miss_rows += g.rows;
      }
      for (int32_t j = 0; j < g.rows; ++j)
        row_ids.push_back((*pages)[j / kPageRows] * kPageRows + j % kPageRows);
      if (record_rows)
        for (int64_t r = g.begin; r < g.begin + g.rows; ++r) out->rows[h].push_back(r);
      out->attended[h] += g.rows;
    }
    offsets[h + 1] = static_cast<int32_t>(row_ids.size());
    max_rows = std::max(max_rows, offsets[h + 1] - offsets[h]);
  }
  counters_->hot_hits += hits;
  counters_->hot_misses += static_cast<int64_t>(misses.size());
  out->on_device = !row_ids.empty();
  if (!out->on_device) return absl::OkStatus();  // nothing cached or fitting: no device state

  // One pinned upload: [miss K | miss V | destination rows | offsets | row ids].
  const std::size_t kv_bytes = static_cast<std::size_t>(miss_rows) * rb;
  const std::size_t dst_at = 2 * kv_bytes;
  const std::size_t off_at = Align16(dst_at + static_cast<std::size_t>(miss_rows) * 4);
  const std::size_t ids_at = off_at + offsets.size() * 4;
  const std::size_t total = Align16(ids_at + row_ids.size() * 4);
  if (done_.empty()) {
    KVRT_ASSIGN_OR_RETURN(done_, transfer::Event::Create(false));
  } else {
    KVRT_RETURN_IF_ERROR(done_.Synchronize());  // the previous step's H2D out of staging_
  }
  if (staging_.size() < total) {
    staging_ = transfer::PinnedBlock();
    KVRT_ASSIGN_OR_RETURN(staging_, ctx_->pinned().Acquire(total + total / 4));
  }
  auto* host = static_cast<unsigned char*>(staging_.data());
  std::vector<int64_t> miss_at(misses.size() + 1, 0);
  for (std::size_t m = 0; m < misses.size(); ++m) miss_at[m + 1] = miss_at[m] + misses[m].rows;
  auto* dst_rows = reinterpret_cast<int32_t*>(host + dst_at);
  auto gather = [&](std::size_t m) {
    const Miss& x = misses[m];
    const auto& store = cold.store(x.kv_head);
    const std::size_t at = static_cast<std::size_t>(miss_at[m]) * rb;
    // Cluster-contiguous store: a group is one contiguous read.
    std::memcpy(host + at, store.key(x.begin), static_cast<std::size_t>(x.rows) * rb);
    std::memcpy(host + kv_bytes + at, store.value(x.begin), static_cast<std::size_t>(x.rows) * rb);
    for (int32_t j = 0; j < x.rows; ++j)
      dst_rows[miss_at[m] + j] = (*x.pages)[j / kPageRows] * kPageRows + j % kPageRows;
  };
  if (miss_rows >= kParallelGatherRows) {
    arena.execute([&] { tbb::parallel_for(std::size_t{0}, misses.size(), gather); });
  } else {
    for (std::size_t m = 0; m < misses.size(); ++m) gather(m);
  }
  std::memcpy(host + off_at, offsets.data(), offsets.size() * 4);
  std::memcpy(host + ids_at, row_ids.data(), row_ids.size() * 4);

  KVRT_ASSIGN_OR_RETURN(void* dev_ptr, transfer::MallocAsync(total, stream));
  auto* dev = static_cast<unsigned char*>(dev_ptr);
  absl::Status st = transfer::MemcpyAsync(dev, host, total, stream);
  if (st.ok()) st = done_.Record(stream);
  if (st.ok() && miss_rows > 0)
    st = gpu::ScatterRows(dev, dev + kv_bytes, pool_k_.data(), pool_v_.data(),
                          reinterpret_cast<const int32_t*>(dev + dst_at), miss_rows, rb, stream);
  if (st.ok()) {
    gpu::GatherBatch batch;
    batch.k = pool_k_.data();
    batch.v = pool_v_.data();
    batch.row_offsets = reinterpret_cast<const int32_t*>(dev + off_at);
    batch.row_ids = reinterpret_cast<const int32_t*>(dev + ids_at);
    batch.rows_q = H;
    batch.max_rows = max_rows;
    batch.head_dim = d;
    batch.dtype = cfg_->dtype;
    st = gpu::GatherAttend(batch, q_dev, q_is_f32, cfg_->scale, 0, o, lse, nullptr, stream);
  }
  counters_->hot_h2d_bytes += static_cast<int64_t>(2 * kv_bytes);
  const absl::Status freed = transfer::FreeAsync(dev_ptr, stream);
  return st.ok() ? freed : st;
}

void DeviceHotCache::Release() {
  if (!done_.empty()) (void)done_.Synchronize();
  counters_->gpu_allocated_bytes -= counted_bytes_;
  counters_->hot_cache_gpu_bytes -= counted_bytes_;
  counted_bytes_ = 0;
  pool_k_.Reset();
  pool_v_.Reset();
  map_.reset();
}

}  // namespace kvrt::runtime
