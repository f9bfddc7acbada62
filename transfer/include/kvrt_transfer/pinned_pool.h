#pragma once
// A pool of host blocks for D2H/H2D staging. Page-locked allocation (cudaHostAlloc) costs
// milliseconds and synchronises the device, so blocks are allocated once per size class (powers of
// two from kMinBlock) and reused; a block goes back to its free list when its lease is dropped.
// The allocator is injectable, so the pool logic is tested without a GPU (plain malloc).
// Thread-safe: Acquire and the release of leases may run concurrently from any threads.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvrt_transfer/cuda_rt.h"

namespace kvrt::transfer {

struct HostAllocator {
  std::function<absl::Status(std::size_t bytes, void** out)> alloc;
  std::function<void(void* ptr)> free;
};
// cudaHostAlloc / cudaFreeHost (FailedPrecondition without CUDA).
HostAllocator PinnedHostAllocator();
// aligned new/delete (for tests and for the host path).
HostAllocator PageableHostAllocator();

class PinnedPool;

// A leased block; returns to its pool when destroyed. Move-only. The pool must outlive it.
class PinnedBlock {
 public:
  PinnedBlock() = default;
  ~PinnedBlock() { Release(); }
  PinnedBlock(PinnedBlock&& o) noexcept
      : pool_(std::exchange(o.pool_, nullptr)),
        ptr_(std::exchange(o.ptr_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  PinnedBlock& operator=(PinnedBlock&& o) noexcept {
    if (this != &o) {
      Release();
      pool_ = std::exchange(o.pool_, nullptr);
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  void* data() const { return ptr_; }
  std::size_t size() const { return size_; }  // capacity of the block (>= what was asked)
  bool empty() const { return ptr_ == nullptr; }
  void Release();

 private:
  friend class PinnedPool;
  PinnedBlock(PinnedPool* pool, void* ptr, std::size_t size)
      : pool_(pool), ptr_(ptr), size_(size) {}
  PinnedPool* pool_ = nullptr;
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

class PinnedPool {
 public:
  static constexpr std::size_t kMinBlock = 4096;

  // max_cached_bytes: free blocks kept beyond this are given back to the allocator.
  PinnedPool(HostAllocator allocator, std::size_t max_cached_bytes);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // A block of at least `bytes` (bytes > 0), reused when one of its size class is free.
  absl::StatusOr<PinnedBlock> Acquire(std::size_t bytes);
  // Allocates blocks of the class of `bytes` until `count` of them are free (as far as
  // max_cached_bytes allows), so that the first Acquires of a path that must not stall (a decode
  // step's) find them: called ahead, off that path (a prompt's background job).
  absl::Status Reserve(std::size_t bytes, int count);

  struct Stats {
    int64_t allocations = 0;   // calls to the allocator
    int64_t reuses = 0;        // Acquires served from a free list
    int64_t live_blocks = 0;   // leased now
    int64_t cached_bytes = 0;  // in free lists now
    int64_t total_bytes = 0;   // allocated and not yet given back
  };
  Stats stats() const;

  // Size class of a request: the smallest power of two >= max(bytes, kMinBlock).
  static std::size_t ClassBytes(std::size_t bytes);

 private:
  friend class PinnedBlock;
  void Return(void* ptr, std::size_t size);

  HostAllocator alloc_;
  std::size_t max_cached_;
  mutable std::mutex mu_;
  std::vector<std::vector<void*>> free_;  // by log2(size class)
  Stats stats_;
};

// One pinned buffer for an H2D that recurs every step. The copy must come from pinned memory:
// from pageable memory, cudaMemcpyAsync first synchronises the stream, which stalls the host until
// the device has caught up. Stage waits for the last copy out of the buffer (long done in a
// decode loop), grows it when needed and returns it to be filled; Sent marks the copy enqueued.
// Not thread-safe.
class UploadStaging {
 public:
  absl::StatusOr<void*> Stage(PinnedPool& pool, std::size_t bytes);
  // The copy out of the buffer is enqueued on stream (an event of the staging's own after it).
  absl::Status Sent(void* stream);
  // The copy is enqueued and the caller records `after` after it, in the same stream order: the
  // next Stage waits for `after` (its latest record), and no event of the staging's own is
  // recorded (a driver call fewer per upload). `after` outlives the staging's use of it.
  void SentBefore(const Event* after);
  // The caller waited for work that follows every copy out of the buffer: the next Stage does
  // not wait (a driver call fewer where the caller already knows).
  void Done() { pending_ = false; }

 private:
  PinnedBlock block_;
  Event done_;
  const Event* wait_for_ = nullptr;  // null: done_
  bool pending_ = false;
};

}  // namespace kvrt::transfer
