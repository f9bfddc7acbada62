#include "direct_step.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "align.h"
#include "device_hot_cache.h"
#include "device_tier.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/kind_table.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

constexpr int kBlock = gpu::kDirectBlockRows;

// The step record (rec_): mask [G, C] uint32, then at this offset the read counts int64 [2].
std::size_t RecReadAt(int G, int C) { return Align16(static_cast<std::size_t>(G) * C * 4); }
// Then the stage's count (uint32, 8 bytes kept) and its rows (int64 [stage cap]).
std::size_t RecStageAt(int G, int C) { return RecReadAt(G, C) + 2 * sizeof(int64_t); }
std::size_t RecStageRowsAt(int G, int C) { return RecStageAt(G, C) + sizeof(int64_t); }

// The device view arrays (view_dev_): [store_k G | store_v G | tail_begin G (int64) |
// cluster_begin G*C | extra G*E], one layout for the upload and the view over it.
struct ViewLayout {
  std::size_t tail_at, begin_at, extra_at, bytes;
  ViewLayout(int G, int C, std::size_t E)
      : tail_at(2 * G * sizeof(void*)),
        begin_at(tail_at + G * sizeof(int64_t)),
        extra_at(begin_at + static_cast<std::size_t>(G) * C * 4),
        bytes(Align16(extra_at + std::max<std::size_t>(1, G * E) * 4)) {}
};

}  // namespace

std::unique_ptr<BlockPageCache> DirectStep::NewPolicy(int64_t pages_per_head) const {
  // A block gets a page at its first miss, with no bound per step: its rows are filled from the
  // stage (the rows the step read over PCIe anyway), so an admission costs no PCIe, and neither
  // the second chance nor the bound that spared the bus pays any more (the page-pool simulation
  // of cluster_eval on real and generated traces: docs/benchmarks.md, eleventh session).
  return std::make_unique<BlockPageCache>(cfg_->num_kv_heads, pages_per_head, /*admit_after=*/1,
                                          /*max_admit_per_step=*/0);
}

void DirectStep::ResetStage() {
  stage_k_.Reset();
  stage_v_.Reset();
  stage_row_.Reset();
  stage_count_.Reset();
  stage_cap_ = 0;
}

std::size_t DirectStep::row_bytes() const {
  return static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
}

bool DirectStep::Enabled() {
  if (!cfg_->direct_step || off_ || cfg_->hot_cache_fraction <= 0.f ||
      !cpu_index::KindInfo(cfg_->index_kind).estimates || !cfg_->index.cluster.gpu_select)
    return false;
  if (cfg_->num_q_heads / cfg_->num_kv_heads > gpu::kDirectMaxGroup) {
    off_ = true;  // more q heads per kv head than the mask holds
    return false;
  }
  return true;
}

bool DirectStep::RegisterAhead(const ColdTier& cold, int64_t rows, void* stream) {
  if (!Enabled() || rows <= 0 || rows > cold.store(0).capacity()) return false;
  if (!admission_.Wait().ok()) return false;  // Prepare meets (and reports) it
  return Register(cold, stream, rows) && transfer::StreamSynchronize(stream).ok();
}

bool DirectStep::Prepare(const ColdTier& cold, void* stream) {
  if (!Enabled()) return false;
  if (cold.rows() == 0) return false;
  // The admission job uses the pool and the policy that FitPool may replace. (Its fill is ordered
  // on the device, by BeginStep: the host does not wait for it here.)
  if (!admission_.Wait().ok()) {
    off_ = true;
    return false;
  }
  if (!Register(cold, stream, cold.rows())) return false;
  return FitPool(cold, stream);
}

bool DirectStep::Register(const ColdTier& cold, void* stream, int64_t rows) {
  const int G = cfg_->num_kv_heads;
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t capacity = cold.store(0).capacity();
  bool moved = regs_k_.empty() || capacity != reg_capacity_;
  for (int g = 0; !moved && g < G; ++g)
    moved = regs_k_[g].base != cold.store(g).keys() || regs_v_[g].base != cold.store(g).values();
  if (moved) {
    regs_k_.clear();
    regs_v_.clear();
    regs_k_.resize(G);
    regs_v_.resize(G);
    reg_rows_ = 0;
    reg_capacity_ = capacity;
    view_dirty_ = true;
  }
  if (absl::Status st = ExtendLocked(cold, rows); !st.ok()) {
    regs_k_.clear();
    regs_v_.clear();
    off_ = true;
    return false;
  }
  // The table covers every block the registered stores can hold.
  const int64_t blocks = (capacity + kBlock - 1) / kBlock;
  if (blocks > blocks_per_head_) {
    auto t = transfer::DeviceBuffer::Allocate(static_cast<std::size_t>(blocks) * G * 4);
    if (!t.ok()) {
      off_ = true;
      return false;
    }
    counters_->gpu_allocated_bytes += static_cast<int64_t>(t->size() - table_.size());
    counters_->hot_cache_gpu_bytes += static_cast<int64_t>(t->size() - table_.size());
    counted_bytes_ += static_cast<int64_t>(t->size() - table_.size());
    table_ = std::move(*t);
    blocks_per_head_ = blocks;
    // The new table starts empty, so the policy does too.
    if (cache_) cache_ = NewPolicy(cache_->pages_per_head());
    if (!UploadTable(stream).ok()) {
      off_ = true;
      return false;
    }
  }
  return true;
}

