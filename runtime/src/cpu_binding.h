#pragma once
// CPU partitioning between runtimes (config.worker_cpu_first / worker_cpu_count): the workers of
// one runtime's oneTBB arena run on a contiguous range of CPUs, so that several runtimes (one per
// tensor-parallel rank on a host) do not oversubscribe each other's cores. Linux only (the
// affinity calls are glibc's).
#include <sched.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "oneapi/tbb/task_arena.h"
#include "oneapi/tbb/task_scheduler_observer.h"

namespace kvrt::runtime {

// The CPU ids the kernel has online (/sys/devices/system/cpu/online, e.g. "0-3,8-11"); when that
// file cannot be read, 0 .. sysconf(_SC_NPROCESSORS_ONLN) - 1. Ascending.
std::vector<int> OnlineCpus();

// A CPU set sized for this machine's CPU ids (glibc's CPU_ALLOC: a fixed cpu_set_t holds 1024
// CPUs, and the affinity calls fail when the kernel knows more).
class CpuSet {
 public:
  CpuSet();  // empty
  static CpuSet Range(int first, int count);
  // The calling thread's affinity.
  static CpuSet OfThisThread();

  bool Has(int cpu) const;
  bool operator==(const CpuSet& other) const;
  // The CPU ids in the set, as `taskset -c` prints them ("0-3,8").
  std::string ToString() const;
  // pthread_setaffinity_np on the calling thread; false when the kernel refuses.
  bool ApplyToThisThread() const;

 private:
  struct Free {
    void operator()(cpu_set_t* s) const { CPU_FREE(s); }
  };
  int cpus_ = 0;  // CPU ids the set can hold
  std::size_t bytes_ = 0;
  std::unique_ptr<cpu_set_t, Free> set_;
};

// Checks a range (config.worker_cpu_first, config.worker_cpu_count > 0): every CPU online, and
// usable by this process (a cgroup cpuset may exclude online CPUs: checked by pinning a
// short-lived thread to the range and reading its affinity back). InvalidArgument naming the
// fields and the CPUs that are not available otherwise.
absl::Status CheckCpuRange(int first, int count);

// Pins the worker threads of `arena` to a CPU range while they work in it. Workers are oneTBB's
// process-wide pool, shared with other arenas (other runtimes, the application's own TBB work):
// each gets the affinity it had back when it leaves. The threads that call into the arena
// (arena.execute from a kvrt call) are not the runtime's and keep their affinity.
class ArenaCpuBinding : public tbb::task_scheduler_observer {
 public:
  // Starts observing; the arena is initialised here if it was not.
  ArenaCpuBinding(tbb::task_arena& arena, int first, int count);
  // Waits (at most a second) for the pinned workers to leave the idle arena, then stops
  // observing. Destroy it once the arena's work is done.
  ~ArenaCpuBinding() override;
  ArenaCpuBinding(const ArenaCpuBinding&) = delete;
  ArenaCpuBinding& operator=(const ArenaCpuBinding&) = delete;

  void on_scheduler_entry(bool is_worker) override;
  void on_scheduler_exit(bool is_worker) override;

 private:
  CpuSet range_;
  std::atomic<int> pinned_{0};  // workers in the arena now, pinned by this binding
};

}  // namespace kvrt::runtime
