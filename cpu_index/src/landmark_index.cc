// landmark: fixed blocks of B consecutive rows, each with a per-channel [min, max] box of its
// keys. Quest (Tang et al., arXiv 2406.10774, section 3) bounds q.k for every key of a block by
//   U(q, block) = sum_i max(q_i * min_i, q_i * max_i)  >=  q.k.
// Search scores every block's bound, takes the `effort` blocks with the largest bounds and
// scores their keys exactly. Memory access is sequential (bounds array, then whole blocks).
//
// SearchGroup (GQA) reads the bounds once for all queries of a kv head's group.
//
// `scanned` accounting: a bound reads 2*d floats and costs about two dot products, so each
// block counts as 2 keys; plus every key scored exactly inside the chosen blocks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "index_common.h"
#include "kinds.h"
#include "kvrt_common/multiversion.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"

namespace kvrt::cpu_index {
namespace {

// Blocks a search scores: the effort, else the configured default, else 4 k tokens' worth; never
// fewer than k tokens' worth, as the other kinds never search fewer than k (an effort of 1 gave
// 32 of top_k 100 tokens before 0.3.37).
int64_t LandmarkBlocks(const IndexConfig& c, int k, int effort) {
  const int64_t block = c.landmark_block, floor = (int64_t{k} + block - 1) / block;
  const int64_t want = effort > 0                      ? effort
                       : c.landmark_default_blocks > 0 ? c.landmark_default_blocks
                                                       : (4 * int64_t{k} + block - 1) / block;
  return std::max(want, floor);
}

constexpr int64_t kMaxRows = std::numeric_limits<int64_t>::max() / 4;
constexpr int kMaxGroup = 64;  // SearchGroup's stack row of scores; larger groups loop over Search
constexpr int64_t kBoundGrain = 512;  // blocks per task of SearchGroup's bound pass

KVRT_MULTIVERSION float BlockBound(const float* q, const float* mn, const float* mx, int d) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += std::max(q[i + j] * mn[i + j], q[i + j] * mx[i + j]);
  float s = 0.f;
  for (; i < d; ++i) s += std::max(q[i] * mn[i], q[i] * mx[i]);
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

class LandmarkIndex final : public KeyIndex {
 public:
  LandmarkIndex(const IndexConfig& config, int dim)
      : config_(config), dim_(dim), block_(std::max(1, config.landmark_block)) {}

  IndexKind kind() const override { return IndexKind::kLandmark; }

  absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) override {
    if (auto s = internal::CheckBuild(store, dim_, queries, n_queries, kMaxRows); !s.ok()) return s;
    built_ = false;
    size_ = 0;
    bounds_.clear();
    Extend(store);
    built_ = true;
    return absl::OkStatus();
  }