bool DirectStep::RegisteredUpTo(const ColdTier& cold, int64_t rows) {
  std::lock_guard<std::mutex> lock(mu_);
  if (regs_k_.empty() || reg_rows_ < rows || cold.store(0).capacity() != reg_capacity_)
    return false;
  for (int g = 0; g < cfg_->num_kv_heads; ++g)
    if (regs_k_[g].base != cold.store(g).keys() || regs_v_[g].base != cold.store(g).values())
      return false;
  return true;
}

void DirectStep::BeforeSummaryChanges() {
  admission_.Join();
  if (fill_pending_) (void)filled_.Synchronize();  // the penalty kernel is before filled_
}

absl::Status DirectStep::Quiesce() {
  const absl::Status st = admission_.Wait();
  if (fill_pending_) (void)filled_.Synchronize();  // a failed fill surfaces at the next launch
  return st;
}

absl::Status DirectStep::ExtendLocked(const ColdTier& cold, int64_t rows) {
  if (rows <= reg_rows_ && reg_rows_ > 0) return absl::OkStatus();
  // Registered a chunk at a time, a chunk ahead of the rows: registering pins the pages, so the
  // untouched capacity of a store (room for the decode tokens to come) is neither faulted in nor
  // pinned before it is used, and growing within the capacity never registers a row twice.
  const std::size_t rb = row_bytes();
  const int64_t chunk = static_cast<int64_t>(kRegisterChunkBytes / rb);  // page-aligned starts
  const int64_t target = std::min(reg_capacity_, (rows + chunk + chunk - 1) / chunk * chunk);
  if (target <= reg_rows_) return absl::OkStatus();
  const int64_t t0 = NowNs();
  const std::size_t at = static_cast<std::size_t>(reg_rows_) * rb;
  const std::size_t bytes = static_cast<std::size_t>(target - reg_rows_) * rb;
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    for (auto [regs, base] : {std::pair{&regs_k_[g], cold.store(g).keys()},
                              std::pair{&regs_v_[g], cold.store(g).values()}}) {
      const auto* p = static_cast<const unsigned char*>(base) + at;
      // Writable for the device: a prompt's rows are copied from it straight into the registered
      // stores (DeviceTier::CopyIntoStores).
      KVRT_ASSIGN_OR_RETURN(transfer::HostRegistration r,
                            transfer::HostRegistration::Register(p, bytes, /*device_writes=*/true));
      // Kernels index one pointer across every chunk: it must be the host address.
      if (r.device() != r.host())
        return absl::FailedPreconditionError(
            "the device maps registered host memory at another address");
      regs->base = base;
      regs->chunks.push_back(std::move(r));
    }
  }
  reg_rows_ = target;
  counters_->time_hot_cache_ns += NowNs() - t0;
  return absl::OkStatus();
}

void DirectStep::DropRegistrations() {
  (void)Quiesce();
  std::lock_guard<std::mutex> lock(mu_);
  regs_k_.clear();
  regs_v_.clear();
  reg_rows_ = 0;
}

namespace {
// The cold rows past the index's last full segment (the most of any kv head, at most a segment):
// every step attends them whole, so the pool has room for them on top of its share of the cold
// rows. Without it a prompt whose cold part is not whole segments (any real one) read up to a
// segment's rows per kv head over PCIe at every step once they outgrew the pool: 16 MB per
// member and layer-step at 32K (thirty-third session, docs/benchmarks.md).
int64_t UnclusteredRows(const ColdTier& cold, int kv_heads, int64_t segment_tokens) {
  int64_t most = 0;
  for (int g = 0; g < kv_heads; ++g) most = std::max(most, cold.rows() - cold.covered_rows(g));
  return std::min(most, segment_tokens);
}
}  // namespace

bool DirectStep::FitPool(const ColdTier& cold, void* stream) {
  const int G = cfg_->num_kv_heads;
  const int64_t tail = UnclusteredRows(cold, G, cfg_->index.cluster.segment_tokens);
  const int64_t want =
      HotPoolPages(*cfg_, cold.rows(), kBlock) + (tail + kBlock - 1) / kBlock;  // per head
  if (!HotPoolOutgrown(want, cache_ ? cache_->pages_per_head() : 0)) return true;
  // (Re)allocated empty: a rare event, the pool grows with the cold tier a quarter at a time.
  if (cache_) {
    (void)Quiesce();                            // the last fill writes the pool
    (void)transfer::StreamSynchronize(stream);  // the last step still reads it
  }
  const std::size_t bytes = static_cast<std::size_t>(want) * G * kBlock * row_bytes();
  const int64_t pool_before =
      static_cast<int64_t>(pool_k_.size() + pool_v_.size() + stage_k_.size() + stage_v_.size() +
                           stage_row_.size() + stage_count_.size());
  pool_k_.Reset();
  pool_v_.Reset();
  ResetStage();
  counters_->gpu_allocated_bytes -= pool_before;
  counters_->hot_cache_gpu_bytes -= pool_before;
  counted_bytes_ -= pool_before;
  cache_.reset();
  const int64_t limit = cfg_->gpu_memory_limit;
  auto fail = [&] {
    off_ = true;
    return false;
  };
  if (want * G >= gpu::kStagedPageMask) return fail();  // a table entry's page bits
  // The stage holds a step's rows read over PCIe, up to a quarter of the pool's rows (past that
  // a step's misses are not staged: their blocks fill at a later step).
  const int64_t cap = std::max<int64_t>(1, want * G * kBlock / 4);
  const std::size_t stage_bytes = static_cast<std::size_t>(cap) * row_bytes();
  const std::size_t total = 2 * bytes + 2 * stage_bytes + cap * sizeof(int64_t) + sizeof(uint32_t);
  if (limit > 0 && counters_->gpu_allocated_bytes.load() + static_cast<int64_t>(total) > limit)
    return fail();
  auto k = transfer::DeviceBuffer::Allocate(bytes);
  auto v = k.ok() ? transfer::DeviceBuffer::Allocate(bytes) : k.status();
  auto sk = v.ok() ? transfer::DeviceBuffer::Allocate(stage_bytes) : v.status();
  auto sv = sk.ok() ? transfer::DeviceBuffer::Allocate(stage_bytes) : sk.status();
  auto sr = sv.ok() ? transfer::DeviceBuffer::Allocate(cap * sizeof(int64_t)) : sv.status();
  // The count, then CommitStaged's CTA counter (gpu::DirectRowsView::stage_commits).
  auto sc = sr.ok() ? transfer::DeviceBuffer::Allocate(2 * sizeof(uint32_t)) : sr.status();
  if (!sc.ok()) return fail();
  pool_k_ = std::move(*k);
  pool_v_ = std::move(*v);
  stage_k_ = std::move(*sk);
  stage_v_ = std::move(*sv);
  stage_row_ = std::move(*sr);
  stage_count_ = std::move(*sc);
  stage_cap_ = cap;
  counters_->gpu_allocated_bytes += static_cast<int64_t>(total);
  counters_->hot_cache_gpu_bytes += static_cast<int64_t>(total);
  counted_bytes_ += static_cast<int64_t>(total);
  if (!transfer::MemsetAsync(stage_count_.data(), 0, stage_count_.size(), stream).ok())
    return fail();
  cache_ = NewPolicy(want);
  if (!UploadTable(stream).ok()) return fail();
  return true;
}

