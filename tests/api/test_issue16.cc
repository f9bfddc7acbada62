// Regression tests of issue 16 (what an integrator found): each case failed before its fix.
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt.h"
#include "tests/support/tiny_config.h"

namespace {

bool Mentions(const char* what) { return std::string(kvrt_last_error()).find(what) != std::string::npos; }

// Deterministic, varied values (no two keys alike, so that every index kind has work to do).
std::vector<float> Wave(std::size_t n, float a, float b) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::sin(a * static_cast<float>(i) + b);
  return x;
}

bool AllNan(const float* x, int n) {
  for (int i = 0; i < n; ++i)
    if (!std::isnan(x[i])) return false;
  return true;
}

bool AllFinite(const float* x, int n) {
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// ---- defect 4: attend_batch has one rule for every per-sequence error --------------------------

TEST(Issue16AttendBatch, UnknownIdFailsItsRowOnlyAndTheOthersAreWritten) {
  kvrt_config c = TinyConfig(1, 2);
  c.sink_tokens = 1;
  c.window_tokens = 4;
  c.index_kind = KVRT_INDEX_FLAT;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id a, b, empty;
  ASSERT_EQ(kvrt_seq_create(rt, &a), KVRT_OK);
  ASSERT_EQ(kvrt_seq_create(rt, &b), KVRT_OK);
  ASSERT_EQ(kvrt_seq_create(rt, &empty), KVRT_OK);
  const auto k = Wave(30 * 4, 0.3f, 0.f), v = Wave(30 * 4, 0.7f, 1.f);
  ASSERT_EQ(kvrt_prefill(rt, a, 0, nullptr, k.data(), v.data(), 30), KVRT_OK);
  ASSERT_EQ(kvrt_prefill(rt, b, 0, nullptr, k.data(), v.data(), 20), KVRT_OK);
  const int row = 2 * 4;
  const auto q = Wave(3 * row, 0.5f, 0.2f);
  std::vector<float> want(3 * row);
  ASSERT_EQ(kvrt_attend(rt, a, 0, q.data(), want.data()), KVRT_OK);
  ASSERT_EQ(kvrt_attend(rt, b, 0, q.data() + 2 * row, want.data() + 2 * row), KVRT_OK);
  for (kvrt_seq_id bad : {kvrt_seq_id{99999}, empty}) {
    const kvrt_seq_id seqs[3] = {a, bad, b};
    std::vector<float> out(3 * row, 7.f);
    const kvrt_status st = kvrt_attend_batch(rt, seqs, 3, 0, q.data(), out.data());
    EXPECT_EQ(st, bad == empty ? KVRT_ERR_FAILED_PRECONDITION : KVRT_ERR_NOT_FOUND);
    EXPECT_TRUE(Mentions(std::to_string(bad).c_str())) << "the message names the sequence: " << kvrt_last_error();
    for (int i = 0; i < row; ++i) {
      EXPECT_EQ(out[i], want[i]) << "row of a written";
      EXPECT_EQ(out[row + i], 7.f) << "failed row untouched";
      EXPECT_EQ(out[2 * row + i], want[2 * row + i]) << "row of b written";
    }
  }
  kvrt_runtime_destroy(rt);
}

// ---- defect 5: worker_threads above the hardware count is clamped, whatever its size -----------

TEST(Issue16Config, WorkerThreadsAboveTheHardwareAreClamped) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int32_t asked : {hw + 1, 4097, 100000, INT32_MAX}) {
    kvrt_config c = TinyConfig();
    c.worker_threads = asked;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << asked << ": " << kvrt_last_error();
    kvrt_config eff = kvrt_config_default();
    ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
    EXPECT_EQ(eff.worker_threads, hw);
    kvrt_runtime_destroy(rt);
  }
  kvrt_config c = TinyConfig();
  c.worker_threads = -1;
  kvrt_runtime* rt = nullptr;
  EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_ERR_INVALID_ARGUMENT);
}

}  // namespace
