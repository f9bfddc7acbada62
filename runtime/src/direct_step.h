#pragma once
// The direct decode step of the cluster kind (GPU backend, config.direct_step): the selection
// that gpu::ClusterStep leaves on the device is attended there too (gpu::DirectAttend), so the
// CPU neither waits for the step nor touches its rows. A row is read from this layer's pool of
// device pages when its 8-row store block holds one, else straight from the host store, which is
// registered (mapped) host memory read over PCIe.
//
// Which blocks hold pages lags one step: each step copies its selection mask down (async) and
// hands it to a background job that enters the runtime's arena once the copy is done (a stream
// callback: the job never holds a worker while it waits for the device), runs the CLOCK policy
// (block_page_cache.h) over the blocks that step used, and enqueues on a stream of its own
// gpu::FillPages (staged pages: it only assigns them) and gpu::CommitStaged, which moves the rows
// the step read over PCIe (DirectAttend kept them in a device stage) into the pages their blocks
// hold; the next step's stream waits for both (an event) before it reads the pool. So neither the
// policy nor the copies sit on the decode path, and a row crosses PCIe once: consecutive decode
// steps choose mostly the same clusters, so most rows come from HBM, and a row a step read over
// PCIe is in the pool for the next step if its block got (or had) a page.
//
// The stores are read in place, so they must not move or permute under a running step: the
// layer's store guard (ColdTier::SetStoreGuard) waits for the device work and calls
// DropRegistrations; the next Prepare registers the stores again.
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "block_page_cache.h"
#include "cold_tier.h"
#include "kvrt_gpu/direct_attend.h"
#include "kvrt_runtime/runtime.h"
#include "kvrt_transfer/cuda_rt.h"
#include "kvrt_transfer/eviction.h"
#include "kvrt_transfer/pinned_pool.h"
#include "oneapi/tbb/task_arena.h"

namespace kvrt::runtime {

class GpuContext;

class DirectStep {
 public:
  DirectStep(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* ctx)
      : cfg_(config), counters_(counters), ctx_(ctx) {}
  ~DirectStep() { Release(); }