absl::Status DirectStep::UploadTable(void* stream) {
  // Every block without a page: -1 is all bits set.
  return transfer::MemsetAsync(table_.data(), 0xff, table_.size(), stream);
}

absl::Status DirectStep::UploadView(const ColdTier& cold, int C, void* stream) {
  const int G = cfg_->num_kv_heads;
  if (!view_dirty_ && version_ == cold.index_version() && view_c_ == C) return absl::OkStatus();
  tail_begin_.assign(G, 0);
  extra_rows_.assign(G, {});
  std::size_t E = 0;
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    tail_begin_[g] = cold.covered_rows(g);
    auto& ex = extra_rows_[g];
    ex.assign(s.outliers.begin(), s.outliers.end());
    // NaN/Inf rows are attended whatever is selected, so that their NaN reaches the output (one in
    // a selected cluster is attended twice, which leaves the output NaN all the same).
    for (int64_t r : cold.store(g).nonfinite_rows())
      if (r < tail_begin_[g] &&
          std::find(s.outliers.begin(), s.outliers.end(), r) == s.outliers.end())
        ex.push_back(static_cast<int32_t>(r));
    E = std::max(E, ex.size());
  }
  const ViewLayout at(G, C, E);
  const std::size_t bytes = at.bytes;
  view_host_.assign(bytes, 0);
  auto* ptrs = reinterpret_cast<const void**>(view_host_.data());
  for (int g = 0; g < G; ++g) {
    ptrs[g] = regs_k_[g].base;  // registered host memory: the same address on the device
    ptrs[G + g] = regs_v_[g].base;
  }
  std::memcpy(view_host_.data() + at.tail_at, tail_begin_.data(), G * sizeof(int64_t));
  auto* begin = reinterpret_cast<int32_t*>(view_host_.data() + at.begin_at);
  auto* extra = reinterpret_cast<int32_t*>(view_host_.data() + at.extra_at);
  clusters_host_.assign(static_cast<std::size_t>(G) * C, ClusterRows{});
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    for (int c = 0; c < C; ++c) {
      const bool real = c < s.num_clusters();  // padding: begin 0, size 0
      const std::size_t at = static_cast<std::size_t>(g) * C + c;
      if (real) clusters_host_[at] = {static_cast<int32_t>(s.begin[c]), s.size[c]};
      begin[at] = clusters_host_[at].begin;
    }
    for (std::size_t e = 0; e < E; ++e)
      extra[g * E + e] = e < extra_rows_[g].size() ? extra_rows_[g][e] : -1;
  }
  // Counted in gpu_allocated_bytes as the step's other buffers (it was not, before 0.3.37: ~3 MiB
  // per layer at 1M tokens and 8 kv heads).
  if (view_dev_.size() < bytes) KVRT_RETURN_IF_ERROR(Regrow(view_dev_, bytes + bytes / 2));
  // NOTE: view_host_ is a member: a pageable H2D may read its source after the call returns.
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(view_dev_.data(), view_host_.data(), bytes, stream));
  view_c_ = C;
  view_e_ = static_cast<int>(E);
  view_dirty_ = false;
  return absl::OkStatus();
}

