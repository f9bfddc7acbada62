#include "hot_cache_map.h"

namespace kvrt::runtime {

HotCacheMap::HotCacheMap(int64_t pages, int page_rows) : pages_(pages), page_rows_(page_rows) {
  free_.reserve(static_cast<std::size_t>(pages));
  // Highest page last, so pages are handed out in ascending order (contiguous groups when new).
  for (int64_t p = pages - 1; p >= 0; --p) free_.push_back(static_cast<int32_t>(p));
}

const std::vector<int32_t>* HotCacheMap::Find(const Group& g) {
  auto it = index_.find(Key{g.kv_head, g.begin});
  repeat_ = false;
  if (it == index_.end()) return nullptr;
  auto node = it->second;
  if (node->rows != g.rows) {
    Evict(node);
    return nullptr;
  }
  repeat_ = node->step == step_;
  node->step = step_;
  lru_.splice(lru_.begin(), lru_, node);
  return &node->pages;
}

const std::vector<int32_t>* HotCacheMap::Insert(const Group& g) {
  repeat_ = false;
  const int64_t need = (static_cast<int64_t>(g.rows) + page_rows_ - 1) / page_rows_;
  if (need > pages()) return nullptr;
  while (free_pages() < need) {
    if (lru_.empty() || lru_.back().step == step_) return nullptr;
    Evict(std::prev(lru_.end()));
  }
  Node node{Key{g.kv_head, g.begin}, g.rows, g.stable, step_, {}};
  node.pages.reserve(static_cast<std::size_t>(need));
  for (int64_t i = 0; i < need; ++i) {
    node.pages.push_back(free_.back());
    free_.pop_back();
  }
  lru_.push_front(std::move(node));
  index_[lru_.front().key] = lru_.begin();
  return &lru_.front().pages;
}

void HotCacheMap::DropUnstable() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (!it->stable) Evict(it);
    it = next;
  }
}

void HotCacheMap::Evict(std::list<Node>::iterator it) {
  free_.insert(free_.end(), it->pages.begin(), it->pages.end());
  index_.erase(it->key);
  lru_.erase(it);
}

}  // namespace kvrt::runtime
