#pragma once
// What every oneDNN matmul of kvrt's host code shares: the CPU engine, a run on the calling thread
// alone (inside a TBB task, beside other tasks), and the OpenMP guard that keeps it there.
#include "oneapi/dnnl/dnnl.hpp"

namespace kvrt::cpu_index::internal {

// Sets OpenMP's thread count for the calling thread for the guard's life (FAISS and oneDNN
// parallelise with OpenMP; inside a TBB task they must run on one thread or they oversubscribe the
// cores).
class OmpThreadsGuard {
 public:
  explicit OmpThreadsGuard(int threads);
  ~OmpThreadsGuard();
  OmpThreadsGuard(const OmpThreadsGuard&) = delete;
  OmpThreadsGuard& operator=(const OmpThreadsGuard&) = delete;

 private:
  int saved_;
};

const dnnl::engine& CpuEngine();

// src x weights -> dst on the calling thread alone, with a scratchpad of this thread's (a
// primitive's own is shared by the threads that run it at once: pd needs
// scratchpad_mode::user).
void RunOnThisThread(const dnnl::matmul& mm, const dnnl::matmul::primitive_desc& pd,
                     const dnnl::memory& src, const dnnl::memory& weights, const dnnl::memory& dst);

}  // namespace kvrt::cpu_index::internal
