// hnsw: hnswlib 0.6.2 HierarchicalNSW<float> with InnerProductSpace; the off-the-shelf graph
// baseline. hnswlib keeps its own f32 copy of every key inside its level-0 block (counted in
// MemoryBytes).
//
// NOTE: hnswlib 0.6.2 has one shared `ef_` for searchKnn, so a per-call ef is impossible
// through its API without a data race. Search therefore walks hnswlib's graph itself (greedy
// descent through the upper layers, then a beam of width ef on layer 0, the same algorithm as
// searchKnn/searchBaseLayerST) with per-call ef, a per-thread visited set, and its own count of
// distance computations (`scanned`; metric_distance_computations is a shared atomic that only a
// compile-time flag enables). effort >= size() is an exact scan. Build and Add use hnswlib's
// thread-safe addPoint from TBB tasks.
//
// The graph holds the keys less their mean at Build (kept for Add): q.(k - m) ranks the keys as
// q.k does, but key-to-key products dominated by a common offset |m|^2 (real models' keys are far
// from zero-mean) leave hnswlib's graph in unreachable pieces: an offset of norm 20 on 12K normal
// keys took recall@100 from 0.77 to 0.11, and the beam reached 2.9K of 12K keys at ef = 5000.
// Results are rescored against the stored keys, so nothing else sees the shift.
#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <queue>
#include <vector>

#include "absl/strings/str_cat.h"
#include "hnswlib/hnswlib.h"
#include "index_common.h"
#include "kinds.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::cpu_index {
namespace {

using Hnsw = hnswlib::HierarchicalNSW<float>;
constexpr int64_t kMaxRows = std::numeric_limits<uint32_t>::max() - 1;  // hnswlib tableint

class HnswIndex final : public KeyIndex {
 public:
  HnswIndex(const IndexConfig& config, int dim) : config_(config), dim_(dim), space_(dim) {}

  IndexKind kind() const override { return IndexKind::kHnsw; }

  absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) override {
    if (auto s = internal::CheckBuild(store, dim_, queries, n_queries, kMaxRows); !s.ok()) return s;
    built_ = false;
    size_ = 0;
    hnsw_.reset();
    try {
      hnsw_ = std::make_unique<Hnsw>(&space_, static_cast<std::size_t>(store.size()),
                                     static_cast<std::size_t>(config_.hnsw_m),
                                     static_cast<std::size_t>(config_.hnsw_ef_construction),
                                     static_cast<std::size_t>(config_.seed));
    } catch (const std::exception& e) {
      hnsw_.reset();
      return absl::ResourceExhaustedError(absl::StrCat("hnsw build: ", e.what()));
    }
    built_ = true;
    mean_ = MeanKey(store);
    if (auto s = Insert(store); !s.ok()) {
      built_ = false;
      hnsw_.reset();
      return s;
    }
    return absl::OkStatus();
  }

