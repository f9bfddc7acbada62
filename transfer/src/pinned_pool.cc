#include "kvrt_transfer/pinned_pool.h"

#include <bit>
#include <new>

#include "absl/strings/str_cat.h"
#include "kvrt_transfer/cuda_rt.h"

namespace kvrt::transfer {

HostAllocator PinnedHostAllocator() {
  return {[](std::size_t bytes, void** out) { return HostAlloc(bytes, out); },
          [](void* p) { HostFree(p); }};
}

HostAllocator PageableHostAllocator() {
  return {[](std::size_t bytes, void** out) {
            *out = ::operator new (bytes, std::align_val_t{64}, std::nothrow);
            if (*out == nullptr)
              return absl::ResourceExhaustedError(
                  absl::StrCat("host allocation of ", bytes, " bytes failed"));
            return absl::OkStatus();
          },
          [](void* p) { ::operator delete (p, std::align_val_t{64}); }};
}

void PinnedBlock::Release() {
  if (pool_ != nullptr && ptr_ != nullptr) pool_->Return(ptr_, size_);
  pool_ = nullptr;
  ptr_ = nullptr;
  size_ = 0;
}

PinnedPool::PinnedPool(HostAllocator allocator, std::size_t max_cached_bytes)
    : alloc_(std::move(allocator)), max_cached_(max_cached_bytes), free_(64) {}

PinnedPool::~PinnedPool() {
  // NOTE: leases must not outlive the pool (documented); blocks still leased are leaked rather
  // than freed under their users.
  for (auto& list : free_)
    for (void* p : list) alloc_.free(p);
}

std::size_t PinnedPool::ClassBytes(std::size_t bytes) {
  return std::bit_ceil(std::max(bytes, kMinBlock));
}

absl::StatusOr<PinnedBlock> PinnedPool::Acquire(std::size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("PinnedPool::Acquire: 0 bytes");
  if (bytes > (std::size_t{1} << 40))
    return absl::InvalidArgumentError(
        absl::StrCat("PinnedPool::Acquire: ", bytes, " bytes is too large"));
  const std::size_t size = ClassBytes(bytes);
  const int cls = std::countr_zero(size);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& list = free_[cls];
    if (!list.empty()) {
      void* p = list.back();
      list.pop_back();
      stats_.reuses += 1;
      stats_.live_blocks += 1;
      stats_.cached_bytes -= static_cast<int64_t>(size);
      return PinnedBlock(this, p, size);
    }
  }
  void* p = nullptr;
  if (absl::Status s = alloc_.alloc(size, &p); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.allocations += 1;
  stats_.live_blocks += 1;
  stats_.total_bytes += static_cast<int64_t>(size);
  return PinnedBlock(this, p, size);
}

absl::Status PinnedPool::Reserve(std::size_t bytes, int count) {
  if (bytes == 0 || bytes > (std::size_t{1} << 40) || count < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("PinnedPool::Reserve: ", count, " blocks of ", bytes, " bytes"));
  const std::size_t size = ClassBytes(bytes);
  const int cls = std::countr_zero(size);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_[cls].size() >= static_cast<std::size_t>(count) ||
          static_cast<std::size_t>(stats_.cached_bytes) + size > max_cached_)
        return absl::OkStatus();
    }
    // NOTE: allocated outside the lock (milliseconds for pinned memory); concurrent Reserves may
    // together leave a few blocks more than `count` free.
    void* p = nullptr;
    if (absl::Status s = alloc_.alloc(size, &p); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    free_[cls].push_back(p);
    stats_.allocations += 1;
    stats_.total_bytes += static_cast<int64_t>(size);
    stats_.cached_bytes += static_cast<int64_t>(size);
  }
}

void PinnedPool::Return(void* ptr, std::size_t size) {
  bool give_back = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.live_blocks -= 1;
    if (static_cast<std::size_t>(stats_.cached_bytes) + size > max_cached_) {
      give_back = true;
      stats_.total_bytes -= static_cast<int64_t>(size);
    } else {
      free_[std::countr_zero(size)].push_back(ptr);
      stats_.cached_bytes += static_cast<int64_t>(size);
    }
  }
  if (give_back) alloc_.free(ptr);
}

PinnedPool::Stats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

absl::StatusOr<void*> UploadStaging::Stage(PinnedPool& pool, std::size_t bytes) {
  if (pending_) {
    if (absl::Status st = (wait_for_ != nullptr ? *wait_for_ : done_).Synchronize(); !st.ok())
      return st;
    pending_ = false;
  }
  if (block_.size() < bytes) {
    block_ = PinnedBlock();
    auto b = pool.Acquire(bytes + bytes / 2);
    if (!b.ok()) return b.status();
    block_ = std::move(*b);
  }
  return block_.data();
}

absl::Status UploadStaging::Sent(void* stream) {
  if (absl::Status st = done_.Record(stream); !st.ok()) return st;
  wait_for_ = nullptr;
  pending_ = true;
  return absl::OkStatus();
}

void UploadStaging::SentBefore(const Event* after) {
  wait_for_ = after;
  pending_ = true;
}

}  // namespace kvrt::transfer
