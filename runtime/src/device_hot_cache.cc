#include "device_hot_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "align.h"
#include "device_tier.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

// Pool row of row j of a group whose pages are `pages` (local to its kv head, whose first pool
// page is page0).
int32_t PoolRow(int64_t page0, const std::vector<int32_t>& pages, int32_t j) {
  constexpr int kPage = DeviceHotCache::kPageRows;
  return static_cast<int32_t>((page0 + pages[j / kPage]) * kPage + j % kPage);
}

}  // namespace

int64_t HotPoolPages(const RuntimeConfig& cfg, int64_t cold_rows, int page_rows) {
  const int64_t rows = static_cast<int64_t>(
      std::ceil(static_cast<double>(cfg.hot_cache_fraction) * static_cast<double>(cold_rows)));
  return std::max<int64_t>(1, (rows + page_rows - 1) / page_rows);
}

std::size_t DeviceHotCache::row_bytes() const {
  return static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
}

bool DeviceHotCache::Fit(int64_t cold_rows, void* stream) {
  if (cfg_->hot_cache_fraction <= 0.f) return false;
  const int G = cfg_->num_kv_heads;
  const int64_t want = HotPoolPages(*cfg_, cold_rows, kPageRows);  // per head
  if (!HotPoolOutgrown(want, maps_.empty() ? 0 : pages_per_head_)) return true;
  // (Re)allocate, empty: the pages of a smaller pool are dropped (a rare event: the pool grows
  // with the cold tier, by a quarter at a time).
  if (!maps_.empty()) {
    (void)done_.Synchronize();
    (void)transfer::StreamSynchronize(stream);  // the last step's attend still reads the pool
  }
  Release();
  const std::size_t bytes = static_cast<std::size_t>(want) * G * kPageRows * row_bytes();
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
  pages_per_head_ = want;
  maps_.reserve(G);
  for (int g = 0; g < G; ++g) maps_.emplace_back(want, kPageRows);
  return true;
}

void DeviceHotCache::SyncVersion(int64_t index_version) {
  if (index_version == version_) return;
  for (HotCacheMap& m : maps_) m.DropUnstable();
  version_ = index_version;
}