gpu::DirectRowsView DirectStep::View(int64_t rows) const {
  const int G = cfg_->num_kv_heads;
  auto* base = static_cast<unsigned char*>(view_dev_.data());
  const ViewLayout at(G, view_c_, static_cast<std::size_t>(view_e_));
  gpu::DirectRowsView v;
  v.kv_heads = G;
  v.q_heads = cfg_->num_q_heads;
  v.head_dim = cfg_->head_dim;
  v.dtype = cfg_->dtype;
  v.rows = rows;
  v.store_k = reinterpret_cast<const void* const*>(base);
  v.store_v = reinterpret_cast<const void* const*>(base) + G;
  v.block_page = static_cast<int32_t*>(table_.data());
  v.blocks_per_head = blocks_per_head_;
  v.pool_k = pool_k_.data();
  v.pool_v = pool_v_.data();
  v.pages = cache_->pages_per_head() * G;
  v.num_clusters = view_c_;
  v.num_extra = view_e_;
  v.tail_begin = reinterpret_cast<const int64_t*>(base + at.tail_at);
  v.cluster_begin = reinterpret_cast<const int32_t*>(base + at.begin_at);
  v.cluster_size = cluster_size_;
  v.extra = view_e_ > 0 ? reinterpret_cast<const int32_t*>(base + at.extra_at) : nullptr;
  v.staged_pages = true;
  v.stage_k = stage_k_.data();
  v.stage_v = stage_v_.data();
  v.stage_row = static_cast<int64_t*>(stage_row_.data());
  v.stage_count = static_cast<uint32_t*>(stage_count_.data());
  v.stage_commits = v.stage_count + 1;
  v.stage_cap = stage_cap_;
  return v;
}

template <typename Fn>
void DirectStep::ForEachEveryStepBlock(int g, int64_t rows, Fn&& fn) const {
  for (int64_t b = tail_begin_[g] / kBlock; b < (rows + kBlock - 1) / kBlock; ++b) fn(b);
  for (int32_t r : extra_rows_[g]) fn(static_cast<int64_t>(r) / kBlock);
}

absl::Status DirectStep::Regrow(transfer::DeviceBuffer& buf, std::size_t bytes) {
  const auto before = static_cast<int64_t>(buf.size());
  buf.Reset();
  counters_->gpu_allocated_bytes -= before;
  counters_->hot_cache_gpu_bytes -= before;
  counted_bytes_ -= before;
  KVRT_ASSIGN_OR_RETURN(buf, transfer::DeviceBuffer::Allocate(bytes));
  counters_->gpu_allocated_bytes += static_cast<int64_t>(bytes);
  counters_->hot_cache_gpu_bytes += static_cast<int64_t>(bytes);
  counted_bytes_ += static_cast<int64_t>(bytes);
  return absl::OkStatus();
}

absl::Status DirectStep::EnsureStepBuffers(int C, void* stream) {
  const int G = cfg_->num_kv_heads;
  const std::size_t rec_bytes =
      RecStageRowsAt(G, C) + static_cast<std::size_t>(stage_cap_) * sizeof(int64_t);
  if (read_rows_dev_.empty()) {
    KVRT_ASSIGN_OR_RETURN(read_rows_dev_, transfer::DeviceBuffer::Allocate(2 * sizeof(int64_t)));
    KVRT_RETURN_IF_ERROR(
        transfer::MemsetAsync(read_rows_dev_.data(), 0, read_rows_dev_.size(), stream));
  }
  if (rec_ready_.empty()) {
    KVRT_ASSIGN_OR_RETURN(rec_ready_, transfer::Event::Create(false));
    KVRT_ASSIGN_OR_RETURN(attended_, transfer::Event::Create(false));
  }
  if (rec_.size() < rec_bytes) {
    rec_ = transfer::PinnedBlock();
    KVRT_ASSIGN_OR_RETURN(rec_, ctx_->pinned().Acquire(rec_bytes + rec_bytes / 2));
  }
  const std::size_t mask_bytes = static_cast<std::size_t>(G) * C * sizeof(uint32_t);
  // NOTE: a step may still read the old mask (a new segment grew C): freeing it waits for the
  // device, once per growth.
  if (mask_dev_.size() < mask_bytes)
    KVRT_RETURN_IF_ERROR(Regrow(mask_dev_, mask_bytes + mask_bytes / 4));
  return absl::OkStatus();
}

absl::Status DirectStep::RefreshView(const ColdTier& cold, int C, void* stream) {
  if (version_ != cold.index_version()) {
    for (int g = 0; g < cfg_->num_kv_heads && !tail_begin_.empty(); ++g)
      cache_->DropFrom(g, tail_begin_[g] / kBlock);
    view_dirty_ = true;
    // Staged rows that no commit took (an admission job that failed) may name rows the new
    // version moved: the stage starts empty.
    if (!stage_count_.empty())
      KVRT_RETURN_IF_ERROR(
          transfer::MemsetAsync(stage_count_.data(), 0, stage_count_.size(), stream));
  }
  KVRT_RETURN_IF_ERROR(UploadView(cold, C, stream));
  version_ = cold.index_version();
  return absl::OkStatus();
}

