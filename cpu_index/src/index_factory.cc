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
    if (auto s = Search(store, qs + static_cast<std::size_t>(i) * store.dim(), params, &outs[i]); !s.ok())
      return s;
  }
  return absl::OkStatus();
}

std::string SearchSettings(IndexKind kind, const IndexConfig& c, int k, int effort) {
  switch (kind) {
    case IndexKind::kExact:
      return "all cold tokens (no search)";
    case IndexKind::kFlat:
      return "exact top-k (full scan)";
    case IndexKind::kIvf:
      return effort > 0 ? absl::StrCat("nprobe=", effort, "+ (lists holding >= ", k, " keys)")
                        : absl::StrCat("nprobe=", c.ivf_default_nprobe, "+ (lists holding >= ",
                                       int64_t{c.ivf_default_keys_per_result} * k, " keys)");
    case IndexKind::kHnsw:
      return absl::StrCat("ef=", std::max(k, effort > 0 ? effort : c.hnsw_default_ef),
                          " (exact scan when k or ef >= the keys, or the graph returns < k)");
    case IndexKind::kLandmark: {
      const int64_t blocks = effort > 0                      ? effort
                             : c.landmark_default_blocks > 0 ? c.landmark_default_blocks
                                                             : (4 * int64_t{k} + c.landmark_block - 1) / c.landmark_block;
      return absl::StrCat("blocks=", blocks, " (", blocks * c.landmark_block, " tokens)");
    }
    case IndexKind::kAttentionAware:
      return absl::StrCat("beam=", std::max(k, effort > 0 ? effort : c.graph_default_beam > 0 ? c.graph_default_beam : 2 * k));
  }
  return "?";
}

int64_t IndexBytesBound(IndexKind kind, const IndexConfig& c, int head_dim, int64_t rows) {
  if (rows <= 0) return 0;
  const int64_t d = head_dim, key = 4 * d;  // indexes keep f32 keys
  switch (kind) {
    case IndexKind::kExact:
    case IndexKind::kFlat:
      return 0;
    case IndexKind::kIvf: {
      // Centroids (nlist <= 4 sqrt(n) + 1 unless set), list vectors that double as they grow.
      const int64_t nlist = c.ivf_nlist > 0 ? c.ivf_nlist
                                            : static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(rows))) + 1;
      return nlist * (key + 2 * 24) + 2 * rows * (key + 8);
    }
    case IndexKind::kHnsw: {
      // hnswlib: max_elements (the rows, grown by 1.5x) times the level-0 links, key, label and
      // the per-element pointer, level and mutex; upper-level links (expected rows / (M - 1),
      // bounded by 4x that); the label map (a node and buckets per row); a visited list.
      const int64_t m = c.hnsw_m, max_elements = rows + rows / 2 + 1;
      const int64_t per_element = (2 * m * 4 + 4) + key + 8 + static_cast<int64_t>(sizeof(char*)) + 4 +
                                  static_cast<int64_t>(sizeof(std::mutex)) + 2;
      const int64_t upper = (4 * rows / std::max<int64_t>(1, m - 1) + 64) * (m * 4 + 4);
      return max_elements * per_element + upper + 32 * rows + 8 * (2 * rows + 64);
    }
    case IndexKind::kLandmark: {
      const int64_t blocks = (rows + c.landmark_block - 1) / std::max(1, c.landmark_block);
      return 2 * blocks * 2 * key;  // two bound vectors per block; the vector may double
    }
    case IndexKind::kAttentionAware:
      // Links (grown by 1.25x), entry list, routing queries (256 at most) and their 8 keys.
      return (5 * rows * (c.graph_degree - 1) * 4) / 4 + 4 + 2 * (rows + 64) * 4 + 256 * (key + 8 * 4);
  }
  return 0;
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
