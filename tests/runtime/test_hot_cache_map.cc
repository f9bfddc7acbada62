// The hot cache's bookkeeping (runtime/src/hot_cache_map.h): whole groups in pages, LRU eviction
// that never evicts a group the current step uses, row-count changes and unstable groups dropped.
#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/src/block_page_cache.h"
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

// The direct step's block table (runtime/src/block_page_cache.h): CLOCK per kv head.
namespace kvrt::runtime {
namespace {

TEST(BlockPageCache, MissesGetPagesAndHitNextStep) {
  BlockPageCache c(2, 4);
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 10, true));
  EXPECT_FALSE(c.Use(1, 10, true));
  EXPECT_FALSE(c.Use(0, 11, false)) << "not admitted";
  EXPECT_EQ(c.page(0, 11), -1);
  const int32_t p0 = c.page(0, 10), p1 = c.page(1, 10);
  EXPECT_GE(p0, 0);
  EXPECT_LT(p0, 4) << "head 0 owns pages [0, 4)";
  EXPECT_GE(p1, 4);
  EXPECT_LT(p1, 8) << "head 1 owns pages [4, 8)";
  const auto ups = c.TakeUpdates();
  ASSERT_EQ(ups.size(), 2u);
  EXPECT_TRUE(c.TakeUpdates().empty());
  c.NextStep();
  EXPECT_TRUE(c.Use(0, 10, true));
  EXPECT_TRUE(c.TakeUpdates().empty()) << "a hit changes nothing";
}

TEST(BlockPageCache, EvictsUnreferencedPagesButNeverOneThisStepUses) {
  BlockPageCache c(1, 3);
  c.NextStep();
  for (int64_t b : {1, 2, 3}) EXPECT_FALSE(c.Use(0, b, true));
  EXPECT_FALSE(c.Use(0, 4, true));
  EXPECT_EQ(c.page(0, 4), -1) << "every page is held by a block of this step";
  (void)c.TakeUpdates();
  c.NextStep();
  EXPECT_TRUE(c.Use(0, 2, true));  // 2 stays referenced
  EXPECT_FALSE(c.Use(0, 5, true));
  EXPECT_GE(c.page(0, 5), 0);
  EXPECT_GE(c.page(0, 2), 0) << "a block used in this step keeps its page";
  EXPECT_EQ(c.blocks_held(0), 3);
  std::set<int32_t> pages;
  for (int64_t b : {1, 2, 3, 4, 5})
    if (c.page(0, b) >= 0) pages.insert(c.page(0, b));
  EXPECT_EQ(pages.size(), 3u) << "pages are distinct";
}

TEST(BlockPageCache, UpdatesCarryEachBlockOnceWithItsFinalPage) {
  BlockPageCache c(1, 1);
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 7, true));
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 8, true));  // takes 7's page (7's bit is cleared on the first sweep)
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 7, true));  // and back
  const auto ups = c.TakeUpdates();
  ASSERT_EQ(ups.size(), 2u);
  for (const auto& u : ups) EXPECT_EQ(u.page, u.block == 7 ? 0 : -1) << u.block;
}

// UseHeld is Use(g, b, false) over a list: two policies, one stepped each way, then admitting the
// same misses, stay identical (hits, misses in order, pages, updates) over many random steps.
TEST(BlockPageCache, UseHeldIsUseWithoutAdmitting) {
  constexpr int kHeads = 2;
  constexpr int64_t kPages = 40, kBlocks = 300;
  BlockPageCache one(kHeads, kPages), held(kHeads, kPages);
  std::mt19937 rng(7);
  for (int step = 0; step < 60; ++step) {
    one.NextStep();
    held.NextStep();
    for (int g = 0; g < kHeads; ++g) {
      // Repeats, blocks the table has not seen yet (past its size) and a negative id included.
      std::vector<int64_t> blocks(std::uniform_int_distribution<int>(0, 70)(rng));
      for (int64_t& b : blocks) b = std::uniform_int_distribution<int64_t>(-1, kBlocks)(rng);
      int64_t hits = 0;
      std::vector<int64_t> missed;
      for (int64_t b : blocks) {
        if (b >= 0 && one.Use(g, b, false))
          ++hits;
        else
          missed.push_back(b);
      }
      std::vector<int64_t> held_missed = {-7};  // appended to, not replaced
      EXPECT_EQ(held.UseHeld(g, blocks.data(), blocks.size(), &held_missed), hits) << step;
      ASSERT_EQ(held_missed.size(), missed.size() + 1);
      EXPECT_TRUE(std::equal(missed.begin(), missed.end(), held_missed.begin() + 1)) << step;
      for (int64_t b : missed) {
        if (b < 0) continue;
        EXPECT_EQ(one.Use(g, b, true), held.Use(g, b, true)) << step << " " << b;
      }
    }
    const auto a = one.TakeUpdates(), b = held.TakeUpdates();
    ASSERT_EQ(a.size(), b.size()) << step;
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE(a[i].kv_head == b[i].kv_head && a[i].block == b[i].block &&
                  a[i].page == b[i].page)
          << step << " " << i;
  }
  for (int g = 0; g < kHeads; ++g) {
    EXPECT_EQ(one.blocks_held(g), held.blocks_held(g));
    EXPECT_GT(held.blocks_held(g), kPages / 2) << "the steps filled the pages";
    for (int64_t b = 0; b <= kBlocks; ++b) EXPECT_EQ(one.page(g, b), held.page(g, b)) << b;
  }
}

