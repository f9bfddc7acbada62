#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "cpu_index/src/kinds.h"
#include "kvrt_cpu_index/index.h"

namespace kvrt::cpu_index {

const char* IndexKindName(IndexKind kind) {
  switch (kind) {
    case IndexKind::kExact: return "exact";
    case IndexKind::kFlat: return "flat";
    case IndexKind::kIvf: return "ivf";
    case IndexKind::kHnsw: return "hnsw";
    case IndexKind::kLandmark: return "landmark";
    case IndexKind::kAttentionAware: return "attention-aware";
    case IndexKind::kCluster: return "cluster";
  }
  return "?";
}

absl::StatusOr<IndexKind> ParseIndexKind(std::string_view name) {
  for (int i = 0; i <= static_cast<int>(IndexKind::kCluster); ++i) {
    const auto kind = static_cast<IndexKind>(i);
    if (name == IndexKindName(kind)) return kind;
  }
  if (name == "aa" || name == "attention_aware") return IndexKind::kAttentionAware;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown index kind '", std::string(name), "' (expected exact, flat, ivf, hnsw, landmark, attention-aware, cluster)"));
}

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeIndex(IndexKind kind, const IndexConfig& config,
                                                    int head_dim) {
  if (head_dim <= 0) return absl::InvalidArgumentError("index: head_dim must be positive");
  switch (kind) {
    case IndexKind::kFlat: return MakeFlatIndex(config, head_dim);
    case IndexKind::kIvf: return MakeIvfIndex(config, head_dim);
    case IndexKind::kHnsw: return MakeHnswIndex(config, head_dim);
    case IndexKind::kLandmark: return MakeLandmarkIndex(config, head_dim);
    case IndexKind::kAttentionAware: return MakeAttentionAwareIndex(config, head_dim);
    case IndexKind::kCluster: return MakeClusterIndex(config, head_dim);
    case IndexKind::kExact: break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("index kind '", IndexKindName(kind), "' has no index object"));
}

absl::Status KeyIndex::SearchGroup(const HeadStore& store, const float* qs, int nq,
                                   const SearchParams& params, SearchResult* outs) const {
  if (nq <= 0 || qs == nullptr || outs == nullptr)
    return absl::InvalidArgumentError("index search: need nq > 0 queries and an output per query");
  for (int i = 0; i < nq; ++i) {
    if (auto s = Search(store, qs + static_cast<std::size_t>(i) * store.dim(), params, &outs[i]); !s.ok())
      return s;
  }
  return absl::OkStatus();
}

void TopK(const float* scores, int64_t n, int k, std::vector<int64_t>* ids,
          std::vector<float>* top_scores) {
  const int64_t kk = std::min<int64_t>(k, n);
  ids->resize(n);
  for (int64_t i = 0; i < n; ++i) (*ids)[i] = i;
  auto better = [scores](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  std::partial_sort(ids->begin(), ids->begin() + kk, ids->end(), better);
  ids->resize(kk);
  if (top_scores) {
    top_scores->resize(kk);
    for (int64_t i = 0; i < kk; ++i) (*top_scores)[i] = scores[(*ids)[i]];
  }
}

}  // namespace kvrt::cpu_index