  absl::Status Add(const HeadStore& store) override {
    if (auto s = internal::CheckAdd(store, dim_, built_, size_, kMaxRows); !s.ok()) return s;
    return Insert(store);
  }

  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, q, params, out); !s.ok()) {
      return s;
    }
    // NOTE: hnswlib's inner-product graph need not be connected (on OOD keys we measured 40% of
    // rows unreachable at ef = n; measured: a third of a layer at k >= n), so the maximal effort,
    // and a k that asks for every row, are an exact scan.
    if (params.effort >= size_ || params.k >= size_) return ExactScan(store, q, params.k, 0, out);
    const Hnsw& h = *hnsw_;
    const std::size_t ef = static_cast<std::size_t>(
        std::max(params.k, params.effort > 0 ? params.effort : config_.hnsw_default_ef));
    int64_t scanned = 0;
    auto dist = [&](hnswlib::tableint id) {
      ++scanned;
      return h.fstdistfunc_(q, h.getDataByInternalId(id), h.dist_func_param_);
    };
    // Greedy descent through the upper layers.
    hnswlib::tableint cur = h.enterpoint_node_;
    float cur_d = dist(cur);
    for (int level = h.maxlevel_; level > 0; --level) {
      bool changed = true;
      while (changed) {
        changed = false;
        unsigned int* ll = h.get_linklist(cur, level);
        const int n = h.getListCount(ll);
        const auto* nb = reinterpret_cast<const hnswlib::tableint*>(ll + 1);
        for (int i = 0; i < n; ++i) {
          const float d = dist(nb[i]);
          if (d < cur_d) {
            cur_d = d;
            cur = nb[i];
            changed = true;
          }
        }
      }
    }
    // Beam of width ef on layer 0 (searchBaseLayerST without deletions).
    using Pair = std::pair<float, hnswlib::tableint>;
    std::priority_queue<Pair> top;                                              // worst on top
    std::priority_queue<Pair, std::vector<Pair>, std::greater<Pair>> frontier;  // best on top
    auto& visited = internal::VisitedSet::ForThisThread(static_cast<int64_t>(h.max_elements_));
    visited.Insert(cur);
    top.emplace(cur_d, cur);
    frontier.emplace(cur_d, cur);
    float bound = cur_d;
    while (!frontier.empty()) {
      const Pair c = frontier.top();
      if (c.first > bound && top.size() >= ef) break;
      frontier.pop();
      unsigned int* ll = h.get_linklist0(c.second);
      const int n = h.getListCount(ll);
      const auto* nb = reinterpret_cast<const hnswlib::tableint*>(ll + 1);
      for (int i = 0; i < n; ++i) {
        if (!visited.Insert(nb[i])) continue;
        const float d = dist(nb[i]);
        if (top.size() < ef || d < bound) {
          frontier.emplace(d, nb[i]);
          top.emplace(d, nb[i]);
          if (top.size() > ef) top.pop();
          bound = top.top().first;
        }
      }
    }
    thread_local std::vector<std::pair<float, int64_t>> cands;
    cands.clear();
    while (!top.empty()) {
      const auto id = static_cast<int64_t>(h.getExternalLabel(top.top().second));
      top.pop();
      cands.emplace_back(DotRow(q, store.key(id), dim_, store.dtype()), id);
    }
    // The beam reached fewer than k rows (a disconnected graph): an exact scan returns k, so that
    // a search never silently returns fewer than k results.
    if (static_cast<int64_t>(cands.size()) < std::min<int64_t>(params.k, size_))
      return ExactScan(store, q, params.k, scanned, out);
    internal::TakeTopK(&cands, params.k, out);
    out->scanned = scanned;
    return absl::OkStatus();
  }

  // The exact top-k over every row; `scanned` keys were already scored by a failed graph search.
  absl::Status ExactScan(const HeadStore& store, const float* q, int k, int64_t scanned,
                         SearchResult* out) const {
    thread_local std::vector<float> all;
    all.resize(size_);
    store.Dot(q, 0, size_, all.data());
    TopK(all.data(), size_, k, &out->ids, &out->scores);
    out->scanned = scanned + size_;
    return absl::OkStatus();
  }

  int64_t size() const override { return size_; }

  std::size_t MemoryBytes() const override {
    if (!hnsw_) return 0;
    const Hnsw& h = *hnsw_;
    std::size_t bytes = h.max_elements_ * h.size_data_per_element_;  // links, f32 key, label
    bytes += h.max_elements_ * (sizeof(char*) + sizeof(int) + sizeof(std::mutex));
    for (std::size_t i = 0; i < h.cur_element_count; ++i) {
      bytes += static_cast<std::size_t>(h.element_levels_[i]) * h.size_links_per_element_;
    }
    // label_lookup_: an unordered_map node (~32 B) per row plus the bucket array.
    bytes += h.label_lookup_.size() * 32 + h.label_lookup_.bucket_count() * sizeof(void*);
    bytes += h.max_elements_ * sizeof(hnswlib::vl_type);  // at least one pooled visited list
    return bytes + mean_.size() * sizeof(float);
  }

 private:
  // The mean of the store's keys (f32, in the order the rows are summed: deterministic).
  std::vector<float> MeanKey(const HeadStore& store) const {
    std::vector<double> sum(dim_, 0.0);
    constexpr int64_t kChunk = 4096;
    for (int64_t r0 = 0; r0 < store.size(); r0 += kChunk) {
      const int64_t r1 = std::min(store.size(), r0 + kChunk);
      const std::vector<float> x = internal::KeysF32(store, r0, r1);
      for (int64_t i = 0; i < r1 - r0; ++i)
        for (int j = 0; j < dim_; ++j) sum[j] += x[i * dim_ + j];
    }
    std::vector<float> mean(dim_, 0.f);
    // A non-finite key (kept for exact attention) would make every centred key non-finite: the
    // graph then stays uncentred, as before.
    for (int j = 0; j < dim_; ++j) {
      const double m = store.size() > 0 ? sum[j] / static_cast<double>(store.size()) : 0.0;
      if (!std::isfinite(m)) return std::vector<float>(dim_, 0.f);
      mean[j] = static_cast<float>(m);
    }
    return mean;
  }

  // Inserts rows [size_, store.size()) with addPoint from TBB tasks.
  absl::Status Insert(const HeadStore& store) {
    const int64_t begin = size_, end = store.size();
    if (begin == end) return absl::OkStatus();
    try {
      if (static_cast<std::size_t>(end) > hnsw_->max_elements_) {
        hnsw_->resizeIndex(
            std::max<std::size_t>(end, hnsw_->max_elements_ + hnsw_->max_elements_ / 2));
      }
      std::vector<float> x = internal::KeysF32(store, begin, end);
      for (int64_t i = 0; i < end - begin; ++i)
        for (int j = 0; j < dim_; ++j) x[i * dim_ + j] -= mean_[j];
      auto add = [&](int64_t i) {
        hnsw_->addPoint(x.data() + (i - begin) * dim_, static_cast<hnswlib::labeltype>(i));
      };
      int64_t first = begin;
      if (hnsw_->cur_element_count == 0) add(first++);  // entry point before going parallel
      tbb::parallel_for(tbb::blocked_range<int64_t>(first, end, 64),
                        [&](const tbb::blocked_range<int64_t>& r) {
                          for (int64_t i = r.begin(); i < r.end(); ++i) add(i);
                        });
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("hnsw insert: ", e.what()));
    }
    size_ = end;
    return absl::OkStatus();
  }

  IndexConfig config_;
  int dim_;
  hnswlib::InnerProductSpace space_;  // before hnsw_: hnsw_ keeps a pointer into it
  std::unique_ptr<Hnsw> hnsw_;
  bool built_ = false;
  int64_t size_ = 0;
  std::vector<float> mean_;  // [dim_]: subtracted from every key the graph holds
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeHnswIndex(const IndexConfig& config, int head_dim) {
  if (config.hnsw_m < 2 || config.hnsw_ef_construction <= 0 || config.hnsw_default_ef <= 0) {
    return absl::InvalidArgumentError(
        "hnsw: need hnsw_m >= 2, ef_construction > 0, default_ef > 0");
  }
  return std::unique_ptr<KeyIndex>(new HnswIndex(config, head_dim));
}

