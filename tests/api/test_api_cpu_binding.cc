// config.worker_cpu_first / worker_cpu_count through the C API, seen from outside the library:
// while a runtime works, the kernel reports its worker on the given CPU and the caller's thread
// where it was; afterwards every thread has its CPUs back; bad ranges are refused by name.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt.h"
#include "tests/support/thread_affinity.h"
#include "tests/support/tiny_config.h"

namespace {

bool Mentions(const char* what) {
  return std::string(kvrt_last_error()).find(what) != std::string::npos;
}

// Enough exact attention per call (8 q heads x 8K cold tokens, parallel over heads) that the
// arena's worker is busy most of the time the sampler looks.
kvrt_config BusyConfig() {
  kvrt_config c = TinyConfig(1, 8);
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.index_kind = KVRT_INDEX_EXACT;
  c.check_finite = 0;
  return c;
}

void Work(const kvrt_config& c, int attends) {
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  constexpr int kTokens = 8192;
  std::vector<float> k(static_cast<std::size_t>(kTokens) * 2 * 64), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * static_cast<float>(i));
    v[i] = std::cos(0.11f * static_cast<float>(i));
  }
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), kTokens), KVRT_OK);
  std::vector<float> q(8 * 64, 0.05f), out(8 * 64);
  for (int i = 0; i < attends; ++i)
    ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

// Runs `work` on this thread while another samples every thread's CPUs. Returns the threads seen
// with exactly `cpus`; *caller_moved is set when this thread was ever seen elsewhere than `home`.
std::set<long> ThreadsSeenOn(const std::string& cpus, const std::string& home,
                             const std::function<void()>& work, bool* caller_moved) {
  const long caller = ThisTid();
  std::atomic<bool> done{false};
  std::set<long> seen;
  *caller_moved = false;
  std::thread sampler([&] {
    const long self = ThisTid();
    while (!done.load()) {
      for (long tid : ProcessTids()) {
        if (tid == self) continue;
        const std::string now = CpusAllowed(tid);
        if (tid == caller && !now.empty() && now != home) *caller_moved = true;
        if (tid != caller && now == cpus) seen.insert(tid);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  work();
  done = true;
  sampler.join();
  return seen;
}

class CpuBinding : public ::testing::Test {
 protected:
  void SetUp() override {
    home_ = CpusAllowed(ThisTid());
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2 || home_ == "0")
      GTEST_SKIP() << "needs two CPUs to tell CPU 0 from all of them";
  }
  std::string home_;
};

TEST_F(CpuBinding, TheWorkerRunsOnTheRangeAndEveryThreadGetsItsCpusBack) {
  kvrt_config c = BusyConfig();
  c.worker_cpu_first = 0;
  c.worker_cpu_count = 1;
  c.worker_threads = 2;  // one oneTBB worker (pinned) beside the calling thread (not pinned)
  bool caller_moved = false;
  const std::set<long> pinned = ThreadsSeenOn(
      "0", home_, [&] { Work(c, 150); }, &caller_moved);
  EXPECT_FALSE(pinned.empty()) << "no thread was seen on CPU 0 alone while the runtime worked";
  EXPECT_FALSE(caller_moved) << "the calling thread's CPUs changed";
  // The runtime is destroyed: its worker left the arena with its CPUs restored (oneTBB keeps the
  // thread for other work).
  for (long tid : pinned) {
    const std::string now = CpusAllowed(tid);
    EXPECT_TRUE(now.empty() || now == home_) << "thread " << tid << " still on CPUs " << now;
  }
}

TEST_F(CpuBinding, WithoutARangeNoThreadIsPinned) {
  kvrt_config c = BusyConfig();
  c.worker_threads = 2;
  bool caller_moved = false;
  EXPECT_TRUE(ThreadsSeenOn(
                  "0", home_, [&] { Work(c, 150); }, &caller_moved)
                  .empty());
  EXPECT_FALSE(caller_moved);
}

TEST(CpuBindingConfig, EffectiveValuesAreReported) {
  kvrt_config c = TinyConfig();
  c.worker_cpu_first = 0;
  c.worker_cpu_count = 1;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.worker_cpu_first, 0);
  EXPECT_EQ(eff.worker_cpu_count, 1);
  EXPECT_EQ(eff.worker_threads, 1) << "worker_threads 0 means one thread per CPU of the range";
  kvrt_runtime_destroy(rt);
  EXPECT_EQ(kvrt_config_default().worker_cpu_count, 0) << "not bound by default";
}

TEST(CpuBindingConfig, RangesTheMachineCannotGiveAreRefusedByName) {
  const int conf = static_cast<int>(sysconf(_SC_NPROCESSORS_CONF));
  struct Case {
    int first, count;
    const char* field;
  };
  for (const Case& k : {Case{conf, 1, "worker_cpu_first"}, Case{1 << 20, 4, "worker_cpu_first"},
                        Case{0, INT32_MAX, "online CPUs"}, Case{INT32_MAX, 2, "worker_cpu_first"},
                        Case{-1, 1, "worker_cpu_first"}, Case{0, -1, "worker_cpu_count"}}) {
    kvrt_config c = TinyConfig();
    c.worker_cpu_first = k.first;
    c.worker_cpu_count = k.count;
    kvrt_runtime* rt = nullptr;
    EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_ERR_INVALID_ARGUMENT) << k.first << "+" << k.count;
    EXPECT_TRUE(Mentions(k.field)) << kvrt_last_error();
    EXPECT_EQ(rt, nullptr);
  }
  // An unbound range's first CPU is not looked at beyond its sign.
  kvrt_config c = TinyConfig();
  c.worker_cpu_first = 1 << 20;
  kvrt_runtime* rt = nullptr;
  EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

}  // namespace
