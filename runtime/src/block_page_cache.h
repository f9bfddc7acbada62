#pragma once
// Which store blocks (gpu::kDirectBlockRows consecutive rows of one kv head's cold store) hold a
// page of the direct step's device pool (direct_step.h), and which block gives its page up when
// another needs one. Per kv head, a CLOCK over that head's pages: a block a step used gets its
// reference bit set; a block that needs a page takes the first page under the hand whose bit is
// clear (clearing bits as the hand passes) and that no block of the current step holds. CLOCK,
// not LRU, because a step touches thousands of blocks and each touch must be O(1) without a
// list. Plain host code, so the policy is tested without a GPU; the device table follows through
// TakeUpdates (gpu::FillPages applies them). Heads are independent: calls for different kv heads
// may run concurrently, calls for one head may not.
//
// A step whose blocks outnumber a head's pages (queries that change topic every step, a pool too
// small for the working set) must not make each further miss sweep the whole clock: the head
// counts the pages this step holds and refuses at once when they are all held. And it admits at
// most max_admit_per_step blocks a step: under such queries every admission evicts a block that
// is as likely to be wanted again, so unbounded admission only turns each step's PCIe reads into
// as many fills (the same bytes again, on the fill stream, competing with the step's reads).
// Both refusals come before the second-chance bookkeeping: a miss refused for either reason is
// not remembered as a first miss (measured that way on the H200; docs/benchmarks.md). Since 0.3.6
// the direct step fills pages from rows its steps already read (staged pages, direct_step.h), so
// it uses neither the second chance nor the bound (admit_after 1, max_admit_per_step 0); the
// options stay for cluster_eval's comparison of policies.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvrt::runtime {

class BlockPageCache {
 public:
  // page: the pool page (global: kv_head * pages_per_head + local), or -1 (the block lost it).
  struct Update {
    int32_t kv_head;
    int64_t block;
    int32_t page;
  };

  // admit_after: misses that earn a block a page: 1 = its first; 2 = a second one within
  // kSecondChanceSteps steps of the first (a block that a single step wanted is read where it
  // is, over PCIe, instead of being copied in and evicting a block that steps keep using).
  static constexpr uint32_t kSecondChanceSteps = 8;
  // max_admit_per_step: blocks a head may admit per step; 0 = no bound.
  BlockPageCache(int kv_heads, int64_t pages_per_head, int admit_after = 1,
                 int64_t max_admit_per_step = 0);

  int kv_heads() const { return static_cast<int>(heads_.size()); }
  int64_t pages_per_head() const { return pages_per_head_; }
  // Starts a step: blocks used from now on keep their pages until the next call.
  void NextStep() { ++step_; }
  // Block `block` of kv head g is used by this step. True when it holds a page (a hit). Else, with
  // `admit` and enough misses (admit_after), it gets one (an update asks for it to be filled)
  // unless every page of the head is held by a block of this step.
  bool Use(int g, int64_t block, bool admit);
  // Use(g, b, false) for each of blocks[0, n), without admitting: the number of hits; the blocks
  // without a page are appended to *missed, in order. A step's blocks are given at once so that
  // their table entries and pages are loaded ahead (software prefetch): one Use at a time waits
  // on two dependent cache misses where a batch's policies outgrow the caches (~40 ns each,
  // 50 us per kv head and step at 128K B=16 on the H200's host; docs/benchmarks.md).
  int64_t UseHeld(int g, const int64_t* blocks, std::size_t n, std::vector<int64_t>* missed);
  // Blocks of kv head g from `block` on give their pages up (the rows there may move).
  void DropFrom(int g, int64_t block);
  // The page of a block, -1 if none.
  int32_t page(int g, int64_t block) const;
  int64_t blocks_held(int g) const { return heads_[g].held; }
  // The blocks whose page changed since the last call, each once with its page now.
  std::vector<Update> TakeUpdates();

 private:
  struct Head {
    std::vector<int32_t> page_of_block;  // local page, -1
    std::vector<uint32_t> missed;        // [block] step of its last miss without a page (0: none)
    std::vector<uint32_t> listed;        // [block] the last TakeUpdates call that listed it
    std::vector<int64_t> owner;          // [pages] block, -1 = free
    std::vector<uint8_t> ref;            // [pages] CLOCK reference bit
    std::vector<uint64_t> step;          // [pages] last step that used it
    int64_t hand = 0;
    int64_t held = 0;
    // Pages held by blocks of step `counted_step` (the current one, once it touched any) and the
    // blocks it admitted: reset lazily when a new step first touches the head.
    uint64_t counted_step = 0;
    int64_t step_pages = 0;
    int64_t step_admitted = 0;
    std::vector<Update> updates;
  };
  void Release(int g, Head& h, int64_t page);
  // Marks page p as used by this step (counted once per step).
  void Touch(Head& h, int64_t p);
  void CountThisStep(Head& h);

  int64_t pages_per_head_;
  int admit_after_;
  int64_t max_admit_per_step_;
  uint64_t step_ = 1;
  uint32_t take_ = 0;  // TakeUpdates calls
  std::vector<Head> heads_;
};

}  // namespace kvrt::runtime