std::string HnswSearchSettings(const IndexConfig& c, int k, int effort) {
  return absl::StrCat("ef=", std::max(k, effort > 0 ? effort : c.hnsw_default_ef),
                      " (exact scan when k or ef >= the keys, or the graph returns < k)");
}

int64_t HnswBytesBound(const IndexConfig& c, int head_dim, int64_t rows) {
  const int64_t d = head_dim, key = 4 * d;  // indexes keep f32 keys
  (void)d;
  // hnswlib: max_elements (the rows, grown by 1.5x) times the level-0 links, key, label and
  // the per-element pointer, level and mutex; upper-level links (expected rows / (M - 1),
  // bounded by 4x that); the label map (a node and buckets per row); a visited list.
  const int64_t m = c.hnsw_m, max_elements = rows + rows / 2 + 1;
  const int64_t per_element = (2 * m * 4 + 4) + key + 8 + static_cast<int64_t>(sizeof(char*)) + 4 +
                              static_cast<int64_t>(sizeof(std::mutex)) + 2;
  const int64_t upper = (4 * rows / std::max<int64_t>(1, m - 1) + 64) * (m * 4 + 4);
  return max_elements * per_element + upper + 32 * rows + 8 * (2 * rows + 64);
}

}  // namespace kvrt::cpu_index