absl::Status DirectStep::Warm(const ColdTier& cold, int C, void* stream) {
  if (!Enabled() || !cache_ || !registered()) return absl::OkStatus();
  const int64_t t0 = NowNs();
  absl::Status st = admission_.Wait();
  // A failure here costs the first step its time, not its result: the launches load them anyway.
  (void)gpu::PreloadDirectStepKernels(cfg_->dtype, cfg_->head_dim, cfg_->num_q_heads,
                                      cfg_->num_kv_heads);
  if (st.ok()) st = EnsureStepBuffers(C, stream);
  if (st.ok()) st = RefreshView(cold, C, stream);
  int64_t hits = 0, admitted = 0;
  if (st.ok()) {
    // The first decode step would read these blocks over PCIe, and its admission would copy them
    // in whole (the eager blocks of Admit) for the second; here the copies overlap the caller's
    // next layer instead.
    const int64_t rows = cold.rows(), full_blocks = rows / kBlock;
    cache_->NextStep();
    eager_.clear();
    for (int g = 0; g < cfg_->num_kv_heads; ++g)
      ForEachEveryStepBlock(g, rows, [&](int64_t b) {
        if (cache_->Use(g, b, b < full_blocks)) {
          ++hits;
        } else if (cache_->page(g, b) >= 0) {
          eager_.insert(g * blocks_per_head_ + b);
          ++admitted;
        }
      });
    st = ApplyUpdates(rows, stream, nullptr, false);
    eager_.clear();
  }
  if (!st.ok()) {
    off_ = true;  // the table and the policy may disagree: the CPU-ordered path from now on
    return st;
  }
  counters_->hot_hits += hits;
  counters_->hot_misses += admitted;
  counters_->hot_h2d_bytes += admitted * kBlock * 2 * static_cast<int64_t>(row_bytes());
  counters_->time_hot_cache_ns += NowNs() - t0;
  return absl::OkStatus();
}

void DirectStep::Admit() {
  const int G = cfg_->num_kv_heads, group = cfg_->num_q_heads / G;
  const int C = rec_c_;
  const auto* mask = static_cast<const uint32_t*>(rec_.data());
  const auto* read = reinterpret_cast<const int64_t*>(
      static_cast<const unsigned char*>(rec_.data()) + RecReadAt(G, C));
  // read[1]: rows read over PCIe so far (cumulative on the device; read[0] counts pool rows).
  counters_->direct_host_bytes +=
      (read[1] - host_rows_seen_) * 2 * static_cast<int64_t>(row_bytes());
  host_rows_seen_ = read[1];
  const int64_t full_blocks = rec_rows_ / kBlock;  // a partial block is never given a page
  int64_t hits = 0, admitted = 0, copied = 0, attended = 0;
  // The blocks whose rows the step staged (a stamp per block for this call).
  const std::size_t marks = static_cast<std::size_t>(G) * blocks_per_head_;
  if (staged_mark_.size() != marks || ++mark_round_ == 0) {
    staged_mark_.assign(marks, 0);
    mark_round_ = 1;
  }
  {
    const auto* base = static_cast<const unsigned char*>(rec_.data());
    uint32_t n = 0;
    std::memcpy(&n, base + RecStageAt(G, C), sizeof(n));
    const auto* ids = reinterpret_cast<const int64_t*>(base + RecStageRowsAt(G, C));
    for (int64_t i = 0; i < std::min<int64_t>(n, rec_stage_cap_); ++i) {
      const int64_t g = ids[i] >> 32, b = (ids[i] & 0xffffffff) / kBlock;
      if (g >= 0 && g < G && b < blocks_per_head_)
        staged_mark_[g * blocks_per_head_ + b] = mark_round_;
    }
  }
  cache_->NextStep();
  eager_.clear();
  // Per kv head (the policy's heads are independent); one task per head where the mask is large:
  // at 1M (8 x 65 536 clusters) the loop took milliseconds per layer-step on one worker, and the
  // layer's next step waits for it (BeginStep).
  tally_.resize(G);
  for (AdmitTally& t : tally_) {
    t.hits = t.admitted = t.copied = t.attended = 0;
    t.eager.clear();
    t.missed_every.clear();
    t.missed_selected.clear();
  }
  auto admit_head = [&](int g) {
    timeline::Span scan_span("admit_scan", g);
    AdmitTally& t = tally_[g];
    // Two passes: the step's hits are marked before any admission, so that no admission takes
    // the page of a block this step used (CLOCK skips the pages a step marked). The blocks are
    // gathered first and marked in one call (BlockPageCache::UseHeld loads their table entries
    // ahead).
    // The unclustered tail and the extra rows first: every q head attends them at every step
    // until the next segment is clustered, so they have the first claim on the step's admissions
    // (bounded per step) and on the pages (a step refuses once its own blocks hold them all). The
    // selected clusters' blocks, which change from step to step, took that claim before, and the
    // tail (up to a segment of rows per head) crossed PCIe at every step: 58.7 MB per layer-step
    // end to end at 128K (docs/benchmarks.md, fifth session).
    std::vector<int64_t>& blocks = t.blocks;
    blocks.clear();
    ForEachEveryStepBlock(g, rec_rows_, [&](int64_t b) { blocks.push_back(b); });
    t.hits += cache_->UseHeld(g, blocks.data(), blocks.size(), &t.missed_every);
    blocks.clear();
    const std::size_t at = static_cast<std::size_t>(g) * C;
    for (int c = 0; c < C; ++c) {
      // Most clusters are not chosen: their mask word alone is read (the sizes and beginnings of
      // 64 members' layers do not stay in cache).
      const uint32_t m = mask[at + c];
      if (m == 0) continue;
      const auto [b0, n] = clusters_host_[at + c];
      if (n == 0) continue;
      t.attended += static_cast<int64_t>(std::popcount(m)) * n;
      for (int64_t b = b0 / kBlock; b <= (b0 + n - 1) / kBlock; ++b) blocks.push_back(b);
    }
    t.hits += cache_->UseHeld(g, blocks.data(), blocks.size(), &t.missed_selected);
    t.attended += group * (static_cast<int64_t>(extra_rows_[g].size()) +
                           std::max<int64_t>(0, rec_rows_ - tail_begin_[g]));
    scan_span.End();
    timeline::Span admit_span("admit_misses", g);
    // In the order of use: the tail and the extra rows first (see above). Their blocks are
    // copied in whole (every step reads them: they should not wait for the stage, which a step
    // with many misses fills before it reaches them); a selected cluster's block gets a page only
    // with rows in the stage (CommitStaged fills it from there, no second PCIe read).
    auto admit = [&](int64_t b, bool every) {
      if (cache_->page(g, b) >= 0) return;  // a block used twice in the step: admitted above
      if (!every && staged_mark_[g * blocks_per_head_ + b] != mark_round_) return;
      (void)cache_->Use(g, b, b < full_blocks);
      if (cache_->page(g, b) < 0) return;
      ++t.admitted;
      if (every) {
        t.eager.push_back(g * blocks_per_head_ + b);
        ++t.copied;
      }
    };
    for (int64_t b : t.missed_every) admit(b, true);
    for (int64_t b : t.missed_selected) admit(b, false);
  };
  constexpr int64_t kParallelMaskWords = 65536;
  if (G > 1 && static_cast<int64_t>(G) * C >= kParallelMaskWords)
    tbb::parallel_for(0, G, admit_head);
  else
    for (int g = 0; g < G; ++g) admit_head(g);
  for (const AdmitTally& t : tally_) {
    hits += t.hits;
    admitted += t.admitted;
    copied += t.copied;
    attended += t.attended;
    eager_.insert(t.eager.begin(), t.eager.end());
  }
  counters_->hot_hits += hits;
  counters_->hot_misses += admitted;
  counters_->hot_h2d_bytes += copied * kBlock * 2 * static_cast<int64_t>(row_bytes());
  if (!rec_counted_) counters_->cold_tokens_attended += attended;
}

