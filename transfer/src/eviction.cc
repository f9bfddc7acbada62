#include "kvrt_transfer/eviction.h"

#include <memory>
#include <thread>
#include <utility>

namespace kvrt::transfer {

void EvictionQueue::Push(EvictionBatch batch) {
  rows_ += batch.rows;
  batches_.push_back(std::move(batch));
}

absl::Status EvictionQueue::Drain(
    const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink) {
  return DrainBatches(sink, /*wait=*/true);
}

absl::Status EvictionQueue::DrainReady(
    const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink) {
  return DrainBatches(sink, /*wait=*/false);
}

absl::Status EvictionQueue::DrainBatches(
    const std::function<absl::Status(const void* k, const void* v, int64_t rows)>& sink,
    bool wait) {
  while (!batches_.empty()) {
    EvictionBatch& b = batches_.front();
    if (!b.done.empty()) {
      if (wait) {
        if (absl::Status s = b.done.Synchronize(); !s.ok()) return s;
      } else {
        bool done = false;
        if (absl::Status s = b.done.Query(&done); !s.ok()) return s;
        if (!done) break;
      }
    }
    if (absl::Status s = sink(b.k.data(), b.v.data(), b.rows); !s.ok()) return s;
    rows_ -= b.rows;
    if (!b.done.empty() && spare_events_.size() < kSpareEvents)
      spare_events_.push_back(std::move(b.done));
    batches_.pop_front();
  }
  return absl::OkStatus();
}

absl::StatusOr<Event> EvictionQueue::NewEvent() {
  if (spare_events_.empty()) return Event::Create(false);
  Event e = std::move(spare_events_.back());
  spare_events_.pop_back();
  return e;
}

void EvictionQueue::Discard() {
  for (auto& b : batches_)
    if (!b.done.empty()) (void)b.done.Synchronize();  // the copy writes into the pinned block
  batches_.clear();
  rows_ = 0;
}

BackgroundWork::~BackgroundWork() noexcept { (void)Wait(); }

bool BackgroundWork::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

void BackgroundWork::Begin() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !running_; });
  running_ = true;
}

void BackgroundWork::Done(absl::Status s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!s.ok() && status_.ok()) status_ = std::move(s);
  running_ = false;
  cv_.notify_all();
}

void BackgroundWork::Enqueue(tbb::task_arena& arena, std::function<absl::Status()> job) {
  arena.enqueue([this, job = std::move(job)] { Done(job()); });
}

void BackgroundWork::Launch(tbb::task_arena& arena, std::function<absl::Status()> job) {
  Begin();
  Enqueue(arena, std::move(job));
}

void BackgroundWork::LaunchAfter(tbb::task_arena& arena, void* stream,
                                 std::function<absl::Status(bool stream_done)> job) {
  Begin();
  struct Pending {
    BackgroundWork* self;
    tbb::task_arena* arena;
    std::function<absl::Status(bool)> job;
    bool stream_done;
  };
  auto* pending = new Pending{this, &arena, std::move(job), true};
  auto enqueue = [](void* p) {
    // On CUDA's callback thread: tbb::task_arena::enqueue may be called from any thread.
    std::unique_ptr<Pending> owned(static_cast<Pending*>(p));
    owned->self->Enqueue(*owned->arena, [job = std::move(owned->job), done = owned->stream_done] {
      return job(done);
    });
  };
  if (!AddStreamCallback(stream, enqueue, pending).ok()) {
    pending->stream_done = false;
    enqueue(pending);
  }
}

void BackgroundWork::LaunchJoinable(tbb::task_arena& arena, std::function<absl::Status()> job) {
  Begin();
  JoinGroup();  // the last joinable job's group is waited for before it runs again
  {
    std::lock_guard<std::mutex> lock(mu_);
    joinable_ = &arena;
  }
  // Run from inside the arena: the task goes to the group (and a worker takes it) at once.
  arena.execute([&] { group_.run([this, job = std::move(job)] { Done(job()); }); });
}

void BackgroundWork::JoinGroup() {
  tbb::task_arena* arena = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    arena = std::exchange(joinable_, nullptr);
  }
  if (arena == nullptr) return;
  // Only the waiting thread joins: arena.execute hands the functor to a worker when the arena has
  // no free slot for this thread, and a worker could be inside this very job (its parallel loops
  // take other tasks while they wait) and would wait for it there: a deadlock (a soak test found
  // it). Handed over, the functor returns at once and this thread blocks until the job is done;
  // then no thread is inside the job, and the group's wait (owed before it runs again or goes) is
  // safe on any thread.
  const std::thread::id waiter = std::this_thread::get_id();
  bool joined = false;
  arena->execute([&] {
    if (std::this_thread::get_id() != waiter) return;
    group_.wait();
    joined = true;
  });
  if (joined) return;
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !running_; });
  }
  arena->execute([&] { group_.wait(); });
}

void BackgroundWork::Join() {
  JoinGroup();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !running_; });
}

absl::Status BackgroundWork::Wait() {
  JoinGroup();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !running_; });
  return std::exchange(status_, absl::OkStatus());
}

}  // namespace kvrt::transfer
