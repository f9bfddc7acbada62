#include "index_common.h"

#include <dlfcn.h>

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"

namespace kvrt::cpu_index::internal {

absl::Status CheckBuild(const HeadStore& store, int dim, const float* queries, int64_t n_queries,
                        int64_t max_rows) {
  if (store.dim() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("index build: store head_dim ", store.dim(), " != index head_dim ", dim));
  }
  if (store.size() <= 0) return absl::InvalidArgumentError("index build: the store has no keys");
  if (store.size() > max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("index build: ", store.size(), " keys exceed this kind's limit ", max_rows));
  }
  if (n_queries < 0 || (queries == nullptr && n_queries > 0)) {
    return absl::InvalidArgumentError("index build: queries is null but n_queries > 0");
  }
  return absl::OkStatus();
}

absl::Status CheckAdd(const HeadStore& store, int dim, bool built, int64_t size, int64_t max_rows) {
  if (!built) return absl::FailedPreconditionError("index add: Build has not succeeded");
  if (store.dim() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("index add: store head_dim ", store.dim(), " != index head_dim ", dim));
  }
  if (store.size() < size) {
    return absl::FailedPreconditionError(
        absl::StrCat("index add: store has ", store.size(), " rows but the index covers ", size));
  }
  if (store.size() > max_rows) {
    return absl::ResourceExhaustedError(
        absl::StrCat("index add: ", store.size(), " keys exceed this kind's limit ", max_rows));
  }
  return absl::OkStatus();
}

absl::Status CheckSearch(const HeadStore& store, int dim, bool built, int64_t size, const float* q,
                         const SearchParams& params, const SearchResult* out) {
  if (!built) return absl::FailedPreconditionError("index search: Build has not succeeded");
  if (q == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("index search: null query or result");
  }
  if (params.k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("index search: k must be > 0, got ", params.k));
  }
  if (params.effort < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("index search: effort must be >= 0, got ", params.effort));
  }
  if (store.dim() != dim || store.size() < size) {
    return absl::InvalidArgumentError("index search: the store is not the one this index covers");
  }
  return absl::OkStatus();
}

std::vector<float> KeysF32(const HeadStore& store, int64_t begin, int64_t end) {
  const int d = store.dim();
  std::vector<float> out(static_cast<std::size_t>(end - begin) * d);
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(begin, end, 1024), [&](const tbb::blocked_range<int64_t>& r) {
        ConvertToF32(store.key(r.begin()), store.dtype(), static_cast<std::size_t>(r.size()) * d,
                     out.data() + (r.begin() - begin) * d);
      });
  return out;
}

int BuildThreads(const IndexConfig& config) {
  return config.num_threads > 0 ? config.num_threads : tbb::this_task_arena::max_concurrency();
}

void TakeTopK(std::vector<std::pair<float, int64_t>>* cands, int k, SearchResult* out) {
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const std::size_t kk = std::min<std::size_t>(static_cast<std::size_t>(k), cands->size());
  std::partial_sort(cands->begin(), cands->begin() + kk, cands->end(), better);
  out->ids.resize(kk);
  out->scores.resize(kk);
  for (std::size_t i = 0; i < kk; ++i) {
    out->ids[i] = (*cands)[i].second;
    out->scores[i] = (*cands)[i].first;
  }
}

void UseSingleThreadedBlas() {
  using SetThreads = void (*)(int);
  static const bool done = [] {
    if (auto* f = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
      f(1);
    }
    return true;
  }();
  (void)done;
}

VisitedSet& VisitedSet::ForThisThread(int64_t n) {
  thread_local VisitedSet set;
  if (static_cast<int64_t>(set.marks_.size()) < n) {
    set.marks_.assign(static_cast<std::size_t>(n + n / 4 + 64), 0);
    set.epoch_ = 0;
  }
  if (++set.epoch_ == 0) {  // wrapped: marks from 2^32 searches ago would alias
    std::fill(set.marks_.begin(), set.marks_.end(), 0);
    set.epoch_ = 1;
  }
  return set;
}

}  // namespace kvrt::cpu_index::internal
