#include "tools/reuse.h"

#include <algorithm>
#include <iterator>

namespace kvrt::cli {

double SelectionReuse::Overlap(const Set& now, const Set& before) {
  std::size_t common = 0;
  for (auto a = now.begin(), b = before.begin(); a != now.end() && b != before.end();) {
    if (*a < *b) {
      ++a;
    } else if (*b < *a) {
      ++b;
    } else {
      ++common;
      ++a;
      ++b;
    }
  }
  return static_cast<double>(common) / static_cast<double>(now.size());
}

void SelectionReuse::BeginStep(int layer, int step, int64_t cold_begin, int64_t cold_end) {
  if (layer != layer_) {
    // A new layer: its first step has no previous step; the finished layer's unions become the
    // previous layer's.
    layer_prev_ = std::move(layer_now_);
    layer_now_.clear();
    head_prev_.assign(q_heads_, {});
    kv_prev_.assign(kv_heads_, {});
  }
  layer_ = layer;
  step_ = step;
  cold_begin_ = cold_begin;
  cold_end_ = cold_end;
  head_now_.assign(q_heads_, {});
}

void SelectionReuse::AddHead(int h, const int64_t* ids, int64_t count) {
  Set& s = head_now_[h];
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] >= cold_begin_ && ids[i] < cold_end_) s.push_back(ids[i]);
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
}

void SelectionReuse::EndStep() {
  const int group = q_heads_ / kv_heads_;
  Set layer_union;
  for (int g = 0; g < kv_heads_; ++g) {
    Set now;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      if (!head_now_[h].empty() && !head_prev_[h].empty()) {
        head_sum_ += Overlap(head_now_[h], head_prev_[h]);
        ++head_n_;
      }
      Set u;
      std::set_union(now.begin(), now.end(), head_now_[h].begin(), head_now_[h].end(),
                     std::back_inserter(u));
      now.swap(u);
    }
    if (!now.empty() && !kv_prev_[g].empty()) {
      kv_sum_ += Overlap(now, kv_prev_[g]);
      ++kv_n_;
    }
    Set u;
    std::set_union(layer_union.begin(), layer_union.end(), now.begin(), now.end(),
                   std::back_inserter(u));
    layer_union.swap(u);
    kv_prev_[g] = std::move(now);
  }
  const std::size_t s = static_cast<std::size_t>(step_);
  if (s < layer_prev_.size() && !layer_union.empty() && !layer_prev_[s].empty()) {
    layer_sum_ += Overlap(layer_union, layer_prev_[s]);
    ++layer_n_;
  }
  if (layer_now_.size() <= s) layer_now_.resize(s + 1);
  layer_now_[s] = std::move(layer_union);
  head_prev_.swap(head_now_);
}

}  // namespace kvrt::cli