absl::Status DeviceHotCache::Attend(const std::vector<std::vector<HotCacheMap::Group>>& groups,
                                    const ColdTier& cold, const void* q_dev, bool q_is_f32,
                                    float* o, float* lse, void* stream, tbb::task_arena& arena,
                                    bool record_rows, HotCacheStep* out) {
  const int64_t t0 = NowNs();
  const int H = cfg_->num_q_heads, G = cfg_->num_kv_heads, group = H / G, d = cfg_->head_dim;
  const std::size_t rb = row_bytes();
  out->cpu_rows.assign(H, {});
  out->attended.assign(H, 0);
  out->rows.assign(record_rows ? H : 0, {});

  // 1. Per kv head, in parallel (each has its own map and pages): look every group of its q heads
  //    up; misses get pages now. Each q head's pool rows are listed as runs of one page each
  //    (src pool row, dst position in the head's list, rows), expanded on the device.
  struct Miss {
    int g;
    int64_t begin;
    int32_t rows;
    int64_t pool_page0;  // pool page of the head's local page 0
    const std::vector<int32_t>* pages;
  };
  std::vector<std::vector<Miss>> head_misses(G);
  std::vector<int64_t> hits(G, 0);
  std::vector<std::vector<int32_t>> runs(H);  // [q head] (src, dst, n) triples
  arena.execute([&] {
    tbb::parallel_for(0, G, [&](int g) {
      HotCacheMap& map = maps_[g];
      const int64_t page0 = static_cast<int64_t>(g) * pages_per_head_;
      map.NextStep();
      for (int h = g * group; h < (g + 1) * group; ++h) {
        int32_t listed = 0;
        for (const HotCacheMap::Group& grp : groups[h]) {
          const std::vector<int32_t>* pages = map.Find(grp);
          if (pages != nullptr) {
            if (!map.used_before_in_step()) ++hits[g];
          } else {
            pages = map.Insert(grp);
            if (pages == nullptr) {
              for (int64_t r = grp.begin; r < grp.begin + grp.rows; ++r)
                out->cpu_rows[h].push_back(r);
              continue;
            }
            head_misses[g].push_back({g, grp.begin, grp.rows, page0, pages});
          }
          for (int32_t j = 0; j < grp.rows; j += kPageRows) {
            const int32_t n = std::min<int32_t>(kPageRows, grp.rows - j);
            runs[h].insert(runs[h].end(), {PoolRow(page0, *pages, j), listed + j, n});
          }
          listed += grp.rows;
          if (record_rows)
            for (int64_t r = grp.begin; r < grp.begin + grp.rows; ++r) out->rows[h].push_back(r);
        }
        out->attended[h] = listed;
      }
    });
  });
  std::vector<int32_t> offsets(H + 1, 0);
  std::vector<int64_t> run_at(H + 1, 0);
  int max_rows = 0;
  for (int h = 0; h < H; ++h) {
    offsets[h + 1] = offsets[h] + static_cast<int32_t>(out->attended[h]);
    run_at[h + 1] = run_at[h] + static_cast<int64_t>(runs[h].size() / 3);
    max_rows = std::max(max_rows, static_cast<int>(out->attended[h]));
  }
  std::vector<Miss> misses;
  for (int g = 0; g < G; ++g) {
    counters_->hot_hits += hits[g];
    misses.insert(misses.end(), head_misses[g].begin(), head_misses[g].end());
  }
  counters_->hot_misses += static_cast<int64_t>(misses.size());
  std::vector<int64_t> miss_at(misses.size() + 1, 0);
  for (std::size_t m = 0; m < misses.size(); ++m) miss_at[m + 1] = miss_at[m] + misses[m].rows;
  const int64_t miss_rows = miss_at.back();
  out->on_device = offsets[H] > 0;
  if (!out->on_device) {  // nothing cached or fitting: no device state
    counters_->time_hot_cache_ns += NowNs() - t0;
    return absl::OkStatus();
  }

  // 2. One pinned upload: [miss K | miss V | destination rows | offsets | runs], filled in
  //    parallel (misses, then the runs per q head). The row ids are expanded on the device, past
  //    the upload.
  const std::size_t kv_bytes = static_cast<std::size_t>(miss_rows) * rb;
  const std::size_t dst_at = 2 * kv_bytes;
  const std::size_t off_at = Align16(dst_at + static_cast<std::size_t>(miss_rows) * 4);
  const std::size_t runs_at = off_at + offsets.size() * 4;
  const std::size_t upload = Align16(runs_at + static_cast<std::size_t>(run_at[H]) * 12);
  const std::size_t total = upload + static_cast<std::size_t>(offsets[H]) * 4;
  KVRT_RETURN_IF_ERROR(done_.Synchronize());  // the previous step's H2D out of staging_
  if (staging_.size() < upload) {
    staging_ = transfer::PinnedBlock();
    KVRT_ASSIGN_OR_RETURN(staging_, ctx_->pinned().Acquire(upload + upload / 2));
  }
  auto* host = static_cast<unsigned char*>(staging_.data());
  auto* dst_rows = reinterpret_cast<int32_t*>(host + dst_at);
  auto* run_out = reinterpret_cast<int32_t*>(host + runs_at);
  const int64_t n_tasks = static_cast<int64_t>(misses.size()) + H;
  arena.execute([&] {
    tbb::parallel_for(int64_t{0}, n_tasks, [&](int64_t task) {
      if (task >= static_cast<int64_t>(misses.size())) {
        const int h = static_cast<int>(task - static_cast<int64_t>(misses.size()));
        int32_t* r = run_out + 3 * run_at[h];
        for (std::size_t i = 0; i < runs[h].size(); i += 3) {
          r[i] = runs[h][i];
          r[i + 1] = runs[h][i + 1] + offsets[h];
          r[i + 2] = runs[h][i + 2];
        }
        return;
      }
      const Miss& x = misses[task];
      const auto& store = cold.store(x.g);
      const int64_t at = miss_at[task];
      // Cluster-contiguous store: a group is one contiguous read.
      const std::size_t bytes = static_cast<std::size_t>(x.rows) * rb;
      std::memcpy(host + at * rb, store.key(x.begin), bytes);
      std::memcpy(host + kv_bytes + at * rb, store.value(x.begin), bytes);
      for (int32_t j = 0; j < x.rows; ++j) dst_rows[at + j] = PoolRow(x.pool_page0, *x.pages, j);
    });
  });
  std::memcpy(host + off_at, offsets.data(), offsets.size() * 4);

  // 3. Upload, scatter the misses into their pages, expand the runs, attend every q head's rows.
  KVRT_ASSIGN_OR_RETURN(void* dev_ptr, transfer::MallocAsync(total, stream));
  auto* dev = static_cast<unsigned char*>(dev_ptr);
  auto* row_ids = reinterpret_cast<int32_t*>(dev + upload);
  absl::Status st = transfer::MemcpyAsync(dev, host, upload, stream);
  if (st.ok()) st = done_.Record(stream);
  if (st.ok() && miss_rows > 0)
    st = gpu::ScatterRows(dev, dev + kv_bytes, pool_k_.data(), pool_v_.data(),
                          reinterpret_cast<const int32_t*>(dev + dst_at), miss_rows, rb, stream);
  if (st.ok())
    st = gpu::ExpandRowRuns(reinterpret_cast<const int32_t*>(dev + runs_at), run_at[H], row_ids,
                            stream);
  if (st.ok()) {
    gpu::GatherBatch batch;
    batch.k = pool_k_.data();
    batch.v = pool_v_.data();
    batch.row_offsets = reinterpret_cast<const int32_t*>(dev + off_at);
    batch.row_ids = row_ids;
    batch.rows_q = H;
    batch.max_rows = max_rows;
    batch.head_dim = d;
    batch.dtype = cfg_->dtype;
    st = gpu::GatherAttend(batch, q_dev, q_is_f32, cfg_->scale, 0, o, lse, nullptr, stream);
  }
  counters_->hot_h2d_bytes += static_cast<int64_t>(2 * kv_bytes);
  const absl::Status freed = transfer::FreeAsync(dev_ptr, stream);
  counters_->time_hot_cache_ns += NowNs() - t0;
  return st.ok() ? freed : st;
}

void DeviceHotCache::Release() {
  (void)done_.Synchronize();
  counters_->gpu_allocated_bytes -= counted_bytes_;
  counters_->hot_cache_gpu_bytes -= counted_bytes_;
  counted_bytes_ = 0;
  pool_k_.Reset();
  pool_v_.Reset();
  maps_.clear();
  pages_per_head_ = 0;
}

}  // namespace kvrt::runtime
