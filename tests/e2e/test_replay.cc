// Replays a small generated trace through the public C API and checks the report against exact
// attention: exact mode must be exact, flat top-k must find the exact top-k of the cold tokens.
#include <cstdio>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "tools/replay.h"
#include "tools/report.h"
#include "tools/trace/trace.h"

namespace kvrt::cli {
namespace {

class ReplayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    path_ = (std::filesystem::temp_directory_path() /
             ("kvrt_e2e_" + std::to_string(::getpid()) + ".safetensors"))
                .string();
    trace::GenOptions g;
    g.meta.num_layers = 2;
    g.meta.num_q_heads = 4;
    g.meta.num_kv_heads = 2;
    g.meta.head_dim = 32;
    g.meta.dtype = DType::kF32;
    g.meta.prompt_tokens = 1500;
    g.meta.decode_steps = 6;
    g.seed = 5;
    g.needles = 4;
    g.show_progress = false;
    ASSERT_TRUE(trace::GenerateTrace(path_, g).ok());
  }
  static void TearDownTestSuite() { std::remove(path_.c_str()); }

  ReplayReport Replay(kvrt_index_kind kind, int top_k, int window = 64, double streaming = 0) {
    auto t = trace::TraceReader::Open(path_);
    EXPECT_TRUE(t.ok()) << t.status();
    auto ref = ComputeExactReference(**t, 2000, 0, false);
    EXPECT_TRUE(ref.ok()) << ref.status();
    ReplayOptions o;
    o.index = kind;
    o.top_k = top_k;
    o.window = window;
    o.threads = 2;
    o.progress = false;
    o.streaming_threshold = streaming;
    auto r = RunReplay(**t, *ref, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return *r;
  }
  static std::string path_;
};
std::string ReplayTest::path_;

TEST_F(ReplayTest, ExactModeIsExact) {
  const auto r = Replay(KVRT_INDEX_EXACT, 100);
  EXPECT_EQ(r.steps, 6);
  EXPECT_DOUBLE_EQ(r.recall_at_k, 1.0);
  EXPECT_NEAR(r.mass_recall, 1.0, 1e-5);
  EXPECT_LT(r.output_rel_error_max, 1e-5);
  EXPECT_DOUBLE_EQ(r.scanned_fraction, 1.0);
  EXPECT_EQ(r.cold_tokens, 1500 + 6 - 4 - 64);
}

TEST_F(ReplayTest, FlatWithKCoveringTheColdTierIsExact) {
  const auto r = Replay(KVRT_INDEX_FLAT, 2000);
  EXPECT_DOUBLE_EQ(r.recall_at_k, 1.0);
  EXPECT_LT(r.output_rel_error_max, 1e-5);
}

TEST_F(ReplayTest, FlatTopKRecallsTheExactTopK) {
  // With sinks + window + the exact top-k cold tokens, every exact top-k token is attended.
  const auto r = Replay(KVRT_INDEX_FLAT, 50);
  EXPECT_DOUBLE_EQ(r.recall_at_k, 1.0);
  EXPECT_LT(r.mass_recall, 1.0);
  EXPECT_GT(r.mass_recall, 0.3);
  EXPECT_GT(r.output_rel_error_mean, 0.0);
  const auto j = ReportJson(r);
  for (const char* key :
       {"recall_at_k", "mass_recall", "output_rel_error_mean", "output_rel_error_p99",
        "scanned_fraction", "latency_us_p50", "latency_us_p99", "steps"})
    EXPECT_TRUE(j.contains(key)) << key;
}

TEST_F(ReplayTest, StreamingHeadsSkipTheColdTier) {
  const auto all = Replay(KVRT_INDEX_EXACT, 100, 64, 1e-9);  // every head qualifies
  EXPECT_EQ(all.streaming_heads, 2 * 4);
  EXPECT_EQ(all.cold_tokens_attended_per_head, 0.0);
  EXPECT_EQ(all.scanned_fraction, 0.0);
  EXPECT_LT(all.mass_recall, 1.0);
  ASSERT_EQ(all.heads.size(), 8u);
  for (const auto& h : all.heads) {
    EXPECT_TRUE(h.streaming);
    EXPECT_GT(h.tier_mass_calibration, 0.0);
    EXPECT_LE(h.tier_mass_calibration, 1.0 + 1e-9);
  }
  const auto none = Replay(KVRT_INDEX_EXACT, 100, 64, 0);
  EXPECT_EQ(none.streaming_heads, 0);
  EXPECT_DOUBLE_EQ(none.recall_at_k, 1.0);
}

}  // namespace
}  // namespace kvrt::cli
