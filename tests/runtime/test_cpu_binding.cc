// CPU partitioning (runtime/src/cpu_binding.h): the range check, and an arena whose worker runs
// on the range while it works there and gets its own CPUs back when it leaves, while the thread
// that calls into the arena keeps its own.
#include <sched.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/partitioner.h"
#include "runtime/src/cpu_binding.h"
#include "tests/support/thread_affinity.h"

namespace kvrt::runtime {
namespace {

TEST(CpuRange, OnlineCpusAreListedAscending) {
  const std::vector<int> online = OnlineCpus();
  ASSERT_FALSE(online.empty());
  for (std::size_t i = 1; i < online.size(); ++i) EXPECT_LT(online[i - 1], online[i]);
  EXPECT_TRUE(CheckCpuRange(online.front(), 1).ok());
}

TEST(CpuRange, RangesPastTheOnlineCpusAreRefusedNamingTheFields) {
  const int last = OnlineCpus().back();
  for (auto [first, count] : {std::pair{last + 1, 1}, std::pair{last, 2}, std::pair{0, INT32_MAX},
                              std::pair{INT32_MAX, INT32_MAX}}) {
    const absl::Status s = CheckCpuRange(first, count);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << first << "+" << count;
    EXPECT_NE(s.message().find("worker_cpu_first"), std::string::npos) << s;
    EXPECT_NE(s.message().find("online CPUs"), std::string::npos) << s;
  }
}

TEST(CpuSet, RangeAndString) {
  EXPECT_EQ(CpuSet::Range(0, 1).ToString(), "0");
  EXPECT_EQ(CpuSet::Range(2, 3).ToString(), "2-4");
  EXPECT_EQ(CpuSet().ToString(), "none");
  EXPECT_TRUE(CpuSet::Range(2, 3).Has(4));
  EXPECT_FALSE(CpuSet::Range(2, 3).Has(5));
  EXPECT_TRUE(CpuSet::Range(1, 2) == CpuSet::Range(1, 2));
  EXPECT_FALSE(CpuSet::Range(1, 2) == CpuSet::Range(1, 1));
}

// What one task saw of the thread that ran it.
struct Seen {
  long tid = 0;
  std::string cpus;  // its affinity
  int cpu = -1;      // sched_getcpu()
};

TEST(ArenaCpuBinding, TheWorkerRunsOnTheRangeAndGetsItsCpusBack) {
  const std::vector<int> online = OnlineCpus();
  const std::string all = CpusAllowed(ThisTid());
  if (online.size() < 2 || all == "0") GTEST_SKIP() << "needs two CPUs to tell a range from all";
  const int target = online.front();

  tbb::task_arena arena(2);  // one worker slot (oneTBB keeps one for the calling thread)
  Seen by_caller, by_worker;
  {
    ArenaCpuBinding binding(arena, target, 1);
    // Two iterations that each wait for the other to start: one must run on a worker.
    std::atomic<int> started{0};
    const long caller = ThisTid();
    arena.execute([&] {
      tbb::parallel_for(
          0, 2,
          [&](int) {
            started.fetch_add(1);
            const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
            while (started.load() < 2 && std::chrono::steady_clock::now() < give_up)
              std::this_thread::yield();
            Seen s{ThisTid(), CpusAllowed(ThisTid()), sched_getcpu()};
            (s.tid == caller ? by_caller : by_worker) = s;
          },
          tbb::simple_partitioner());
    });
    ASSERT_EQ(started.load(), 2);
  }  // the binding waits for the worker to leave the idle arena
  ASSERT_NE(by_worker.tid, 0) << "no worker joined the arena within 20 s";
  EXPECT_EQ(by_worker.cpus, std::to_string(target));
  EXPECT_EQ(by_worker.cpu, target);
  EXPECT_EQ(by_caller.cpus, all) << "the calling thread is not the runtime's to move";
  EXPECT_EQ(CpusAllowed(by_worker.tid), all) << "the worker got its CPUs back on leaving";
}

}  // namespace
}  // namespace kvrt::runtime
