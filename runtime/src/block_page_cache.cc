#include "block_page_cache.h"

#include <algorithm>

namespace kvrt::runtime {

BlockPageCache::BlockPageCache(int kv_heads, int64_t pages_per_head, int admit_after,
                               int64_t max_admit_per_step)
    : pages_per_head_(pages_per_head),
      admit_after_(admit_after),
      max_admit_per_step_(max_admit_per_step),
      heads_(kv_heads) {
  for (Head& h : heads_) {
    h.owner.assign(pages_per_head, -1);
    h.ref.assign(pages_per_head, 0);
    h.step.assign(pages_per_head, 0);
  }
}

int32_t BlockPageCache::page(int g, int64_t block) const {
  const Head& h = heads_[g];
  if (block < 0 || block >= static_cast<int64_t>(h.page_of_block.size())) return -1;
  const int32_t p = h.page_of_block[block];
  return p < 0 ? -1 : static_cast<int32_t>(g * pages_per_head_ + p);
}

bool BlockPageCache::Use(int g, int64_t block, bool admit) {
  Head& h = heads_[g];
  if (block >= static_cast<int64_t>(h.page_of_block.size())) {
    if (!admit) return false;
    // Geometric growth: the store grows a block at a time.
    const std::size_t n = std::max<std::size_t>(block + 1, 2 * h.page_of_block.size());
    h.page_of_block.resize(n, -1);
    h.missed.resize(n, 0);
    h.listed.resize(n, 0);
  }
  const int32_t p = h.page_of_block[block];
  if (p >= 0) {
    h.ref[p] = 1;
    Touch(h, p);
    return true;
  }
  if (!admit || pages_per_head_ == 0) return false;
  CountThisStep(h);
  if (h.step_pages >= pages_per_head_) return false;  // this step holds every page
  if (max_admit_per_step_ > 0 && h.step_admitted >= max_admit_per_step_) return false;
  if (admit_after_ > 1) {
    const uint32_t now = static_cast<uint32_t>(step_), last = h.missed[block];
    const bool second = last != 0 && last != now && now - last <= kSecondChanceSteps;
    if (last != now) h.missed[block] = now;
    if (!second) return false;
  }
  // Two sweeps clear every bit, so a page is found unless this step holds them all.
  for (int64_t tries = 0; tries < 2 * pages_per_head_; ++tries) {
    const int64_t c = h.hand;
    h.hand = (h.hand + 1) % pages_per_head_;
    if (h.owner[c] >= 0 && h.step[c] == step_) continue;
    if (h.ref[c]) {
      h.ref[c] = 0;
      continue;
    }
    if (h.owner[c] >= 0) Release(g, h, c);
    h.owner[c] = block;
    h.ref[c] = 1;
    Touch(h, c);
    ++h.step_admitted;
    h.page_of_block[block] = static_cast<int32_t>(c);
    ++h.held;
    h.updates.push_back({g, block, static_cast<int32_t>(g * pages_per_head_ + c)});
    return false;
  }
  return false;
}

int64_t BlockPageCache::UseHeld(int g, const int64_t* blocks, std::size_t n,
                                std::vector<int64_t>* missed) {
  Head& h = heads_[g];
  const int64_t known = static_cast<int64_t>(h.page_of_block.size());
  // Two stages ahead of the block in hand: its table entry kAhead x 2 blocks on, its page's
  // state kAhead blocks on (that entry loaded by then).
  constexpr std::size_t kAhead = 16;
  auto entry = [&](std::size_t i) {
    const int64_t b = blocks[i];
    return b >= 0 && b < known ? h.page_of_block[b] : -1;
  };
  int64_t hits = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (i + 2 * kAhead < n && blocks[i + 2 * kAhead] >= 0 && blocks[i + 2 * kAhead] < known)
      __builtin_prefetch(&h.page_of_block[blocks[i + 2 * kAhead]]);
    if (i + kAhead < n) {
      if (const int32_t p = entry(i + kAhead); p >= 0) {
        __builtin_prefetch(&h.ref[p], 1);
        __builtin_prefetch(&h.step[p], 1);
      }
    }
    const int32_t p = entry(i);
    if (p < 0) {
      missed->push_back(blocks[i]);
      continue;
    }
    h.ref[p] = 1;
    Touch(h, p);
    ++hits;
  }
  return hits;
}

void BlockPageCache::CountThisStep(Head& h) {
  if (h.counted_step == step_) return;
  h.counted_step = step_;
  h.step_pages = 0;
  h.step_admitted = 0;
}

void BlockPageCache::Touch(Head& h, int64_t p) {
  CountThisStep(h);
  if (h.step[p] == step_) return;
  h.step[p] = step_;
  ++h.step_pages;
}

void BlockPageCache::Release(int g, Head& h, int64_t page) {
  const int64_t block = h.owner[page];
  h.page_of_block[block] = -1;
  h.owner[page] = -1;
  h.ref[page] = 0;
  if (h.step[page] == step_ && h.counted_step == step_) --h.step_pages;
  h.step[page] = 0;
  --h.held;
  h.updates.push_back({g, block, -1});
}

void BlockPageCache::DropFrom(int g, int64_t block) {
  Head& h = heads_[g];
  for (int64_t p = 0; p < pages_per_head_; ++p)
    if (h.owner[p] >= block) Release(g, h, p);
}

std::vector<BlockPageCache::Update> BlockPageCache::TakeUpdates() {
  // One update per block, its final state: the device applies a call's updates in parallel, so a
  // block that lost its page and got another in the same step must appear once.
  // NOTE: a stamp per block, not a hash set: a step of ~2000 admissions spent 60% of the policy's
  // time (216 of 362 us for 8 heads) hashing here.
  std::vector<Update> all;
  if (++take_ == 0) {  // wrapped: no stamp may equal a future call's
    for (Head& h : heads_) std::fill(h.listed.begin(), h.listed.end(), 0u);
    take_ = 1;
  }
  for (int g = 0; g < kv_heads(); ++g) {
    Head& h = heads_[g];
    for (const Update& u : h.updates) {
      if (h.listed[u.block] == take_) continue;
      h.listed[u.block] = take_;
      all.push_back({g, u.block, page(g, u.block)});
    }
    h.updates.clear();
  }
  return all;
}

}  // namespace kvrt::runtime
