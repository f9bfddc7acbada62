#pragma once
// The eviction pipeline's host side (transfer/, issue 5).
//
// Tokens leaving a layer's GPU window are copied (on the device) into a staging buffer, then D2H
// on the copy stream into a pinned block; an EvictionBatch holds that block and the event that
// marks the copy complete. EvictionQueue keeps a layer's batches in position order until the
// owner drains them into the host store. BackgroundWork runs the index insert of a layer on the
// runtime's TBB arena (a task_group), off the decode critical path, and reports its status at
// the next Wait.
//
// NOTE (v1 choice, documented in docs/benchmarks.md "Decode (issue 5)"): a layer's pending
// batches are drained (event wait + store append, a memcpy of a few KiB) at the start of that
// layer's next attend, while the GPU already runs the window attention; the index insert of the
// new rows then runs in the background and overlaps other layers' work. Rows in the store that
// the index does not cover yet are scanned exactly by the attend, so every token is attended
// exactly once: in the ring, in the store (indexed or scanned), never in both.
#include <cstdint>
#include <deque>
#include <functional>

#include "absl/status/status.h"
#include "kvrt_transfer/cuda_rt.h"
#include "kvrt_transfer/pinned_pool.h"
#include "oneapi/tbb/task_arena.h"
#include "oneapi/tbb/task_group.h"

namespace kvrt::transfer {

struct EvictionBatch {
  PinnedBlock k, v;     // [rows, kv_heads, head_dim] each, storage dtype
  int64_t rows = 0;
  Event done;           // recorded after the D2H copies; empty = already complete (host data)
};

class EvictionQueue {
 public:
  void Push(EvictionBatch batch);
  int64_t pending_rows() const { return rows_; }
  bool empty() const { return batches_.empty(); }
  // In order: waits for each batch's copy, calls sink(k, v, rows), drops the batch (its pinned
  // blocks go back to the pool). Stops at the first error (that batch stays queued).
  absl::Status Drain(const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink);
  // Waits for every outstanding copy and drops the batches without delivering them (teardown).
  void Discard();

 private:
  std::deque<EvictionBatch> batches_;
  int64_t rows_ = 0;
};

// One background job at a time per owner (e.g. a layer's index insert) on a TBB arena.
class BackgroundWork {
 public:
  BackgroundWork() = default;
  ~BackgroundWork();  // waits for the job (without an arena: the group's own wait)
  BackgroundWork(const BackgroundWork&) = delete;
  BackgroundWork& operator=(const BackgroundWork&) = delete;

  bool running() const { return running_; }
  // Waits for the running job, then starts `job` on `arena`. The job's status is kept for Wait.
  void Launch(tbb::task_arena& arena, std::function<absl::Status()> job);
  // Waits for the running job (helping inside `arena`); returns its status (OK if none) and
  // clears it.
  absl::Status Wait(tbb::task_arena& arena);
  // The same, in the arena of the last Launch.
  absl::Status Wait();

 private:
  tbb::task_group group_;
  tbb::task_arena* arena_ = nullptr;
  absl::Status status_;
  bool running_ = false;
};

}  // namespace kvrt::transfer