absl::Status DirectStep::AdmitAndFill(bool record_done) {
  transfer::CudaCallScope on_device(cfg_->call_device());  // an arena worker runs the job
  KVRT_SPAN("admission_job");
  timeline::Span wait_span("admission_record_wait");
  // Run by the record stream's callback, the record is on the host (no event wait: a driver
  // call fewer per member and step).
  if (!record_done) KVRT_RETURN_IF_ERROR(rec_ready_.Synchronize());
  rec_on_host_.store(true, std::memory_order_release);
  if (updates_before_record_) updates_.Done();
  wait_span.End();
  const int64_t t0 = NowNs();
  {
    // Half a chunk from the registered end: the next chunk is registered here, off the decode
    // path, before a step needs it.
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t chunk = static_cast<int64_t>(kRegisterChunkBytes / row_bytes());
    if (!regs_k_.empty() && rec_rows_ + chunk / 2 > reg_rows_)
      KVRT_RETURN_IF_ERROR(ExtendLocked(*rec_cold_, rec_rows_ + chunk / 2));
  }
  timeline::Span admit_span("admit");
  Admit();
  admit_span.End();
  timeline::Span fill_span("admit_fill");
  // NOTE: the step that read the pages this fill may overwrite is complete (rec_ready_ follows
  // its attend), and the next step's stream waits for filled_ before it reads the pool.
  KVRT_ASSIGN_OR_RETURN(void* aside, ctx_->AcquireStream());
  absl::Status st = ApplyUpdates(rec_rows_, aside, &filled_, true);
  // The rows the step read over PCIe go into the pages their blocks hold now (also those given
  // just above); the stage is then free for the next step, which waits for filled_.
  if (st.ok()) st = gpu::CommitStaged(View(rec_rows_), aside);
  // Residency-aware selection: the next step's offsets from the table as this fill leaves it,
  // here rather than on the next step's path (PenaltyOffsets).
  offsets_version_ = -1;
  const cpu_index::ClusterConfig& cc = cfg_->index.cluster;
  const int G = cfg_->num_kv_heads;
  if (st.ok() && cc.miss_penalty > 0.f && cc.group_select && cfg_->num_q_heads > G && view_c_ > 0) {
    const std::size_t bytes = static_cast<std::size_t>(G) * view_c_ * sizeof(float);
    if (offsets_dev_.size() < bytes) st = Regrow(offsets_dev_, bytes);
    if (st.ok())
      st = gpu::MissPenaltyOffsets(View(rec_rows_), cc.miss_penalty,
                                   static_cast<float*>(offsets_dev_.data()), aside);
    if (st.ok()) {
      offsets_version_ = version_;
      offsets_c_ = view_c_;
    }
  }
  if (st.ok()) st = filled_.Record(aside);
  // filled_ not recorded: the staging waits for an event of its own instead.
  if (!st.ok()) {
    updates_before_record_ = false;
    (void)updates_.Sent(aside);
  }
  ctx_->ReleaseStream(aside);
  fill_pending_ = st.ok();
  fill_waited_by_ = nullptr;
  counters_->time_hot_cache_ns += NowNs() - t0;
  return st;
}