TEST(BlockPageCache, DropFromReleasesTheBlocksPastIt) {
  BlockPageCache c(1, 8);
  c.NextStep();
  for (int64_t b = 0; b < 6; ++b) (void)c.Use(0, b, true);
  (void)c.TakeUpdates();
  c.DropFrom(0, 3);
  EXPECT_EQ(c.blocks_held(0), 3);
  for (int64_t b = 0; b < 6; ++b) EXPECT_EQ(c.page(0, b) >= 0, b < 3) << b;
  const auto ups = c.TakeUpdates();
  EXPECT_EQ(ups.size(), 3u);
  for (const auto& u : ups) EXPECT_EQ(u.page, -1);
}

}  // namespace
}  // namespace kvrt::runtime

namespace kvrt::runtime {
namespace {

TEST(BlockPageCache, SecondChanceAdmitsOnARepeatedMissOnly) {
  BlockPageCache c(1, 4, /*admit_after=*/2);
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 3, true));
  EXPECT_FALSE(c.Use(0, 3, true)) << "a second q head of the same step is no second chance";
  EXPECT_EQ(c.page(0, 3), -1);
  for (uint32_t i = 0; i < BlockPageCache::kSecondChanceSteps + 1; ++i) c.NextStep();
  EXPECT_FALSE(c.Use(0, 3, true));
  EXPECT_EQ(c.page(0, 3), -1) << "the first miss is too old: this one starts again";
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 3, true));
  EXPECT_GE(c.page(0, 3), 0) << "missed again within the window: admitted";
  c.NextStep();
  EXPECT_TRUE(c.Use(0, 3, true));
}

}  // namespace
}  // namespace kvrt::runtime

namespace kvrt::runtime {
namespace {

TEST(BlockPageCache, AStepHoldingEveryPageRefusesAtOnceAndCountsReleases) {
  BlockPageCache c(1, 2);
  c.NextStep();
  EXPECT_FALSE(c.Use(0, 1, true));
  EXPECT_FALSE(c.Use(0, 2, true));
  for (int64_t b = 3; b < 100000; ++b) EXPECT_FALSE(c.Use(0, b, true)) << b;  // O(1) each
  EXPECT_EQ(c.blocks_held(0), 2);
  EXPECT_EQ(c.TakeUpdates().size(), 2u);
  // A drop frees one of this step's pages: the step may take it again.
  c.DropFrom(0, 2);
  EXPECT_FALSE(c.Use(0, 7, true));
  EXPECT_GE(c.page(0, 7), 0);
  EXPECT_GE(c.page(0, 1), 0);
}

TEST(BlockPageCache, AdmissionsPerStepAreBounded) {
  BlockPageCache c(2, 16, /*admit_after=*/1, /*max_admit_per_step=*/3);
  c.NextStep();
  for (int64_t b = 0; b < 10; ++b) (void)c.Use(0, b, true);
  (void)c.Use(1, 0, true);
  EXPECT_EQ(c.blocks_held(0), 3);
  EXPECT_EQ(c.blocks_held(1), 1) << "the bound is per head";
  c.NextStep();
  for (int64_t b = 0; b < 10; ++b) EXPECT_EQ(c.Use(0, b, true), b < 3) << b;
  EXPECT_EQ(c.blocks_held(0), 6) << "hits cost no admission";
}

}  // namespace
}  // namespace kvrt::runtime