  // Whether a direct step can run now for `cold`: config on, stores registered (again after they
  // moved), pool sized for the cold rows. A failure (registration refused, no room under
  // gpu_memory_limit) turns the direct step off for this layer, which then takes the CPU-ordered
  // path (kvrt_stats.attends_direct shows it).
  bool Prepare(const ColdTier& cold, void* stream);
  // Before a prompt's rows arrive (its background job, while the caller's device still computes
  // them): registers the stores' first `rows` rows (reserved and faulted in), so that Prepare
  // after the copy finds them registered. Waits for stream (its table upload). False when the
  // direct step is off or a registration failed (Prepare tries again).
  bool RegisterAhead(const ColdTier& cold, int64_t rows, void* stream);
  // After a prompt (the prompt's background job, after Prepare and the summary's upload; C: the
  // summary's clusters per kv head): what the first decode step would otherwise do on the decode
  // path, while the caller's device computes the next layer. The step's buffers, the device view
  // of this index version, and pages for the blocks every step reads (the unclustered tail, the
  // outliers), copied in whole on stream: the first step reads them from HBM, not over PCIe.
  absl::Status Warm(const ColdTier& cold, int C, void* stream);
  // A step in two calls, both requiring Prepare() true in this call. BeginStep, after the
  // selection is enqueued on stream (which reads neither the pool nor the table, so the last
  // fill overlaps it): orders stream after the last admission's fill, refreshes the device view
  // at a new index version (C clusters per kv head; cluster_size: the device summary's
  // [kv_heads, C] sizes, gpu::ClusterSummaryView::size).
  absl::Status BeginStep(const ColdTier& cold, int C, const int32_t* cluster_size, void* stream);
  // Residency-aware selection (ClusterConfig::miss_penalty): the offsets [kv_heads, C] (device)
  // for ClusterStepParams::key_offset, penalty x each cluster's share of rows not in the pool
  // (gpu::MissPenaltyOffsets), as the last admission job computed them right after its fill: off
  // the step's path, over the table this step reads. Orders stream after that fill. Null when
  // there are none for this index version and C (the first step after a prompt, a new version:
  // that step selects without the penalty).
  const float* PenaltyOffsets(const ColdTier& cold, int C, void* stream);
  // `to`'s work from now on follows `from`'s work so far (a batch's lane, forked from the step's
  // stream after the members' selections): a wait for the fill that `from` has is not repeated on
  // `to` (a driver call fewer per member and step).
  // Only from a created stream (transfer::IsCreatedStream; a null `from` is also "no stream
  // waited").
  void StreamFollows(void* from, void* to) {
    if (fill_pending_ && transfer::IsCreatedStream(from) && fill_waited_by_ == from)
      fill_waited_by_ = to;
  }
  // The step's mask of selected clusters [kv_heads, C] for the selection kernel to write
  // (gpu::ClusterStepOutputs::group_mask), ordered on stream after the last step's record copy
  // read it; null if its buffers cannot be had (then Attend marks it from the lists).
  uint32_t* SelectionMask(int C, void* stream);
  // Then: MarkSelected (unless mask_written: the selection kernel wrote SelectionMask's mask),
  // DirectAttend of the stores' first `rows` rows (cold.rows(), and the rows a decode append
  // wrote in place that the cold tier takes at the layer's next call; RegisteredUpTo them) into o,
  // lse (device f32 [q_heads, d], [q_heads]), the mask's copy, and the admission job.
  // selected/count: ClusterStep's outputs (device, [q_heads, C], [q_heads]); q: device f32
  // [q_heads, d]. in_batch: a member of a batch step (stream is the member's own). o, lse have room
  // for max_states states (o + s * q_heads * d, lse + s * q_heads): when the attention's split
  // states fit, they are left there unmerged for the caller's one merge, and *states is their
  // count; else (or max_states 1) o, lse hold the merged state and *states is 1. *sel: every active
  // head's CPU rows stay empty; with record_attended the rows attended come back in
  // sel->cached_rows (one wait for the copy).
  absl::Status Attend(const ColdTier& cold, int64_t rows, const int32_t* selected,
                      const int32_t* count, bool mask_written, bool in_batch, const float* q,
                      float* o, float* lse, int max_states, int* states, void* stream,
                      tbb::task_arena& arena, ColdSelection* sel);
  bool registered() const { return !regs_k_.empty(); }
  // The stores are registered (where they are now) for their first `rows` rows.
  bool RegisteredUpTo(const ColdTier& cold, int64_t rows);
  // The stores are about to move: the caller has waited for the steps' device work; this waits
  // for the admission job and its fill (which read the stores too), then drops the registration.
  void DropRegistrations();
  // Waits for the admission job and its fill (both read the stores); OK if none ran.
  absl::Status Quiesce();
  // Before the cluster summary changes (a new index version: rewritten in place, or moved to a
  // larger buffer and the old one freed): waits for the admission job and its kernels, which read
  // the summary's sizes (View's cluster_size). A failed job's status stays for Prepare.
  void BeforeSummaryChanges();
  // Waits for the last step's copies and frees everything.
  void Release();