absl::Status DirectStep::ApplyUpdates(int64_t rows, void* stream, const transfer::Event* after,
                                      bool before_record) {
  const std::vector<BlockPageCache::Update> ups = cache_->TakeUpdates();
  if (ups.empty()) return absl::OkStatus();
  const std::size_t bytes = 2 * ups.size() * sizeof(int32_t);
  KVRT_ASSIGN_OR_RETURN(void* staged, updates_.Stage(ctx_->pinned(), bytes));
  auto* host = static_cast<int32_t*>(staged);
  for (std::size_t i = 0; i < ups.size(); ++i) {
    const int64_t idx = ups[i].kv_head * blocks_per_head_ + ups[i].block;
    host[2 * i] = static_cast<int32_t>(idx);
    host[2 * i + 1] =
        ups[i].page >= 0 && eager_.contains(idx) ? ups[i].page | gpu::kFillPagesCopy : ups[i].page;
  }
  // The kernel reads the list from the pinned staging itself (mapped, a few KiB): no device
  // copy, allocation and free: three driver calls fewer per member and step. The staging stays
  // taken until the kernel is done (Sent, or the caller's event after it: SentBefore).
  absl::Status st = gpu::FillPages(View(rows), static_cast<const int32_t*>(host),
                                   static_cast<int>(ups.size()), stream);
  if (st.ok() && after != nullptr) {
    updates_.SentBefore(after);
  } else if (st.ok()) {
    st = updates_.Sent(stream);
  }
  updates_before_record_ = before_record;
  // NOTE: staged pages: only the eager blocks (the tail, the extra rows) cross PCIe here, counted
  // in hot_h2d_bytes by Admit; the others are only assigned.
  return st;
}

std::vector<int64_t> DirectStep::RecordedRows(const ColdTier& cold, int h) const {
  const int G = cfg_->num_kv_heads, group = cfg_->num_q_heads / G, g = h / group;
  const auto* mask = static_cast<const uint32_t*>(rec_.data());
  const cpu_index::ClusterSummary& s = *cold.summary(g);
  std::vector<int64_t> rows;
  for (int c = 0; c < std::min(rec_c_, static_cast<int>(s.num_clusters())); ++c)
    if (mask[static_cast<std::size_t>(g) * rec_c_ + c] >> (h % group) & 1u)
      for (int64_t r = s.begin[c]; r < s.begin[c] + s.size[c]; ++r) rows.push_back(r);
  rows.insert(rows.end(), extra_rows_[g].begin(), extra_rows_[g].end());
  for (int64_t r = tail_begin_[g]; r < rec_rows_; ++r) rows.push_back(r);
  return rows;
}

absl::Status DirectStep::BeginStep(const ColdTier& cold, int C, const int32_t* cluster_size,
                                   void* stream) {
  const int64_t t0 = NowNs();
  timeline::Span wait_span("admission_wait");
  KVRT_RETURN_IF_ERROR(admission_.Wait());  // done by now, unless the host runs far ahead
  wait_span.End();
  cluster_size_ = cluster_size;
  // Everything below (a new view, page drops, the attend) comes after the last fill.
  if (fill_pending_ && fill_waited_by_ != stream)
    KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(stream, filled_));
  fill_pending_ = false;
  fill_waited_by_ = nullptr;
  // A new index version: its page drops are applied here, on the step's stream.
  KVRT_RETURN_IF_ERROR(RefreshView(cold, C, stream));
  KVRT_RETURN_IF_ERROR(ApplyUpdates(rec_rows_, stream, nullptr, true));
  counters_->time_hot_cache_ns += NowNs() - t0;
  return absl::OkStatus();
}

const float* DirectStep::PenaltyOffsets(const ColdTier& cold, int C, void* stream) {
  // The last admission job writes the offsets, the fill's event and its flags: a host that ran
  // ahead of it (a pipelined decoder) waits for it here, before BeginStep would.
  admission_.Join();
  if (offsets_version_ != cold.index_version() || offsets_c_ != C) return nullptr;
  // The job's fill wrote the table the offsets were computed from, and the offsets after it.
  if (fill_pending_ && fill_waited_by_ != stream) {
    if (!transfer::StreamWaitEvent(stream, filled_).ok()) return nullptr;
    fill_waited_by_ = stream;  // BeginStep's wait on this stream is then done
  }
  return static_cast<const float*>(offsets_dev_.data());
}

absl::Status DirectStep::WaitForRecord(void* stream) {
  if (rec_on_host_.load(std::memory_order_acquire)) return absl::OkStatus();
  return transfer::StreamWaitEvent(stream, rec_ready_);
}

uint32_t* DirectStep::SelectionMask(int C, void* stream) {
  admission_.Join();  // it reads the record, which EnsureStepBuffers may reallocate
  if (!EnsureStepBuffers(C, stream).ok() || !WaitForRecord(stream).ok()) return nullptr;
  return static_cast<uint32_t*>(mask_dev_.data());
}

