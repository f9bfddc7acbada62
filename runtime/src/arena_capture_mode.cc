#include "arena_capture_mode.h"

#include <vector>

#include "kvrt_transfer/cuda_rt.h"

namespace kvrt::runtime {
namespace {
// Per thread, the modes to restore, innermost last (a thread may be in nested arenas).
struct Saved {
  const ArenaCaptureMode* observer;
  int mode;
};
thread_local std::vector<Saved> t_saved;
}  // namespace

ArenaCaptureMode::ArenaCaptureMode(tbb::task_arena& arena) : tbb::task_scheduler_observer(arena) {
  arena.initialize();
  observe(true);
}

// NOTE: a worker still in the arena when observation stops gets no exit call and stays relaxed;
// that only spares its later CUDA calls a check, never makes one fail.
ArenaCaptureMode::~ArenaCaptureMode() { observe(false); }

void ArenaCaptureMode::on_scheduler_entry(bool) {
  t_saved.push_back({this, transfer::RelaxCaptureModeOfThisThread()});
}

void ArenaCaptureMode::on_scheduler_exit(bool) {
  if (t_saved.empty() || t_saved.back().observer != this) return;
  transfer::RestoreCaptureModeOfThisThread(t_saved.back().mode);
  t_saved.pop_back();
}

}  // namespace kvrt::runtime
