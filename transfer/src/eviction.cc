#include "kvrt_transfer/eviction.h"

#include <utility>

namespace kvrt::transfer {

void EvictionQueue::Push(EvictionBatch batch) {
  rows_ += batch.rows;
  batches_.push_back(std::move(batch));
}

absl::Status EvictionQueue::Drain(
    const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink) {
  while (!batches_.empty()) {
    EvictionBatch& b = batches_.front();
    if (!b.done.empty()) {
      if (absl::Status s = b.done.Synchronize(); !s.ok()) return s;
    }
    if (absl::Status s = sink(b.k.data(), b.v.data(), b.rows); !s.ok()) return s;
    rows_ -= b.rows;
    batches_.pop_front();
  }
  return absl::OkStatus();
}

void EvictionQueue::Discard() {
  for (auto& b : batches_)
    if (!b.done.empty()) (void)b.done.Synchronize();  // the copy writes into the pinned block
  batches_.clear();
  rows_ = 0;
}

BackgroundWork::~BackgroundWork() {
  if (!running_) return;
  if (arena_ != nullptr) {
    arena_->execute([&] { group_.wait(); });
  } else {
    group_.wait();
  }
}

void BackgroundWork::Launch(tbb::task_arena& arena, std::function<absl::Status()> job) {
  if (running_) {
    absl::Status s = Wait(arena);
    if (!s.ok() && status_.ok()) status_ = s;
  }
  arena_ = &arena;
  running_ = true;
  arena.execute([&] {
    group_.run([this, job = std::move(job)] {
      absl::Status s = job();
      if (!s.ok() && status_.ok()) status_ = std::move(s);
    });
  });
}

absl::Status BackgroundWork::Wait(tbb::task_arena& arena) {
  if (running_) {
    arena.execute([&] { group_.wait(); });
    running_ = false;
  }
  return std::exchange(status_, absl::OkStatus());
}

absl::Status BackgroundWork::Wait() {
  if (running_ && arena_ != nullptr) return Wait(*arena_);
  return std::exchange(status_, absl::OkStatus());
}

}  // namespace kvrt::transfer
