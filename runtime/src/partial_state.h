#pragma once
// Partial attention states of one decode step. A decode step produces a list of them (the GPU
// tier's, the cold tier's, an estimate for cold rows not attended, ...) and merges the list once,
// in log-sum-exp space (cpu_index/attention.h; kvrt_gpu MergeStatesN on the device).
#include <cstddef>
#include <limits>
#include <vector>

namespace kvrt::runtime {

// One state per q head: o normalised f32 [q_heads, d], lse [q_heads]; (0, -inf) is empty.
struct PartialState {
  std::vector<float> o;
  std::vector<float> lse;

  void Reset(int q_heads, int d) {
    o.assign(static_cast<std::size_t>(q_heads) * d, 0.f);
    lse.assign(q_heads, -std::numeric_limits<float>::infinity());
  }
  bool empty() const { return lse.empty(); }
};

// The states one member of a decode step adds to its GPU tier's, in merge order (the list the step
// merges once): the cold rows' (attended on the CPU; with fetch, on the device, which then holds
// it) and a two-level kind's estimate of the rows it left out.
struct StepStates {
  const PartialState* cold = nullptr;  // host state, or null (fetched, or no cold rows)
  const PartialState* estimate = nullptr;
};

}  // namespace kvrt::runtime
