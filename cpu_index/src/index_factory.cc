#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
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
    if (auto s = Search(store, qs + static_cast<std::size_t>(i) * store.dim(), params, &outs[i]);
        !s.ok())
      return s;
  }
  return absl::OkStatus();
}

std::string SearchSettings(IndexKind kind, const IndexConfig& config, int k, int effort) {
  if (!IsIndexKind(static_cast<int>(kind))) return "?";
  return KindInfo(kind).describe_search(config, k, effort);
}

int64_t IndexBytesBound(IndexKind kind, const IndexConfig& config, int head_dim, int64_t rows) {
  if (rows <= 0 || !IsIndexKind(static_cast<int>(kind))) return 0;
  const auto bound = KindInfo(kind).bytes_bound;
  return bound == nullptr ? 0 : bound(config, head_dim, rows);
}

void TopK(const float* scores, int64_t n, int k, std::vector<int64_t>* ids,
          std::vector<float>* top_scores) {
  const int64_t kk = std::min<int64_t>(k, n);
  ids->resize(n);
  for (int64_t i = 0; i < n; ++i) (*ids)[i] = i;
  // NOTE: NaN ranks above every number (a strict weak order, which partial_sort needs), so a
  // key that scores NaN is retrieved and its NaN reaches the attention output (kvrt.h,
  // check_finite = 0) instead of being dropped silently.
  auto rank = [scores](int64_t i) {
    const float x = scores[i];
    return x != x ? std::numeric_limits<float>::infinity() : x;
  };
  auto better = [scores, rank](int64_t a, int64_t b) {
    const float ra = rank(a), rb = rank(b);
    if (ra != rb) return ra > rb;
    const bool na = scores[a] != scores[a], nb = scores[b] != scores[b];
    if (na != nb) return na;  // NaN before +inf
    return a < b;
  };
  std::partial_sort(ids->begin(), ids->begin() + kk, ids->end(), better);
  ids->resize(kk);
  if (top_scores) {
    top_scores->resize(kk);
    for (int64_t i = 0; i < kk; ++i) (*top_scores)[i] = scores[(*ids)[i]];
  }
}

}  // namespace kvrt::cpu_index
