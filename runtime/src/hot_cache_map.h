#pragma once
// Bookkeeping of one (sequence, layer)'s GPU hot cache (device_hot_cache.h holds the device
// pages): which row groups of the cold store (a cluster, a run of outliers, a chunk of rows no
// index covers yet) sit in which pages of a pool shared by the layer's kv heads. A group is cached
// whole or not at all; when pages run out, the least recently used groups that the current step
// has not used are evicted (LRU: consecutive decode steps select mostly the same clusters). Plain
// host code, so the policy is tested without a GPU.
#include <cstdint>
#include <functional>
#include <list>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace kvrt::runtime {

class HotCacheMap {
 public:
  // A group: `rows` consecutive store rows of kv head `kv_head` from row `begin`. `stable`: the
  // rows keep their content until the sequence ends (clusters); other groups are dropped when the
  // cold tier's index changes (DropUnstable).
  struct Group {
    int32_t kv_head = 0;
    int64_t begin = 0;
    int32_t rows = 0;
    bool stable = true;
  };

  HotCacheMap(int64_t pages, int page_rows);

  int64_t pages() const { return pages_; }
  int page_rows() const { return page_rows_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int64_t groups() const { return static_cast<int64_t>(lru_.size()); }

  // Starts a decode step: groups looked up from now on are in use until the next call.
  void NextStep() { ++step_; }
  // The pages of g when it is cached with the same row count (and marks it used this step), else
  // null; a group cached with another row count (a chunk that grew) is dropped.
  const std::vector<int32_t>* Find(const Group& g);
  // Pages for g (not cached), evicting least recently used groups that this step has not used.
  // Null when that does not free enough pages (g is then not cached; some groups may have been
  // evicted on the way).
  const std::vector<int32_t>* Insert(const Group& g);
  // Drops every group that is not stable.
  void DropUnstable();
  // Whether g was already used in this step before the last Find/Insert of it.
  bool used_before_in_step() const { return repeat_; }

 private:
  struct Key {
    int32_t kv_head;
    int64_t begin;
    bool operator==(const Key& o) const { return kv_head == o.kv_head && begin == o.begin; }
    template <typename H>
    friend H AbslHashValue(H h, const Key& k) {
      return H::combine(std::move(h), k.kv_head, k.begin);
    }
  };
  struct Node {
    Key key;
    int32_t rows;
    bool stable;
    uint64_t step;
    std::vector<int32_t> pages;
  };
  void Evict(std::list<Node>::iterator it);

  int64_t pages_;
  int page_rows_;
  uint64_t step_ = 1;
  bool repeat_ = false;
  std::vector<int32_t> free_;
  std::list<Node> lru_;  // front: most recently used
  absl::flat_hash_map<Key, std::list<Node>::iterator> index_;
};

}  // namespace kvrt::runtime
