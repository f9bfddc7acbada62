#pragma once
// The device backend of the GPU tier (tier_backend.h, config.use_gpu): sinks and window ring in
// device memory, the eviction pipeline to the cold tier, fetch mode, and the per-runtime CUDA
// resources (streams, pinned pool).
//
// A decode step on the device (LayerState::Attend drives it):
//   side stream: TierAttention(sinks + ring) -> tier state (forked from the step's stream, after
//                the summary's scoring for one sequence with a device selection, else at once)
//   CPU:    [wait D2H q] -> cold selection -> cold attention (or fetch: gather, H2D, GatherAttend)
//   stream: H2D of the host states -> join the side stream -> one MergeStatesN over [tier,
//           fetched, host states, or the direct step's split states] -> out
// Every piece of a layer's device work is ordered after the previous call's through an event
// (last_use), so calls on different streams never race on the tier's buffers.
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "kvrt_transfer/cuda_rt.h"
#include "kvrt_transfer/eviction.h"
#include "kvrt_transfer/pinned_pool.h"

namespace kvrt::runtime {

// Per-runtime CUDA resources. Thread-safe.
class GpuContext {
 public:
  static absl::StatusOr<std::unique_ptr<GpuContext>> Create();

  void* copy_stream() const { return copy_stream_.get(); }
  transfer::PinnedPool& pinned() { return pinned_; }
  // A runtime stream (high priority) for calls that bring none (host pointers) and background
  // jobs; returned after the call.
  absl::StatusOr<void*> AcquireStream();
  void ReleaseStream(void* s);
  // Prompts whose cold rows wait in device staging for their background job (DeviceTier::
  // SettlePrompt): at most kPromptSlots per runtime, so that a decoder prefilling many layers
  // ahead holds a bounded amount of device memory. Acquire blocks the prefilling caller.
  static constexpr int kPromptSlots = 2;
  void AcquirePromptSlot();
  void ReleasePromptSlot();

 private:
  GpuContext();
  transfer::Stream copy_stream_;
  transfer::PinnedPool pinned_;
  std::mutex mu_;
  std::vector<transfer::Stream> streams_;
  std::vector<void*> free_streams_;
  std::condition_variable prompt_cv_;
  int prompts_in_flight_ = 0;
};

// A runtime stream for work beside the caller's stream `own` (which the caller forks and joins
// through events), handed back to the pool when the scope ends; `own` itself when none is wanted
// or the pool has none (the work then runs in line on it).
class SideStream {
 public:
  SideStream(GpuContext* ctx, void* own, bool want = true) : ctx_(ctx), own_(own), side_(own) {
    if (!want) return;
    if (absl::StatusOr<void*> s = ctx->AcquireStream(); s.ok()) side_ = *s;
  }
  ~SideStream() {
    if (apart()) ctx_->ReleaseStream(side_);
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void* get() const { return side_; }
  bool apart() const { return side_ != own_; }

 private:
  GpuContext* ctx_;
  void* own_;
  void* side_;
};

}  // namespace kvrt::runtime
