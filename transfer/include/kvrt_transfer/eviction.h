#pragma once
// The eviction pipeline's host side (transfer/).
//
// Tokens leaving a layer's GPU window are copied (on the device) into a staging buffer, then D2H
// on the copy stream into a pinned block; an EvictionBatch holds that block and the event that
// marks the copy complete. EvictionQueue keeps a layer's batches in position order until the
// owner drains them into the host store. BackgroundWork runs the index insert of a layer on the
// runtime's TBB arena (a task_group), off the decode critical path, and reports its status at
// the next Wait.
//
// NOTE (documented in docs/benchmarks.md, "Decode"): a layer's pending batches are drained
// (event wait + store append, a memcpy of a few KiB) at the start of that layer's next attend,
// while the GPU already runs the window attention; the index insert of the new rows then runs in
// the background and overlaps other layers' work. Rows in the store that the index does not cover
// yet are scanned exactly by the attend, so every token is attended exactly once: in the ring, in
// the store (indexed or scanned), never in both. (The cluster kind's direct step drains only the
// complete batches, DrainReady, and attends the one in flight on the device, so that the host
// does not wait for the device's queued work; the layer's next call drains it.)
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvrt_transfer/cuda_rt.h"
#include "kvrt_transfer/pinned_pool.h"
#include "oneapi/tbb/task_arena.h"
#include "oneapi/tbb/task_group.h"

namespace kvrt::transfer {

struct EvictionBatch {
  // [rows, kv_heads, head_dim] each, storage dtype. Empty: the device wrote the rows into the
  // owner's host store in place (the sink then gets null k and v).
  PinnedBlock k, v;
  int64_t rows = 0;
  Event done;  // recorded after the D2H copies; empty = already complete (host data)
  void* done_stream = nullptr;  // the stream `done` was last recorded on (for skipping waits)
};

class EvictionQueue {
 public:
  void Push(EvictionBatch batch);
  int64_t pending_rows() const { return rows_; }
  bool empty() const { return batches_.empty(); }
  // In order: waits for each batch's copy, calls sink(k, v, rows), drops the batch (its pinned
  // blocks go back to the pool). Stops at the first error (that batch stays queued).
  absl::Status Drain(
      const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink);
  // Drain without waiting: delivers the batches whose copies are complete, in order, and stops at
  // the first one still in flight (it stays queued, with those after it).
  absl::Status DrainReady(
      const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink);
  std::size_t size() const { return batches_.size(); }
  // The oldest batch (requires !empty()). Its owner may record `done` again after other device
  // work that reads the block (the block goes back to the pool only after `done`).
  EvictionBatch& front() { return batches_.front(); }
  // Waits for every outstanding copy and drops the batches without delivering them (teardown).
  void Discard();
  // An event for the next batch's `done`: one of a delivered batch's, recorded again, or a new
  // one (a decode step evicts a batch per layer and sequence: creating and destroying its event
  // were two driver calls per layer-step of each sequence).
  absl::StatusOr<Event> NewEvent();

 private:
  // Drain (wait: each copy waited for) and DrainReady (stops at the first copy in flight).
  absl::Status DrainBatches(
      const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink,
      bool wait);

  std::deque<EvictionBatch> batches_;
  int64_t rows_ = 0;
  std::vector<Event> spare_events_;  // of delivered batches, complete; at most kSpareEvents
  static constexpr std::size_t kSpareEvents = 4;
};

// One background job at a time per owner (e.g. a layer's index insert) on a TBB arena.
// NOTE: the job is enqueued (arena.enqueue, FIFO among enqueued work) and Wait blocks on a
// condition variable instead of tbb::task_group::wait: a waiting decode thread must not pick up
// other sequences' search tasks while it waits (measured: with 16 sequences in flight a
// task_group wait inside append took 5-15 ms of other work).
class BackgroundWork {
 public:
  BackgroundWork() = default;
  // Waits for the job. noexcept: tbb::task_group's destructor is not, but it only throws for a
  // group not waited for, and this waits.
  ~BackgroundWork() noexcept;
  BackgroundWork(const BackgroundWork&) = delete;
  BackgroundWork& operator=(const BackgroundWork&) = delete;

  bool running() const;
  // Waits for the running job, then starts `job` on `arena`. The job's status is kept for Wait.
  void Launch(tbb::task_arena& arena, std::function<absl::Status()> job);
  // Launch for a job that a waiter joins: the thread that waits for it (Wait, Join, the
  // destructor) enters the arena and runs its tasks until the job is done, instead of blocking.
  // For a prompt's build, whose parallel loops would otherwise run on the arena's workers alone
  // (oneTBB starts one worker fewer than the arena's threads: the caller is expected to join),
  // and whose waiter (the layer's first decode call) has nothing else to do. The waiter may also
  // run other tasks of the arena meanwhile (the note above), so decode-time jobs use Launch.
  void LaunchJoinable(tbb::task_arena& arena, std::function<absl::Status()> job);
  // The same, but the job is enqueued only once the work queued on `stream` so far is done (a
  // stream callback): a job that would first wait for the device does not hold one of the
  // arena's workers while it waits, which in a pipelined decoder (the host a step ahead of the
  // device) is most of a step. If the callback cannot be added, the job is enqueued at once.
  // The job is told which: stream_done is true when it runs after the callback (the stream's
  // earlier work has completed: no event need be waited for), false when enqueued at once.
  void LaunchAfter(tbb::task_arena& arena, void* stream,
                   std::function<absl::Status(bool stream_done)> job);
  // Waits for the running job; returns its status (OK if none) and clears it.
  absl::Status Wait();
  // Waits for the running job; its status stays for Wait.
  void Join();
  absl::Status Wait(tbb::task_arena&) { return Wait(); }

 private:
  // Marks a job running (after the one before it).
  void Begin();
  void Enqueue(tbb::task_arena& arena, std::function<absl::Status()> job);
  // A job ended with status s: kept for Wait (the first error), the next job may start.
  void Done(absl::Status s);

  // A LaunchJoinable job's arena and group, until a waiter has joined it.
  void JoinGroup();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool running_ = false;
  absl::Status status_;
  tbb::task_arena* joinable_ = nullptr;
  tbb::task_group group_;
};

}  // namespace kvrt::transfer
