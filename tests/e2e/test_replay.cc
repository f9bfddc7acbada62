// Replays a small generated trace through the public C API and checks the report against exact
// attention: exact mode must be exact, flat top-k must find the exact top-k of the cold tokens.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/random_trace.h"
#include "tools/accuracy.h"
#include "tools/replay.h"
#include "tools/report.h"
#include "tools/reuse.h"
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
  // Every cold position every step: step t holds step t-1's cold positions and one more; every
  // layer holds the same ones at the same step.
  const double cold_now = 1500 + 6 - 4 - 64, cold_before = cold_now - 1;
  EXPECT_GT(r.head_step_reuse, cold_before / (cold_now + 4));
  EXPECT_LT(r.head_step_reuse, 1.0);
  EXPECT_NEAR(r.kv_step_reuse, r.head_step_reuse, 1e-12);
  EXPECT_DOUBLE_EQ(r.layer_reuse, 1.0);
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

// A trace without a prompt has nothing to calibrate a head on: the share is unmeasured (n/a,
// JSON null) and no head streams on it, where an assumed share of 1 once streamed every head.
TEST(ReplayNoPrompt, StreamingThresholdStreamsNoHeadOnAnUnmeasuredShare) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("kvrt_noprompt_" + std::to_string(::getpid()) + ".safetensors"))
                               .string();
  trace::TraceMeta m;
  m.num_layers = 1;
  m.num_q_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 16;
  m.dtype = DType::kF32;
  m.prompt_tokens = 0;
  m.decode_steps = 24;
  ASSERT_FALSE(trace::testing::WriteRandomTrace(path, m, 3).empty());
  auto t = trace::TraceReader::Open(path);
  ASSERT_TRUE(t.ok()) << t.status();
  auto ref = ComputeExactReference(**t, 4, 0, false);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ReplayOptions o;
  o.index = KVRT_INDEX_FLAT;
  o.top_k = 4;
  o.sinks = 2;
  o.window = 8;
  o.threads = 1;
  o.progress = false;
  o.streaming_threshold = 0.5;
  auto r = RunReplay(**t, *ref, o);
  std::remove(path.c_str());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->streaming_heads, 0);
  EXPECT_DOUBLE_EQ(r->recall_at_k, 1.0);  // flat, as if no threshold were given
  ASSERT_EQ(r->heads.size(), 4u);
  const auto j = ReportJson(*r);
  for (int h = 0; h < 4; ++h) {
    EXPECT_FALSE(r->heads[h].streaming);
    EXPECT_TRUE(std::isnan(r->heads[h].tier_mass_calibration));
    EXPECT_TRUE(j["per_head"][h]["tier_mass_calibration"].is_null());
  }
}

