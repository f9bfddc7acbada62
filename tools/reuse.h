#pragma once
// How much of a decode step's cold selection the previous step, or the previous layer at the same
// step, already chose (issue 14's "cross-step and cross-layer reuse"): the hit rate a cache of
// unbounded size that keeps one step's (or one layer's) rows would get, measured from the
// positions kvrt_get_attended reports. Three views:
//   - q head: step t's cold positions of one q head against its step t - 1;
//   - kv head: the union over a GQA group (what the direct step's page pool serves per kv head)
//     against that union at step t - 1;
//   - layer: the union over a layer's q heads against the previous layer's at the same step (a
//     previous layer's selection used as this one's prefetch).
// Only cold positions count ([sinks, length - window)): the GPU tier is attended every step.
#include <cstdint>
#include <limits>
#include <vector>

namespace kvrt::cli {

class SelectionReuse {
 public:
  SelectionReuse(int q_heads, int kv_heads) : q_heads_(q_heads), kv_heads_(kv_heads) {}

  // Starts (layer, step); cold positions are [cold_begin, cold_end).
  void BeginStep(int layer, int step, int64_t cold_begin, int64_t cold_end);
  // q head h attended ids[0..count) at the current (layer, step).
  void AddHead(int h, const int64_t* ids, int64_t count);
  // Ends the current (layer, step): compares with the previous step and layer.
  void EndStep();

  // Mean shares (NaN without samples: one step has no step before it, one layer no layer before
  // it; the report prints n/a, the JSON null) and their sample counts.
  double head_step_reuse() const { return Mean(head_sum_, head_n_); }
  double kv_step_reuse() const { return Mean(kv_sum_, kv_n_); }
  double layer_reuse() const { return Mean(layer_sum_, layer_n_); }
  int64_t layer_samples() const { return layer_n_; }

 private:
  using Set = std::vector<int64_t>;  // sorted, unique
  static double Overlap(const Set& now, const Set& before);  // |now & before| / |now|
  static double Mean(double sum, int64_t n) {
    return n > 0 ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
  }

  int q_heads_, kv_heads_;
  int layer_ = -1, step_ = -1;
  int64_t cold_begin_ = 0, cold_end_ = 0;
  std::vector<Set> head_now_, head_prev_;  // [q_heads]
  std::vector<Set> kv_prev_;               // [kv_heads] the group unions of the previous step
  std::vector<Set> layer_now_, layer_prev_;  // [steps] unions of this and the previous layer
  double head_sum_ = 0, kv_sum_ = 0, layer_sum_ = 0;
  int64_t head_n_ = 0, kv_n_ = 0, layer_n_ = 0;
};

}  // namespace kvrt::cli
