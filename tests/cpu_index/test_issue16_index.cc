// Issue 16 regressions of the index kinds: searches return k results whatever the default effort
// (ivf nprobe, hnsw graph reach), the reports' resolved settings, and the memory bound that
// host_memory_limit reserves before an index grows.
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "oneapi/tbb/task_arena.h"
#include "tests/cpu_index/ood_data.h"

namespace kvrt::cpu_index {
namespace {

constexpr int kDim = 64;

std::unique_ptr<HeadStore> F32Store(const float* keys, int64_t n) {
  auto store = std::make_unique<HeadStore>(kDim, DType::kF32);
  EXPECT_TRUE(store->Append(keys, keys, n, kDim).ok());
  return store;
}

// ---- defect 2: IndexBytesBound bounds MemoryBytes, built at once or grown ----------------------

TEST(Issue16Budget, IndexBytesBoundIsAnUpperBound) {
  const auto ood = testing::MakeOodData(6000, kDim, 512, 1, 9);
  tbb::task_arena arena(2);
  for (IndexKind kind : {IndexKind::kFlat, IndexKind::kIvf, IndexKind::kHnsw, IndexKind::kLandmark,
                         IndexKind::kAttentionAware}) {
    // Built at once at several sizes.
    for (int64_t n : {256, 700, 3000, 6000}) {
      auto store = F32Store(ood.keys.data(), n);
      auto index = MakeIndex(kind, {}, kDim).value();
      arena.execute([&] { ASSERT_TRUE(index->Build(*store, ood.prompt_queries.data(), ood.n_prompt).ok()); });
      EXPECT_LE(static_cast<int64_t>(index->MemoryBytes()), IndexBytesBound(kind, {}, kDim, n))
          << IndexKindName(kind) << " built over " << n;
    }
    // Grown from 256 rows one row, then a chunk, at a time.
    HeadStore store(kDim, DType::kF32);
    ASSERT_TRUE(store.Append(ood.keys.data(), ood.keys.data(), 256, kDim).ok());
    auto index = MakeIndex(kind, {}, kDim).value();
    arena.execute([&] { ASSERT_TRUE(index->Build(store, ood.prompt_queries.data(), ood.n_prompt).ok()); });
    for (int64_t n = 257; n <= 6000; n += n < 600 ? 1 : 397) {
      const int64_t add = n - store.size();
      ASSERT_TRUE(store.Append(ood.keys.data() + store.size() * kDim, ood.keys.data() + store.size() * kDim, add,
                               kDim).ok());
      arena.execute([&] { ASSERT_TRUE(index->Add(store).ok()); });
      ASSERT_LE(static_cast<int64_t>(index->MemoryBytes()), IndexBytesBound(kind, {}, kDim, n))
          << IndexKindName(kind) << " grown to " << n;
    }
  }
}

}  // namespace
}  // namespace kvrt::cpu_index
