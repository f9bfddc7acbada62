#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvrt_cpu_index/index.h"
#include "kvrt_cpu_index/kind_table.h"

namespace kvrt::cpu_index {

const char* IndexKindName(IndexKind kind) {
  return IsIndexKind(static_cast<int>(kind)) ? KindInfo(kind).name : "?";
}

absl::StatusOr<IndexKind> ParseIndexKind(std::string_view name) {
  std::string expected;
  for (const auto& row : KindTable()) {
    if (name == row.name || (row.alias != nullptr && name == row.alias)) return row.kind;
    absl::StrAppend(&expected, expected.empty() ? "" : ", ", row.name);
  }
  if (name == "aa") return IndexKind::kAttentionAware;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown index kind '", std::string(name), "' (expected ", expected, ")"));
}

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeIndex(IndexKind kind, const IndexConfig& config,
                                                    int head_dim) {
  if (head_dim <= 0) return absl::InvalidArgumentError("index: head_dim must be positive");
  if (!IsIndexKind(static_cast<int>(kind)))
    return absl::InvalidArgumentError(
        absl::StrCat("index kind ", static_cast<int>(kind), " does not exist"));
  const KindDescriptor& row = KindInfo(kind);
  if (row.make == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat("index kind '", row.name, "' has no index object"));
  return row.make(config, head_dim);
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
