// ivf: FAISS 1.7.3 IndexIVFFlat with inner product over an IndexFlatIP coarse quantizer; the
// off-the-shelf baseline. FAISS keeps its own f32 copy of every key (counted in MemoryBytes).
//
// Search: the coarse quantizer picks `nprobe` lists (effort), then search_preassigned scans them
// with a per-call SearchParametersIVF, so concurrent searches never touch the shared `nprobe`.
// `scanned` = nlist (query vs every centroid) + the sizes of the probed lists.
// Scores are recomputed from the HeadStore for the returned ids (k dot products, not counted as
// scanned: the keys were already scored by FAISS) so that every kind reports the same q.k as flat.
#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "faiss/IndexFlat.h"
#include "faiss/IndexIVFFlat.h"
#include "faiss/invlists/InvertedLists.h"
#include "index_common.h"
#include "kinds.h"

namespace kvrt::cpu_index {
namespace {

// FAISS warns (on stderr) when k-means has fewer than 39 points per centroid; we never print.
constexpr int64_t kMinPointsPerList = 39;
constexpr int64_t kMaxRows = std::numeric_limits<int64_t>::max() / 4;

// Rows [begin, end)'s keys in f32, a key holding NaN/Inf (check_finite = 0) as zeros: FAISS's
// k-means fails on it (at every later refresh too, so the head fell back to exact scans for good),
// and the runtime attends such rows whatever the search returns (AddNonfinite). The row keeps its
// number, so FAISS's ids stay the store's rows.
std::vector<float> FiniteKeysF32(const HeadStore& store, int64_t begin, int64_t end) {
  std::vector<float> x = internal::KeysF32(store, begin, end);
  const int d = store.dim();
  for (int64_t r : store.nonfinite_rows()) {
    if (r < begin || r >= end) continue;
    float* row = x.data() + (r - begin) * d;
    if (!std::all_of(row, row + d, [](float e) { return std::isfinite(e); }))
      std::fill(row, row + d, 0.f);
  }
  return x;
}

class IvfIndex final : public KeyIndex {
 public:
  IvfIndex(const IndexConfig& config, int dim) : config_(config), dim_(dim) {}

  IndexKind kind() const override { return IndexKind::kIvf; }

  absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) override {
    if (auto s = internal::CheckBuild(store, dim_, queries, n_queries, kMaxRows); !s.ok()) return s;
    built_ = false;
    ivf_.reset();
    quantizer_.reset();
    const int64_t n = store.size();
    int64_t nlist =
        config_.ivf_nlist > 0
            ? config_.ivf_nlist
            : static_cast<int64_t>(std::lround(4.0 * std::sqrt(static_cast<double>(n))));
    // NOTE: clamped so that k-means has enough points (FAISS fails below 1 point per list and
    // warns on stderr below 39).
    nlist = std::clamp<int64_t>(nlist, 1, std::max<int64_t>(1, n / kMinPointsPerList));
    try {
      quantizer_ = std::make_unique<faiss::IndexFlatIP>(dim_);
      ivf_ = std::make_unique<faiss::IndexIVFFlat>(quantizer_.get(), dim_, nlist,
                                                   faiss::METRIC_INNER_PRODUCT);
      ivf_->cp.seed = static_cast<int>(config_.seed);
      ivf_->cp.verbose = false;
      const std::vector<float> x = FiniteKeysF32(store, 0, n);
      internal::OmpThreadsGuard omp(internal::BuildThreads(config_));
      ivf_->train(n, x.data());
      ivf_->add(n, x.data());
    } catch (const std::exception& e) {
      ivf_.reset();
      quantizer_.reset();
      return absl::InternalError(absl::StrCat("ivf build: ", e.what()));
    }
    size_ = n;
    built_ = true;
    return absl::OkStatus();
  }