// The cluster kind's two-stage selection through the C API (--cluster-rescore, and on codes
// --cluster-rescore-bits): a trace of one full 8192-token segment of cold keys, replayed with and
// without it. The same number of cold tokens attended, more keys scored, and a lower output error
// against exact attention.
TEST(ReplayCluster, RescoreAttendsAsManyTokensScoresMoreAndErrsLess) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("kvrt_e2e_rescore_" + std::to_string(::getpid()) + ".safetensors"))
                               .string();
  trace::GenOptions g;
  g.meta.num_layers = 1;
  g.meta.num_q_heads = 4;
  g.meta.num_kv_heads = 1;
  g.meta.head_dim = 32;
  g.meta.dtype = DType::kF32;
  g.meta.prompt_tokens = 8192 + 4 + 64;
  g.meta.decode_steps = 4;
  g.seed = 9;
  g.show_progress = false;
  ASSERT_TRUE(trace::GenerateTrace(path, g).ok());
  auto t = trace::TraceReader::Open(path);
  ASSERT_TRUE(t.ok()) << t.status();
  auto ref = ComputeExactReference(**t, 100, 0, false);
  ASSERT_TRUE(ref.ok()) << ref.status();
  // Runs: one stage; two stages on the keys; two stages on 2-bit codes of them (0.3.13); one
  // stage with the clusters ranked by their rows' 2-bit codes (0.3.14); that, per q head, one
  // search per q head and one per kv head (group_search: one pass over the codes, 0.3.15); the
  // one stage with the rest estimated from 2-bit value codes (0.3.15).
  ReplayReport r[7];
  for (int i = 0; i < 7; ++i) {
    ReplayOptions o;
    o.index = KVRT_INDEX_CLUSTER;
    o.window = 64;
    o.threads = 2;
    o.progress = false;
    o.cluster.rescore = i == 0 || i >= 3 ? 0.0 : 4.0;
    o.cluster.rescore_bits = i >= 2 ? 2 : 0;
    o.cluster.group_select = i == 4 || i == 5 ? 0 : -1;
    o.group_search = i == 5;
    o.cluster.value_bits = i == 6 ? 2 : -1;
    auto got = RunReplay(**t, *ref, o);
    ASSERT_TRUE(got.ok()) << got.status();
    r[i] = *got;
  }
  std::remove(path.c_str());
  EXPECT_NEAR(r[1].cold_tokens_attended_per_head, r[0].cold_tokens_attended_per_head,
              0.1 * r[0].cold_tokens_attended_per_head);
  EXPECT_GT(r[1].scanned_fraction, r[0].scanned_fraction);
  EXPECT_LT(r[1].output_rel_error_mean, r[0].output_rel_error_mean);
  EXPECT_GT(r[1].mass_recall, r[0].mass_recall);
  // The codes keep most of the keys' gain: the same rows attended, an error below the midpoint
  // of one stage's and the keys' (at head_dim 32 here; on the Gemma 3 traces, d = 256, within
  // 8% of the keys').
  EXPECT_NEAR(r[2].cold_tokens_attended_per_head, r[1].cold_tokens_attended_per_head,
              0.01 * r[1].cold_tokens_attended_per_head);
  EXPECT_LT(r[2].output_rel_error_mean,
            0.5 * (r[0].output_rel_error_mean + r[1].output_rel_error_mean));
  // Whole clusters ranked by their codes: about the same tokens (whole clusters, as one stage
  // takes them), every coded row scored, a lower error than the centroids' ranking.
  EXPECT_NEAR(r[3].cold_tokens_attended_per_head, r[0].cold_tokens_attended_per_head,
              0.1 * r[0].cold_tokens_attended_per_head);
  EXPECT_GT(r[3].scanned_fraction, 0.9);
  EXPECT_LT(r[3].output_rel_error_mean, r[0].output_rel_error_mean);
  // Per q head, the group's one pass over the codes selects for each head what its own search
  // does: the same rows, the same outputs.
  EXPECT_EQ(r[5].cold_tokens_attended_per_head, r[4].cold_tokens_attended_per_head);
  EXPECT_EQ(r[5].output_rel_error_mean, r[4].output_rel_error_mean);
  EXPECT_EQ(r[5].output_rel_error_max, r[4].output_rel_error_max);
  EXPECT_EQ(r[5].mass_recall, r[4].mass_recall);
  // The rest estimated from value codes: the same rows attended, less error.
  EXPECT_EQ(r[6].cold_tokens_attended_per_head, r[3].cold_tokens_attended_per_head);
  EXPECT_LT(r[6].output_rel_error_mean, 0.9 * r[3].output_rel_error_mean);
  for (const auto& x : r)
    std::printf("rescore: attended %.0f scanned %.4f error %.5f mass %.4f\n",
                x.cold_tokens_attended_per_head, x.scanned_fraction, x.output_rel_error_mean,
                x.mass_recall);
}

// The exact reference's pass over a kv head's q heads at once gives each head the result of its
// own pass, bit for bit (replay's accuracy figures must not move with the grouping).
TEST(ExactReference, GroupedHeadsEqualOnePassEach) {
  const int d = 32, nq = 4, n = 300, top_k = 7;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n * d), v(n * d), q(nq * d);
  for (auto* x : {&k, &v, &q})
    for (float& e : *x) e = nd(rng);
  const HeadRows rows{k.data(), v.data(), d, n};
  std::vector<float> o(nq * d), lse(nq);
  std::vector<int32_t> top(nq * top_k);
  ExactAttention(q.data(), nq, rows, d, 0.2f, top_k, o.data(), lse.data(), top.data());
  for (int h = 0; h < nq; ++h) {
    std::vector<float> o1(d);
    float lse1 = 0;
    std::vector<int32_t> top1(top_k);
    ExactAttention(q.data() + h * d, 1, rows, d, 0.2f, top_k, o1.data(), &lse1, top1.data());
    EXPECT_EQ(std::vector<float>(o.begin() + h * d, o.begin() + (h + 1) * d), o1) << h;
    EXPECT_EQ(lse[h], lse1) << h;
    EXPECT_EQ(std::vector<int32_t>(top.begin() + h * top_k, top.begin() + (h + 1) * top_k), top1)
        << h;
  }
}

