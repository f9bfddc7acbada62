#pragma once
// The timed decode loop shared by `kvrt bench decode` and `kvrt bench serve`: B sequences, each
// (sequence, layer) prefilled with the same BenchData prompt, then per step and layer every
// sequence appends decode row `step` and attends with query row `step`, one thread per sequence
// (kvrt_attend_ex) or one kvrt_attend_batch_ex call. Public C API only.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvrt.h"
#include "tools/accuracy.h"
#include "tools/bench_data.h"

namespace kvrt::cli {

struct HarnessOptions {
  kvrt_config config = kvrt_config_default();  // complete; shape from the BenchData
  int batch = 1;
  bool device = false;   // q, k, v, out in device memory (CUDA build)
  bool batched = false;  // kvrt_attend_batch_ex for B > 1
  // With batched: the B appends of a layer-step from the calling thread, in order (else one
  // thread per sequence, all released at once).
  bool serial_appends = false;
  // The layer-steps of a step back to back, one wait per step: the host's calls for a layer
  // overlap the device's work for the layers before, as in a decoder. latency_us then holds one
  // value per measured step, its wall time over the layers; a captured step is not measured.
  bool pipeline = false;
  int warmup = 3, steps = 30;
  double max_seconds = 20;  // measured time, at least 5 steps
  // Measured steps (absolute step numbers) whose output and attended positions of sequence 0,
  // layer 0 are kept (needs config.record_attended for the positions), after the step's timing.
  std::vector<int> capture_steps;
};

struct CapturedStep {
  int step = 0;
  std::vector<float> out;                 // [q_heads, d]
  std::vector<std::vector<int64_t>> ids;  // per q head (empty without record_attended)
};

struct HarnessResult {
  std::vector<double> latency_us;  // per measured layer-step (all B sequences); see pipeline
  kvrt_stats prefilled = kvrt_stats_init();  // after every prefill
  kvrt_stats begin = kvrt_stats_init();      // at the first measured step (after warm-up)
  kvrt_stats end = kvrt_stats_init();
  double append_us = 0, sync_us = 0;  // summed over the measured attends
  double setup_s = 0;
  double prefill_ms = 0;        // mean kvrt_prefill call, one (sequence, layer)
  double prefill_ready_ms = 0;  // the same, until kvrt_seq_wait returned for every sequence
  std::vector<CapturedStep> captured;
};

// Errors name the failing call and kvrt_last_error().
absl::StatusOr<HarnessResult> RunDecodeHarness(const HarnessOptions& options,
                                               const BenchData& data);

// Accuracy of the captured steps against exact f32 attention over the whole sequence (prompt
// rows and decode rows 0..step): recall@top_k, mass recall, output error. Untimed.
absl::StatusOr<AccuracySummary> ScoreCapturedSteps(const BenchData& data,
                                                   const std::vector<CapturedStep>& captured,
                                                   int top_k);

// The measured steps every `every`-th, at most `max` of them (max 0: none).
std::vector<int> CaptureSchedule(int warmup, int steps, int every, int max);

}  // namespace kvrt::cli
