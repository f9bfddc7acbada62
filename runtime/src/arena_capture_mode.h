#pragma once
// The GPU backend's arena threads in CUDA's relaxed stream-capture mode while they work in it
// (transfer::CudaCallScope says why: a decoder's capture in the global mode on another thread
// would otherwise be invalidated by a background job's allocation or synchronisation). The
// scopes at kvrt's entry points cover the calls made there; this covers every worker task,
// the loops inside a job included, whatever it calls. A thread gets its mode back when it
// leaves the arena.
#include "oneapi/tbb/task_arena.h"
#include "oneapi/tbb/task_scheduler_observer.h"

namespace kvrt::runtime {

class ArenaCaptureMode : public tbb::task_scheduler_observer {
 public:
  // Starts observing; the arena is initialised here if it was not.
  explicit ArenaCaptureMode(tbb::task_arena& arena);
  ~ArenaCaptureMode() override;
  ArenaCaptureMode(const ArenaCaptureMode&) = delete;
  ArenaCaptureMode& operator=(const ArenaCaptureMode&) = delete;

  void on_scheduler_entry(bool is_worker) override;
  void on_scheduler_exit(bool is_worker) override;
};

}  // namespace kvrt::runtime
