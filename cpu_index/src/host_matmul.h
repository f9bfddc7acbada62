#pragma once
// What every oneDNN matmul of kvrt's host code shares: the CPU engine, a run on the calling thread
// alone (inside a TBB task, beside other tasks), and the OpenMP guard that keeps it there.
#include <new>

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

// fn() with oneDNN's exceptions and an allocation's failure as false: a product on the tiles that
// fails leaves its caller to compute in f32.
template <typename Fn>
bool Guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const dnnl::error&) {
    return false;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

}  // namespace kvrt::cpu_index::internal