  absl::Status Add(const HeadStore& store) override {
    if (auto s = internal::CheckAdd(store, dim_, built_, size_, kMaxRows); !s.ok()) return s;
    Extend(store);
    return absl::OkStatus();
  }

  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, q, params, out); !s.ok()) {
      return s;
    }
    const int64_t nb = num_blocks();
    const int64_t want = BlocksWanted(params, nb);

    thread_local std::vector<std::pair<float, int64_t>> blocks;
    thread_local std::vector<std::pair<float, int64_t>> cands;
    thread_local std::vector<float> scores;
    blocks.resize(nb);
    for (int64_t b = 0; b < nb; ++b) {
      const float* box = bounds_.data() + static_cast<std::size_t>(b) * 2 * dim_;
      blocks[b] = {BlockBound(q, box, box + dim_, dim_), b};
    }
    SelectBest(&blocks, want);
    cands.clear();
    int64_t scored = 0;
    for (int64_t i = 0; i < want; ++i) {
      const int64_t begin = blocks[i].second * block_;
      const int64_t end = std::min(size_, begin + block_);
      scores.resize(end - begin);
      store.Dot(q, begin, end, scores.data());
      for (int64_t r = begin; r < end; ++r) cands.emplace_back(scores[r - begin], r);
      scored += end - begin;
    }
    internal::TakeTopK(&cands, params.k, out);
    out->scanned = 2 * nb + scored;
    internal::TrimScratch(&cands);
    internal::TrimScratch(&scores);
    return absl::OkStatus();
  }

  // One pass over the block bounds for the whole group (the bounds are the bulk of the memory a
  // search reads); each query picks its own top blocks; the union of the picked blocks is scored
  // exactly by every query (each key read once) and each query keeps its top-k of the union.
  absl::Status SearchGroup(const HeadStore& store, const float* qs, int nq,
                           const SearchParams& params, SearchResult* outs) const override {
    if (nq <= 1 || outs == nullptr || nq > kMaxGroup)
      return KeyIndex::SearchGroup(store, qs, nq, params, outs);
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, qs, params, outs); !s.ok())
      return s;
    const int64_t nb = num_blocks();
    const int64_t want = BlocksWanted(params, nb);
    thread_local std::vector<float> bound;  // [nb, nq]
    thread_local std::vector<std::pair<float, int64_t>> blocks;
    thread_local std::vector<uint8_t> picked;
    bound.resize(static_cast<std::size_t>(nb) * nq);
    float* bound_data = bound.data();
    // NOTE: split over blocks (nested in the caller's per-group task): with one sequence there are
    // only num_kv_heads groups, fewer than the cores, and this pass is most of the search.
    // Isolated: while this thread waits for the nested tasks it must not take another group's
    // search, which would refill (or reallocate) this thread's `bound` under this one.
    tbb::this_task_arena::isolate([&] {
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, nb, kBoundGrain),
                        [&](const tbb::blocked_range<int64_t>& r) {
                          for (int64_t b = r.begin(); b < r.end(); ++b) {
                            const float* box =
                                bounds_.data() + static_cast<std::size_t>(b) * 2 * dim_;
                            for (int i = 0; i < nq; ++i)
                              bound_data[static_cast<std::size_t>(b) * nq + i] = BlockBound(
                                  qs + static_cast<std::size_t>(i) * dim_, box, box + dim_, dim_);
                          }
                        });
    });
    picked.assign(nb, 0);
    for (int i = 0; i < nq; ++i) {
      blocks.resize(nb);
      for (int64_t b = 0; b < nb; ++b) blocks[b] = {bound[static_cast<std::size_t>(b) * nq + i], b};
      SelectBest(&blocks, want);
      for (int64_t j = 0; j < want; ++j) picked[blocks[j].second] = 1;
    }
    thread_local std::vector<std::vector<std::pair<float, int64_t>>> cands;
    cands.resize(nq);
    for (auto& c : cands) c.clear();
    float row[kMaxGroup];
    int64_t scored = 0;
    const DType t = store.dtype();
    for (int64_t b = 0; b < nb; ++b) {
      if (!picked[b]) continue;
      const int64_t end = std::min(size_, (b + 1) * block_);
      for (int64_t r = b * block_; r < end; ++r) {
        DotRowMulti(qs, nq, store.key(r), dim_, t, row);
        for (int i = 0; i < nq; ++i) cands[i].emplace_back(row[i], r);
      }
      scored += end - b * block_;
    }
    std::size_t held = 0;
    for (int i = 0; i < nq; ++i) {
      internal::TakeTopK(&cands[i], params.k, &outs[i]);
      outs[i].scanned = 2 * nb + scored;
      held += cands[i].capacity() * sizeof(cands[i][0]);
    }
    if (held > internal::kKeepScratchBytes) cands.clear();  // the group's lists together
    internal::TrimScratch(&bound);
    return absl::OkStatus();
  }

  int64_t size() const override { return size_; }
  std::size_t MemoryBytes() const override { return bounds_.capacity() * sizeof(float); }

 private:
  int64_t num_blocks() const { return (size_ + block_ - 1) / block_; }
  int64_t BlocksWanted(const SearchParams& params, int64_t nb) const {
    return std::clamp<int64_t>(LandmarkBlocks(config_, params.k, params.effort), 1, nb);
  }
  // Moves the `want` largest (bound, block) pairs to the front (ties: lower block first).
  static void SelectBest(std::vector<std::pair<float, int64_t>>* blocks, int64_t want) {
    if (want >= static_cast<int64_t>(blocks->size())) return;
    std::nth_element(blocks->begin(), blocks->begin() + want, blocks->end(),
                     [](const auto& a, const auto& b) {
                       return a.first > b.first || (a.first == b.first && a.second < b.second);
                     });
  }

  // Covers rows [size_, store.size()): refreshes the last partial block, then new blocks.
  void Extend(const HeadStore& store) {
    const int64_t n = store.size();
    if (n == size_) return;
    const int64_t first_block = size_ / block_;  // the partial block (or the first new one)
    const int64_t nb = (n + block_ - 1) / block_;
    bounds_.resize(static_cast<std::size_t>(nb) * 2 * dim_);
    tbb::parallel_for(tbb::blocked_range<int64_t>(first_block, nb, 16),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        std::vector<float> row(dim_);
                        for (int64_t b = r.begin(); b < r.end(); ++b) {
                          float* mn = bounds_.data() + static_cast<std::size_t>(b) * 2 * dim_;
                          float* mx = mn + dim_;
                          std::fill(mn, mn + dim_, std::numeric_limits<float>::infinity());
                          std::fill(mx, mx + dim_, -std::numeric_limits<float>::infinity());
                          const int64_t end = std::min(n, (b + 1) * block_);
                          for (int64_t i = b * block_; i < end; ++i) {
                            store.KeyF32(i, row.data());
                            for (int c = 0; c < dim_; ++c) {
                              mn[c] = std::min(mn[c], row[c]);
                              mx[c] = std::max(mx[c], row[c]);
                            }
                          }
                        }
                      });
    size_ = n;
  }

  IndexConfig config_;
  int dim_;
  int64_t block_;
  bool built_ = false;
  int64_t size_ = 0;
  std::vector<float> bounds_;  // [blocks, 2, dim]: per-channel min then max
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeLandmarkIndex(const IndexConfig& config,
                                                            int head_dim) {
  if (config.landmark_block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("landmark: landmark_block must be > 0, got ", config.landmark_block));
  }
  return std::unique_ptr<KeyIndex>(new LandmarkIndex(config, head_dim));
}

std::string LandmarkSearchSettings(const IndexConfig& c, int k, int effort) {
  const int64_t blocks = LandmarkBlocks(c, k, effort);
  return absl::StrCat("blocks=", blocks, " (", blocks * c.landmark_block, " tokens)");
}

int64_t LandmarkBytesBound(const IndexConfig& c, int head_dim, int64_t rows) {
  const int64_t d = head_dim, key = 4 * d;  // indexes keep f32 keys
  (void)d;
  const int64_t blocks = (rows + c.landmark_block - 1) / std::max(1, c.landmark_block);
  return 2 * blocks * 2 * key;  // two bound vectors per block; the vector may double
}

}  // namespace kvrt::cpu_index