 private:
  // The config and the shape allow a direct step (else off_ is set where the shape rules it out).
  bool Enabled();
  // Registers the stores up to `rows` rows (ExtendLocked), again after they moved, and sizes the
  // page table for their capacity.
  bool Register(const ColdTier& cold, void* stream, int64_t rows);
  // Registers rows up to `rows` (and a chunk ahead) of every store; mu_ held.
  absl::Status ExtendLocked(const ColdTier& cold, int64_t rows);
  // The page pool: hot_cache_fraction of the cold rows plus room for the unclustered tail, which
  // every step reads; reallocated (empty) when that outgrows it by a quarter.
  bool FitPool(const ColdTier& cold, void* stream);
  std::unique_ptr<BlockPageCache> NewPolicy(int64_t pages_per_head) const;
  absl::Status UploadView(const ColdTier& cold, int C, void* stream);
  // At a new index version: the blocks past the old tail give their pages up (their rows may have
  // moved), the stage starts empty; then the view of the version (UploadView).
  absl::Status RefreshView(const ColdTier& cold, int C, void* stream);
  // buf <- a new buffer of `bytes` (the old one freed), counted in the hot cache's bytes.
  absl::Status Regrow(transfer::DeviceBuffer& buf, std::size_t bytes);
  // The buffers every step uses (the record, its events, the read counts, the mask), for C
  // clusters.
  absl::Status EnsureStepBuffers(int C, void* stream);
  // fn(block) for each block of kv head g that every step reads: the unclustered tail up to
  // `rows` and the extra rows' blocks (a block may come twice).
  template <typename Fn>
  void ForEachEveryStepBlock(int g, int64_t rows, Fn&& fn) const;
  absl::Status UploadTable(void* stream);
  // stream waits for the last step's record copy (it reads the mask and the counts a step
  // rewrites), unless the admission job already waited for it on the host.
  absl::Status WaitForRecord(void* stream);
  // The admission job: waits for the step's record (unless record_done: run by the callback
  // that followed it), runs Admit and enqueues the fill.
  absl::Status AdmitAndFill(bool record_done);
  // The recorded step's blocks -> CLOCK (hits, admissions), statistics. Reads only this object's
  // copies of the summary (the cold tier may refresh it meanwhile).
  void Admit();
  // The policy's page updates to the table (FillPages; eager_ blocks copied whole), `rows` cold.
  // The upload's staging is free again after `after` (when given: the caller records it after
  // the fill on the same stream), else after an event of its own. `before_record`: the fill
  // comes before the next step's record in stream order (see updates_before_record_).
  absl::Status ApplyUpdates(int64_t rows, void* stream, const transfer::Event* after,
                            bool before_record);
  // Rows q head h attended in the step recorded in rec_ (mask bits, extra rows, the tail).
  std::vector<int64_t> RecordedRows(const ColdTier& cold, int h) const;
  gpu::DirectRowsView View(int64_t rows) const;
  std::size_t row_bytes() const;
  void ResetStage();

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  GpuContext* ctx_;
  bool off_ = false;
  std::mutex mu_;  // registrations: the store guard may run on a background thread

  // Per kv head, the key and the value store: registered in chunks from row 0 to reg_rows_ (of a
  // store of reg_capacity_ rows at base).
  static constexpr std::size_t kRegisterChunkBytes = std::size_t{8} << 20;
  struct StoreRegistration {
    const void* base = nullptr;
    std::vector<transfer::HostRegistration> chunks;
  };
  std::vector<StoreRegistration> regs_k_, regs_v_;
  int64_t reg_capacity_ = 0, reg_rows_ = 0;
  // Device view arrays (layout: ViewLayout in direct_step.cc), re-uploaded when the index version
  // or the registrations change.
  transfer::DeviceBuffer view_dev_;
  std::vector<unsigned char> view_host_;
  bool view_dirty_ = true;
  int64_t version_ = -1;
  int view_c_ = 0, view_e_ = 0;
  const int32_t* cluster_size_ = nullptr;         // the summary's device sizes, this step
  std::vector<int64_t> tail_begin_;               // [G] per kv head, this version
  std::vector<std::vector<int32_t>> extra_rows_;  // [G] outliers and NaN/Inf rows below the tail
  // [G, C] the clusters of this version, a cluster's two fields side by side (the admission
  // scan reads them for the selected clusters only: one cache line each, not two).
  struct ClusterRows {
    int32_t begin = 0, size = 0;
  };
  std::vector<ClusterRows> clusters_host_;

