// flat: exact scan of every key; the oracle the other kinds are tested against.
#include <vector>

#include "kinds.h"

namespace kvrt::cpu_index {
namespace {

class FlatIndex final : public KeyIndex {
 public:
  IndexKind kind() const override { return IndexKind::kFlat; }
  absl::Status Build(const HeadStore& store, const float*, int64_t) override {
    size_ = store.size();
    return absl::OkStatus();
  }
  absl::Status Add(const HeadStore& store) override {
    size_ = store.size();
    return absl::OkStatus();
  }
  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    std::vector<float> scores(size_);
    store.Dot(q, 0, size_, scores.data());
    TopK(scores.data(), size_, params.k, &out->ids, &out->scores);
    out->scanned = size_;
    return absl::OkStatus();
  }
  int64_t size() const override { return size_; }
  std::size_t MemoryBytes() const override { return 0; }

 private:
  int64_t size_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeFlatIndex(const IndexConfig&, int) {
  return std::unique_ptr<KeyIndex>(new FlatIndex());
}

std::string FlatSearchSettings(const IndexConfig&, int, int) { return "exact top-k (full scan)"; }

}  // namespace kvrt::cpu_index