absl::Status DirectStep::Attend(const ColdTier& cold, int64_t rows, const int32_t* selected,
                                const int32_t* count, bool mask_written, bool in_batch,
                                const float* q, float* o, float* lse, int max_states, int* states,
                                void* stream, tbb::task_arena& arena, ColdSelection* sel) {
  const int64_t t0 = NowNs();
  const int G = cfg_->num_kv_heads, H = cfg_->num_q_heads;
  const int C = view_c_;

  // 3. This step: mask, attend, and the record of both for the next step.
  const std::size_t mask_bytes = static_cast<std::size_t>(G) * C * 4;
  KVRT_RETURN_IF_ERROR(EnsureStepBuffers(C, stream));  // made by Warm after a prompt
  // The mask and the attend's workspace are this object's, reused step after step (two stream-
  // ordered allocations and frees fewer per step): the last step's record copy read the mask on
  // another stream, so the step waits for it (long done: the admission job waited for it too).
  const gpu::DirectRowsView view = View(rows);
  const int splits = gpu::DirectAttendSplits(view);
  const bool partial = splits > 1 && splits <= max_states;
  *states = partial ? splits : 1;
  const std::size_t ws_bytes = gpu::DirectAttendWorkspaceFloats(view) * sizeof(float);
  if (!partial && ws_dev_.size() < ws_bytes)
    KVRT_RETURN_IF_ERROR(Regrow(ws_dev_, ws_bytes + ws_bytes / 2));
  auto* mask = static_cast<uint32_t*>(mask_dev_.data());
  absl::Status st;
  // Spans of the host's time in this call (KVRT_TIMELINE): a batch member's attend took ~100 us
  // of its lane's thread (128K, B=16), more than its few driver calls alone explain.
  timeline::Span launch_span("direct_launch");
  if (!mask_written) {
    st = WaitForRecord(stream);
    if (st.ok()) st = gpu::MarkSelected(selected, count, H, G, C, mask, stream);
  }
  if (st.ok() && partial) {
    st = gpu::DirectAttendPartial(view, mask, q, cfg_->scale, o, lse,
                                  static_cast<int64_t*>(read_rows_dev_.data()), stream);
  } else if (st.ok()) {
    st = gpu::DirectAttend(view, mask, q, cfg_->scale, o, lse,
                           static_cast<int64_t*>(read_rows_dev_.data()),
                           static_cast<float*>(ws_dev_.data()), stream);
  }
  // NOTE: the record goes down on a side stream: on the step's stream the merges that end the
  // step queued behind its copy (~10-20 us of the step's device chain, profiled). A batch
  // member's stream is its own (joined before the batch's one merge), and a batch step is bound
  // by the host's CUDA calls, which contend across its members: there the copy stays on it (an
  // event record and a stream wait fewer per member).
  // The side stream goes back to the pool at the end (the admission's callback is queued on it
  // last).
  launch_span.End();
  timeline::Span record_span("direct_record");
  const SideStream side_stream(ctx_, stream, !in_batch);
  void* side = side_stream.get();
  if (st.ok() && side_stream.apart()) st = attended_.Record(stream);
  if (st.ok() && side_stream.apart()) st = transfer::StreamWaitEvent(side, attended_);
  // The record: the mask, the read counts and the stage's rows (the admission gives pages only to
  // blocks whose rows it holds: a block given a page with none would hold nothing until some
  // later step read and staged them). A batch member writes it into the pinned record with one
  // kernel (driver calls bound a batch step); one sequence, whose step the device chain bounds,
  // keeps the copy engine's four copies on its side stream, off the SMs.
  auto* rec = static_cast<unsigned char*>(rec_.data());
  const gpu::CopySpan spans[] = {
      {mask, rec, mask_bytes},
      {read_rows_dev_.data(), rec + RecReadAt(G, C), 2 * sizeof(int64_t)},
      {stage_count_.data(), rec + RecStageAt(G, C), stage_count_.empty() ? 0 : sizeof(uint32_t)},
      {stage_row_.data(), rec + RecStageRowsAt(G, C),
       static_cast<std::size_t>(stage_cap_) * sizeof(int64_t)}};
  if (st.ok() && in_batch) st = gpu::CopySpans(spans, 4, side);
  for (const gpu::CopySpan& s : spans)
    if (st.ok() && !in_batch && s.bytes > 0)
      st = transfer::MemcpyAsync(s.dst, s.src, s.bytes, side);
  rec_on_host_.store(false, std::memory_order_relaxed);
  if (st.ok()) st = rec_ready_.Record(side);
  record_span.End();
  if (!st.ok()) return st;
  rec_rows_ = rows;
  rec_c_ = C;
  rec_stage_cap_ = stage_cap_;
  rec_cold_ = &cold;
  rec_counted_ = cfg_->record_attended;
  counters_->attends_direct += 1;

  // 4. The selection as the statistics and record_attended see it.
  const int group = H / G;
  for (int h = 0; h < H; ++h) {
    if (!sel->active[h]) continue;
    const int g = h / group;
    sel->scored[h] = cold.summary(g)->num_clusters() + static_cast<int64_t>(extra_rows_[g].size()) +
                     rows - tail_begin_[g];
  }
  if (cfg_->record_attended) {
    KVRT_RETURN_IF_ERROR(rec_ready_.Synchronize());
    sel->cached.assign(H, 0);
    sel->cached_rows.assign(H, {});
    for (int h = 0; h < H; ++h) {
      if (!sel->active[h]) continue;
      sel->cached_rows[h] = RecordedRows(cold, h);
      sel->cached[h] = static_cast<int64_t>(sel->cached_rows[h].size());
    }
  }
  // The pages for the next step, chosen and filled off the decode path, by a job that enters the
  // arena only once the record is on the host: a job that waited for it there would hold a worker
  // that the decode steps of the layers after this one (or a batch's other members) need.
  timeline::Span handoff_span("direct_handoff");
  admission_.LaunchAfter(arena, side,
                         [this](bool record_done) { return AdmitAndFill(record_done); });
  counters_->time_hot_cache_ns += NowNs() - t0;
  return absl::OkStatus();
}

void DirectStep::Release() {
  (void)Quiesce();
  (void)rec_ready_.Synchronize();
  counters_->gpu_allocated_bytes -= counted_bytes_;
  counters_->hot_cache_gpu_bytes -= counted_bytes_;
  counted_bytes_ = 0;
  view_dev_.Reset();
  view_dirty_ = true;
  mask_dev_.Reset();
  ws_dev_.Reset();
  offsets_dev_.Reset();
  offsets_version_ = -1;
  pool_k_.Reset();
  pool_v_.Reset();
  ResetStage();
  table_.Reset();
  blocks_per_head_ = 0;
  cache_.reset();
  DropRegistrations();
}

}  // namespace kvrt::runtime