  absl::Status Add(const HeadStore& store) override {
    if (auto s = internal::CheckAdd(store, dim_, built_, size_, kMaxRows); !s.ok()) return s;
    const int64_t n = store.size();
    if (n == size_) return absl::OkStatus();
    try {
      const std::vector<float> x = FiniteKeysF32(store, size_, n);
      internal::OmpThreadsGuard omp(1);  // inserts are small and run on a worker thread
      ivf_->add(n - size_, x.data());    // FAISS numbers them ntotal.., i.e. the store rows
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("ivf add: ", e.what()));
    }
    size_ = n;
    return absl::OkStatus();
  }

  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, q, params, out); !s.ok()) {
      return s;
    }
    const int64_t nlist = static_cast<int64_t>(ivf_->nlist);
    const int64_t k = std::min<int64_t>(params.k, size_);
    // nprobe: the effort (or the default), then grown until the probed lists hold enough keys:
    // k for an explicit effort, so that a search returns k results, and
    // ivf_default_keys_per_result * k for the default, so that the default scales with k (measured:
    // nprobe 16 at k = 1000 returned 621 results, recall 0.52). Every centroid is scored anyway
    // (FAISS's coarse search), so ranking all lists costs nothing more.
    const int64_t base = std::clamp<int64_t>(
        params.effort > 0 ? params.effort : config_.ivf_default_nprobe, 1, nlist);
    const int64_t want =
        std::min<int64_t>(size_, params.effort > 0 ? k : config_.ivf_default_keys_per_result * k);
    thread_local std::vector<faiss::Index::idx_t> assign, labels;
    thread_local std::vector<float> coarse, dist;
    assign.resize(nlist);
    coarse.resize(nlist);
    labels.resize(k);
    dist.resize(k);
    int64_t scanned = nlist, nprobe = 0;
    try {
      internal::OmpThreadsGuard omp(1);
      quantizer_->search(1, q, nlist, coarse.data(), assign.data());  // every list, best first
      for (int64_t covered = 0; nprobe < nlist && (nprobe < base || covered < want); ++nprobe) {
        const auto list = assign[nprobe];
        const int64_t n = list >= 0 ? static_cast<int64_t>(ivf_->invlists->list_size(list)) : 0;
        covered += n;
        scanned += n;
      }
      faiss::SearchParametersIVF sp;
      sp.nprobe = static_cast<std::size_t>(nprobe);
      ivf_->search_preassigned(1, q, k, assign.data(), coarse.data(), dist.data(), labels.data(),
                               /*store_pairs=*/false, &sp, nullptr);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("ivf search: ", e.what()));
    }
    thread_local std::vector<std::pair<float, int64_t>> cands;
    cands.clear();
    for (auto id : labels) {
      if (id >= 0) cands.emplace_back(DotRow(q, store.key(id), dim_, store.dtype()), id);
    }
    internal::TakeTopK(&cands, params.k, out);
    out->scanned = scanned;
    return absl::OkStatus();
  }

  int64_t size() const override { return size_; }

  std::size_t MemoryBytes() const override {
    if (!ivf_) return 0;
    std::size_t bytes = static_cast<std::size_t>(quantizer_->ntotal) * dim_ * sizeof(float);
    const auto* lists = dynamic_cast<const faiss::ArrayInvertedLists*>(ivf_->invlists);
    if (lists != nullptr) {
      for (std::size_t l = 0; l < lists->nlist; ++l) {
        bytes +=
            lists->codes[l].capacity() + lists->ids[l].capacity() * sizeof(faiss::Index::idx_t);
        bytes += 2 * sizeof(std::vector<int>);
      }
    } else {
      bytes += static_cast<std::size_t>(size_) * (dim_ * sizeof(float) + sizeof(int64_t));
    }
    return bytes;
  }

 private:
  IndexConfig config_;
  int dim_;
  bool built_ = false;
  int64_t size_ = 0;
  std::unique_ptr<faiss::IndexFlatIP> quantizer_;  // declared first: ivf_ points into it
  std::unique_ptr<faiss::IndexIVFFlat> ivf_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeIvfIndex(const IndexConfig& config, int head_dim) {
  if (config.ivf_nlist < 0 || config.ivf_default_nprobe <= 0) {
    return absl::InvalidArgumentError("ivf: ivf_nlist must be >= 0 and ivf_default_nprobe > 0");
  }
  return std::unique_ptr<KeyIndex>(new IvfIndex(config, head_dim));
}

std::string IvfSearchSettings(const IndexConfig& c, int k, int effort) {
  return effort > 0 ? absl::StrCat("nprobe=", effort, "+ (lists holding >= ", k, " keys)")
                    : absl::StrCat("nprobe=", c.ivf_default_nprobe, "+ (lists holding >= ",
                                   int64_t{c.ivf_default_keys_per_result} * k, " keys)");
}

int64_t IvfBytesBound(const IndexConfig& c, int head_dim, int64_t rows) {
  const int64_t d = head_dim, key = 4 * d;  // indexes keep f32 keys
  (void)d;
  // Centroids (nlist <= 4 sqrt(n) + 1 unless set), list vectors that double as they grow.
  const int64_t nlist = c.ivf_nlist > 0
                            ? c.ivf_nlist
                            : static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(rows))) + 1;
  return nlist * (key + 2 * 24) + 2 * rows * (key + 8);
}

}  // namespace kvrt::cpu_index
