#pragma once
// Helpers shared by the index kinds: argument checks, f32 conversion of stored keys, top-k of
// (score, id) candidates, a per-thread visited set for graph searches, thread-count guards for
// the libraries that bring their own threading (FAISS: OpenMP, OpenBLAS: pthreads).
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "host_matmul.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"

namespace kvrt::cpu_index::internal {

// Build: store non-empty, dims match, n fits the id type of the kind (`max_rows`).
absl::Status CheckBuild(const HeadStore& store, int dim, const float* queries, int64_t n_queries,
                        int64_t max_rows);
// Add: index built, same dims, store did not shrink.
absl::Status CheckAdd(const HeadStore& store, int dim, bool built, int64_t size, int64_t max_rows);
// Search: index built, q/out non-null, k > 0, effort >= 0, store covers the index.
absl::Status CheckSearch(const HeadStore& store, int dim, bool built, int64_t size, const float* q,
                         const SearchParams& params, const SearchResult* out);

// Rows [begin, end) of the store's keys as f32 [end - begin, dim], converted in parallel.
std::vector<float> KeysF32(const HeadStore& store, int64_t begin, int64_t end);

// Threads for a parallel build (config.num_threads, else the current arena's concurrency).
int BuildThreads(const IndexConfig& config);

// Sorts candidates best first (score desc, then lower id), keeps k, writes out->ids/scores.
// Candidates must be duplicate-free.
void TakeTopK(std::vector<std::pair<float, int64_t>>* cands, int k, SearchResult* out);

// A search's thread-local scratch is kept for the next search on that thread, up to this size:
// past it (a search at a huge effort or top_k) it is freed, or every worker thread kept its peak
// for the life of the process (1 GB after a landmark group search over 1M rows at effort 2^24,
// still held after the runtime was destroyed).
inline constexpr std::size_t kKeepScratchBytes = std::size_t{64} << 20;
template <typename T>
void TrimScratch(std::vector<T>* v) {
  if (v->capacity() * sizeof(T) > kKeepScratchBytes) std::vector<T>().swap(*v);
}

// Makes OpenBLAS single-threaded (process-wide) when it is the BLAS we run on: every parallel
// loop of kvrt is a TBB task, and an OpenBLAS call inside one must not start its own threads.
// NOTE: looked up with dlsym so that linking the reference BLAS instead still works.
void UseSingleThreadedBlas();

// Per-thread "visited" marks for graph searches: an epoch per search, so nothing is cleared
// between searches; grows to the largest index the thread has searched (4 bytes per row).
class VisitedSet {
 public:
  // Starts a new search over ids [0, n).
  static VisitedSet& ForThisThread(int64_t n);
  // Returns true the first time id is seen in this search.
  bool Insert(int64_t id) {
    if (marks_[id] == epoch_) return false;
    marks_[id] = epoch_;
    return true;
  }

 private:
  std::vector<uint32_t> marks_;
  uint32_t epoch_ = 0;
};

}  // namespace kvrt::cpu_index::internal