  // The pool and its table.
  std::unique_ptr<BlockPageCache> cache_;
  transfer::DeviceBuffer pool_k_, pool_v_;  // [G * pages_per_head * kDirectBlockRows, d]
  transfer::DeviceBuffer table_;            // int32 [G, blocks_per_head_]: gpu::kStagedPageMask
  // The stage (gpu::DirectRowsView): the rows a step reads over PCIe, moved into their pages by
  // the admission job's gpu::CommitStaged.
  transfer::DeviceBuffer stage_k_, stage_v_, stage_row_, stage_count_;
  int64_t stage_cap_ = 0;
  int64_t blocks_per_head_ = 0;
  int64_t counted_bytes_ = 0;
  transfer::UploadStaging updates_;  // the page updates' pinned upload
  // The last upload out of updates_ was the admission's fill or BeginStep's: the next step's
  // stream waits for the one (filled_) and runs the other before its attend, so once its record
  // is on the host the staging is free with no event wait (two driver calls fewer per member and
  // step). Warm's fill, on the prompt's stream, is not.
  bool updates_before_record_ = false;
  transfer::BackgroundWork admission_;
  transfer::Event filled_;  // the admission's fill, on a stream of its own
  bool fill_pending_ = false;
  void* fill_waited_by_ = nullptr;  // a stream that already waits for the pending fill

  // The last step's record, copied down on a stream of its own after the step's attend
  // (attended_), so that the step's merges do not queue behind it: mask [G, C] then read_rows [2].
  transfer::PinnedBlock rec_;
  transfer::Event attended_;
  transfer::Event rec_ready_;
  // The admission job waited for rec_ready_'s last record on the host: a stream need not wait
  // for it (a driver call fewer per member and step). Set by the job, cleared at each record.
  std::atomic<bool> rec_on_host_{false};
  bool rec_counted_ = false;
  int64_t rec_rows_ = 0;
  // The cold tier of the recorded step: the admission job registers its stores ahead. Valid
  // while the job may run (the layer awaits the job before its stores move or go).
  const ColdTier* rec_cold_ = nullptr;
  int rec_c_ = 0;
  int64_t rec_stage_cap_ = 0;
  // Admit's scratch: blocks whose rows the recorded step staged (== mark_round_), and the blocks
  // (kv_head * blocks_per_head_ + block) it admitted for a whole copy (FillPages' kFillPagesCopy).
  std::vector<uint32_t> staged_mark_;
  uint32_t mark_round_ = 0;
  // Admit's per-kv-head results and lists, kept for their capacity (a job per step and member).
  struct AdmitTally {
    int64_t hits = 0, admitted = 0, copied = 0, attended = 0;
    std::vector<int64_t> eager;   // kv_head * blocks_per_head_ + block
    std::vector<int64_t> blocks;  // the step's blocks, gathered for BlockPageCache::UseHeld
    // Blocks without a page: of the every-step blocks, of the selected clusters.
    std::vector<int64_t> missed_every, missed_selected;
  };
  std::vector<AdmitTally> tally_;
  absl::flat_hash_set<int64_t> eager_;
  // The admission job's residency-aware offsets (PenaltyOffsets), for index version
  // offsets_version_ (-1: none) with offsets_c_ clusters per kv head.
  transfer::DeviceBuffer offsets_dev_;
  int64_t offsets_version_ = -1;
  int offsets_c_ = 0;
  transfer::DeviceBuffer read_rows_dev_;  // int64 [2], cumulative
  transfer::DeviceBuffer mask_dev_;       // the step's mask [G, C]
  transfer::DeviceBuffer ws_dev_;         // DirectAttend's workspace
  int64_t host_rows_seen_ = 0;            // read_rows_dev_[1] when the statistics last took it
};

}  // namespace kvrt::runtime
