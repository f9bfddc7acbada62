#pragma once
// The GPU backend of a layer's GPU tier (config.use_gpu): sinks and window ring in device memory,
// the eviction pipeline to the host store, and the per-runtime CUDA resources (streams, pinned
// pool). The LayerState methods of the GPU path (AppendTokensGpu, AttendGpu, PrefillGpu) are in
// gpu_tier.cc; the host backend (layer_state.cc) is unchanged.
//
// Decode step of one layer (AttendGpu), DESIGN.md "Data flow":
//   stream: [H2D q] -> TierAttention(sinks + ring) -> (o_gpu, lse_gpu)
//   CPU:    [wait D2H q] -> drain this layer's evictions into the host store -> per q head on the
//           TBB arena: index search + exact scan of unindexed rows + attention -> (o_cpu, lse_cpu)
//   stream: H2D (o_cpu, lse_cpu) -> MergeStates -> out (device: stream order; host: D2H + sync)
//   then the index insert of newly stored rows runs in the background (BackgroundWork).
// Every piece of a layer's device work is ordered after the previous call's through an event
// (last_use), so calls on different streams never race on the tier's buffers.
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
  // A runtime stream for calls that bring none (host pointers); returned after the call.
  absl::StatusOr<void*> AcquireStream();
  void ReleaseStream(void* s);

 private:
  GpuContext();
  transfer::Stream copy_stream_;
  transfer::PinnedPool pinned_;
  std::mutex mu_;
  std::vector<transfer::Stream> streams_;
  std::vector<void*> free_streams_;
};

// Device-side state of one (sequence, layer).
struct GpuTier {
  ~GpuTier();
  std::size_t bytes() const { return sink_k.size() + sink_v.size() + ring_k.size() + ring_v.size(); }

  transfer::DeviceBuffer sink_k, sink_v;  // [sink_tokens, kv_heads, d]
  transfer::DeviceBuffer ring_k, ring_v;  // [window_tokens, kv_heads, d]; pos p in slot (p-S)%W
  // TierBatch arrays for batch 1: 4 pointers (sink k, sink v, ring k, ring v), then n_sink and
  // n_window as int32. Re-uploaded when a count or pointer changes.
  transfer::DeviceBuffer desc;
  int32_t desc_n_sink = -1, desc_n_window = -1;
  transfer::Event last_use;  // recorded after each call's device work
  bool used = false;
  transfer::EvictionQueue evictions;
  transfer::BackgroundWork index_work;
  // Timing events of the last attend (read when complete).
  transfer::Event ev_start, ev_tier, ev_h2d_begin, ev_h2d, ev_merge;
  bool timing_pending = false;
  // Fetch mode: the pinned staging of the gathered K/V rows, reused by the next attend once the
  // H2D out of it (fetch_done) has completed.
  transfer::PinnedBlock fetch_block;
  transfer::Event fetch_done;
};

}  // namespace kvrt::runtime