// recall@k counts ties as a top-k does: with every score equal any k ids are a top-k (an id-ordered
// count gave 0.1 to one index and 1.0 to another for the same mass); with distinct scores it is
// the plain overlap with the exact top-k.
TEST(ScoreHead, RecallCountsTiedScoresAsATopKDoes) {
  const int d = 4, n = 40, k = 8;
  std::vector<float> keys(n * d, 1.f), vals(n * d, 0.5f), q(d, 0.f);
  const HeadRows rows{keys.data(), vals.data(), d, n};
  std::vector<float> o(d), lse(1);
  std::vector<int32_t> top(k);
  ExactAttention(q.data(), 1, rows, d, 0.5f, k, o.data(), lse.data(), top.data());
  std::vector<uint8_t> mark(n, 0);
  HeadAccuracy acc;
  const std::vector<int64_t> late = {30, 31, 32, 33, 34, 35, 36, 37};  // not the id-ordered top
  ASSERT_TRUE(ScoreHead(q.data(), rows, d, 0.5f, o.data(), lse[0], top.data(), k, late.data(),
                        static_cast<int64_t>(late.size()), o.data(), &mark, &acc)
                  .ok());
  EXPECT_DOUBLE_EQ(acc.recall, 1.0);
  const std::vector<int64_t> few = {3, 39};
  ASSERT_TRUE(ScoreHead(q.data(), rows, d, 0.5f, o.data(), lse[0], top.data(), k, few.data(), 2,
                        o.data(), &mark, &acc)
                  .ok());
  EXPECT_DOUBLE_EQ(acc.recall, 2.0 / k);
  // Distinct scores: key i scores i; the top-8 are 32..39; 4 of the attended are among them.
  for (int i = 0; i < n; ++i) keys[i * d] = static_cast<float>(i);
  q[0] = 1.f;
  ExactAttention(q.data(), 1, rows, d, 0.5f, k, o.data(), lse.data(), top.data());
  const std::vector<int64_t> half = {0, 1, 2, 3, 36, 37, 38, 39};
  ASSERT_TRUE(ScoreHead(q.data(), rows, d, 0.5f, o.data(), lse[0], top.data(), k, half.data(),
                        static_cast<int64_t>(half.size()), o.data(), &mark, &acc)
                  .ok());
  EXPECT_DOUBLE_EQ(acc.recall, 0.5);
}

TEST(SelectionReuse, SharesOfTheColdPositionsChosenBefore) {
  SelectionReuse r(/*q_heads=*/2, /*kv_heads=*/1);
  const int64_t a0[] = {1, 10, 11, 12, 99};   // 99: past the cold range, not counted
  const int64_t b0[] = {20, 21};
  r.BeginStep(0, 0, /*cold_begin=*/5, /*cold_end=*/50);
  r.AddHead(0, a0, 5);  // cold: 10 11 12
  r.AddHead(1, b0, 2);
  r.EndStep();
  EXPECT_TRUE(std::isnan(r.head_step_reuse())) << "the first step has nothing before it";
  EXPECT_TRUE(std::isnan(r.layer_reuse())) << "nor has the first layer";
  const int64_t a1[] = {10, 11, 30, 31};
  const int64_t b1[] = {21, 21, 40};
  r.BeginStep(0, 1, 5, 50);
  r.AddHead(0, a1, 4);  // 2 of 4 chosen before
  r.AddHead(1, b1, 3);  // {21, 40}: 1 of 2
  r.EndStep();
  EXPECT_DOUBLE_EQ(r.head_step_reuse(), (0.5 + 0.5) / 2);
  // The group's union {10 11 21 30 31 40} against {10 11 12 20 21}: 3 of 6.
  EXPECT_DOUBLE_EQ(r.kv_step_reuse(), 0.5);
  EXPECT_EQ(r.layer_samples(), 0);
  // Layer 1, step 1 against layer 0's step 1 union {10 11 21 30 31 40}.
  const int64_t c[] = {10, 40, 45};
  r.BeginStep(1, 0, 5, 50);
  r.EndStep();  // step 0 of layer 1: no positions, no sample
  r.BeginStep(1, 1, 5, 50);
  r.AddHead(0, c, 3);
  r.EndStep();
  EXPECT_EQ(r.layer_samples(), 1);
  EXPECT_DOUBLE_EQ(r.layer_reuse(), 2.0 / 3);
  EXPECT_DOUBLE_EQ(r.head_step_reuse(), 0.5) << "layer 1 has no step before its step 1's";
}

}  // namespace
}  // namespace kvrt::cli
