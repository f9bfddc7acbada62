// The hot cache's bookkeeping (runtime/src/hot_cache_map.h): whole groups in pages, LRU eviction
// that never evicts a group the current step uses, row-count changes and unstable groups dropped.
#include <algorithm>
#include <set>

#include "gtest/gtest.h"
#include "runtime/src/hot_cache_map.h"

namespace kvrt::runtime {
namespace {

using Group = HotCacheMap::Group;

TEST(HotCacheMap, GroupsTakeWholePagesAndAreFoundAgain) {
  HotCacheMap map(8, 16);
  map.NextStep();
  const auto* a = map.Insert({0, 100, 20, true});  // 2 pages
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->size(), 2u);
  const auto* b = map.Insert({1, 100, 16, true});  // another kv head, same begin: another group
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->size(), 1u);
  EXPECT_EQ(map.free_pages(), 5);
  std::set<int32_t> pages(a->begin(), a->end());
  pages.insert(b->begin(), b->end());
  EXPECT_EQ(pages.size(), 3u) << "pages are not shared";
  map.NextStep();
  const auto* found = map.Find({0, 100, 20, true});
  ASSERT_NE(found, nullptr);
  EXPECT_FALSE(map.used_before_in_step());
  EXPECT_NE(map.Find({0, 100, 20, true}), nullptr);
  EXPECT_TRUE(map.used_before_in_step()) << "a second q head of the group finds it again";
  EXPECT_EQ(map.Find({0, 101, 20, true}), nullptr);
}

TEST(HotCacheMap, EvictsLeastRecentlyUsedButNothingThisStepUses) {
  HotCacheMap map(4, 16);
  map.NextStep();
  ASSERT_NE(map.Insert({0, 0, 16, true}), nullptr);
  ASSERT_NE(map.Insert({0, 16, 16, true}), nullptr);
  map.NextStep();
  ASSERT_NE(map.Insert({0, 32, 16, true}), nullptr);
  ASSERT_NE(map.Find({0, 0, 16, true}), nullptr);  // group 0 used again: 16 is the LRU
  ASSERT_NE(map.Insert({0, 48, 16, true}), nullptr);
  EXPECT_EQ(map.free_pages(), 0);
  map.NextStep();
  ASSERT_NE(map.Find({0, 32, 16, true}), nullptr);
  ASSERT_NE(map.Insert({0, 64, 32, true}), nullptr);  // evicts 16, then 0 (32 is in use)
  EXPECT_EQ(map.Find({0, 16, 16, true}), nullptr);
  EXPECT_EQ(map.Find({0, 0, 16, true}), nullptr);
  EXPECT_NE(map.Find({0, 32, 16, true}), nullptr);
  ASSERT_NE(map.Find({0, 48, 16, true}), nullptr);
  // Everything left is used by this step: no room, nothing cached, nothing evicted.
  EXPECT_EQ(map.Insert({0, 96, 16, true}), nullptr);
  EXPECT_EQ(map.groups(), 3);
  EXPECT_EQ(map.Insert({0, 200, 5 * 16, true}), nullptr) << "larger than the pool";
}

TEST(HotCacheMap, AGroupThatGrewOrIsUnstableIsDropped) {
  HotCacheMap map(8, 16);
  map.NextStep();
  ASSERT_NE(map.Insert({0, 0, 16, true}), nullptr);
  ASSERT_NE(map.Insert({0, 64, 10, false}), nullptr);  // a chunk of unclustered rows
  EXPECT_EQ(map.free_pages(), 6);
  map.NextStep();
  EXPECT_EQ(map.Find({0, 64, 12, false}), nullptr) << "the chunk grew: its copy is stale";
  EXPECT_EQ(map.free_pages(), 7);
  ASSERT_NE(map.Insert({0, 64, 12, false}), nullptr);
  map.DropUnstable();
  EXPECT_EQ(map.groups(), 1);
  EXPECT_EQ(map.free_pages(), 7);
  EXPECT_NE(map.Find({0, 0, 16, true}), nullptr);
}

}  // namespace
}  // namespace kvrt::runtime
