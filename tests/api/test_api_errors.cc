// Every error path of the C API returns its status and a message that names the problem, and
// leaves outputs and state untouched.
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt.h"
#include "tests/support/tiny_config.h"

namespace {

bool Mentions(const char* what) {
  return std::string(kvrt_last_error()).find(what) != std::string::npos;
}

class ApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = kvrt_config_default();
    cfg_.num_layers = 2;
    cfg_.num_q_heads = 4;
    cfg_.num_kv_heads = 2;
    cfg_.head_dim = 8;
    cfg_.dtype = KVRT_DTYPE_F32;
    cfg_.sink_tokens = 1;
    cfg_.window_tokens = 4;
    cfg_.top_k = 2;
    cfg_.worker_threads = 1;
    ASSERT_EQ(kvrt_runtime_create(&cfg_, &rt_), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_seq_create(rt_, &seq_), KVRT_OK);
  }
  void TearDown() override { kvrt_runtime_destroy(rt_); }
  kvrt_config cfg_;
  kvrt_runtime* rt_ = nullptr;
  kvrt_seq_id seq_ = 0;
  std::vector<float> kv_ = std::vector<float>(64 * 2 * 8, 0.5f),
                     q_ = std::vector<float>(4 * 8, 1.f), out_ = std::vector<float>(4 * 8, -7.f);
};

TEST(ApiStatus, StringsAndVersion) {
  for (int s = KVRT_OK; s <= KVRT_ERR_IO; ++s)
    EXPECT_STRNE(kvrt_status_string(static_cast<kvrt_status>(s)), "KVRT_ERR_UNKNOWN_STATUS");
  EXPECT_STREQ(kvrt_status_string(static_cast<kvrt_status>(99)), "KVRT_ERR_UNKNOWN_STATUS");
  EXPECT_EQ(std::string(kvrt_version()), std::to_string(KVRT_VERSION_MAJOR) + "." +
                                             std::to_string(KVRT_VERSION_MINOR) + "." +
                                             std::to_string(KVRT_VERSION_PATCH));
}

TEST(ApiIndexKinds, NamesParseAndDescribeFromOneTable) {
  ASSERT_GE(kvrt_index_kind_count(), 6);
  for (int32_t i = 0; i < kvrt_index_kind_count(); ++i) {
    const auto kind = static_cast<kvrt_index_kind>(i);
    const char* name = kvrt_index_kind_name(kind);
    ASSERT_NE(name, nullptr) << i;
    kvrt_index_kind parsed;
    ASSERT_EQ(kvrt_index_kind_parse(name, &parsed), KVRT_OK) << name;
    EXPECT_EQ(parsed, kind);
    char buf[128];
    ASSERT_EQ(kvrt_index_describe_search(kind, 100, 0, buf, sizeof buf), KVRT_OK);
    EXPECT_GT(std::string(buf).size(), 0u) << name;
  }
  // The cluster kind's description states the default config's budget and selection.
  char cluster[256];
  ASSERT_EQ(kvrt_index_describe_search(KVRT_INDEX_CLUSTER, 100, 0, cluster, sizeof cluster), KVRT_OK);
  EXPECT_NE(std::string(cluster).find("3% of clustered keys"), std::string::npos) << cluster;
  EXPECT_NE(std::string(cluster).find("per kv head"), std::string::npos) << cluster;
  EXPECT_EQ(kvrt_index_kind_name(static_cast<kvrt_index_kind>(kvrt_index_kind_count())), nullptr);
  kvrt_index_kind parsed;
  EXPECT_EQ(kvrt_index_kind_parse("no-such-kind", &parsed), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvrt_last_error()).find("attention-aware"), std::string::npos)
      << "the message lists the names: " << kvrt_last_error();
  char small[8];
  ASSERT_EQ(kvrt_index_describe_search(KVRT_INDEX_HNSW, 1000, 0, small, sizeof small), KVRT_OK);
  EXPECT_EQ(std::string(small), "ef=1000");  // truncated to the buffer, NUL-terminated
  EXPECT_EQ(
      kvrt_index_describe_search(static_cast<kvrt_index_kind>(99), 10, 0, small, sizeof small),
      KVRT_ERR_INVALID_ARGUMENT);
  // Out of kvrt_runtime_create's ranges: refused, naming the argument (0.3.22 described them).
  char buf[256];
  for (int32_t k : {0, -5, (1 << 20) + 1}) {
    EXPECT_EQ(kvrt_index_describe_search(KVRT_INDEX_IVF, k, 0, buf, sizeof buf),
              KVRT_ERR_INVALID_ARGUMENT)
        << k;
    EXPECT_NE(std::string(kvrt_last_error()).find("top_k"), std::string::npos);
  }
  for (int32_t e : {-7, (1 << 24) + 1}) {
    EXPECT_EQ(kvrt_index_describe_search(KVRT_INDEX_HNSW, 10, e, buf, sizeof buf),
              KVRT_ERR_INVALID_ARGUMENT)
        << e;
    EXPECT_NE(std::string(kvrt_last_error()).find("search_effort"), std::string::npos);
  }
  EXPECT_EQ(kvrt_index_describe_search(KVRT_INDEX_HNSW, 1 << 20, 1 << 24, buf, sizeof buf),
            KVRT_OK);
}

// A runtime describes the search its own config resolves (the kind's description with the
// default config cannot show a caller's cluster fields), at the effort in effect.
TEST(ApiIndexKinds, ARuntimeDescribesItsOwnSearch) {
  kvrt_config c = kvrt_config_default();
  c.index_kind = KVRT_INDEX_CLUSTER;
  c.cluster_keys = 8;
  c.cluster_group_select = 0;
  c.cluster_rescore = 4.f;
  c.use_gpu = 0;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  char buf[512];
  ASSERT_EQ(kvrt_runtime_describe_search(rt, buf, sizeof buf), KVRT_OK) << kvrt_last_error();
  const std::string text = buf;
  EXPECT_NE(text.find("clusters of ~8 keys"), std::string::npos) << text;
  EXPECT_NE(text.find("per query"), std::string::npos) << text;
  EXPECT_NE(text.find("two stages (candidates up to 4x the budget"), std::string::npos) << text;
  char def[512];
  ASSERT_EQ(kvrt_index_describe_search(KVRT_INDEX_CLUSTER, c.top_k, 0, def, sizeof def), KVRT_OK);
  EXPECT_EQ(std::string(def).find("two stages"), std::string::npos) << def;
  EXPECT_EQ(kvrt_runtime_describe_search(rt, nullptr, 4), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvrt_last_error()).find("kvrt_runtime_describe_search"), std::string::npos);
  kvrt_runtime_destroy(rt);

  c = kvrt_config_default();
  c.index_kind = KVRT_INDEX_HNSW;
  c.use_gpu = 0;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  ASSERT_EQ(kvrt_set_search_effort(rt, 777), KVRT_OK);
  ASSERT_EQ(kvrt_runtime_describe_search(rt, buf, sizeof buf), KVRT_OK);
  EXPECT_EQ(std::string(buf).rfind("ef=777 ", 0), 0u) << buf;
  kvrt_runtime_destroy(rt);
}

TEST(ApiCreate, RejectsBadConfigNamingTheField) {
  kvrt_runtime* rt = reinterpret_cast<kvrt_runtime*>(0x1);
  EXPECT_EQ(kvrt_runtime_create(nullptr, &rt), KVRT_ERR_INVALID_ARGUMENT);
  kvrt_config c = kvrt_config_default();
  EXPECT_EQ(kvrt_runtime_create(&c, nullptr), KVRT_ERR_INVALID_ARGUMENT);
  struct Bad {
    void (*mutate)(kvrt_config*);
    const char* field;
  } cases[] = {
      {[](kvrt_config* c) { c->num_layers = 0; }, "num_layers"},
      {[](kvrt_config* c) { c->num_q_heads = 7; }, "num_q_heads"},
      {[](kvrt_config* c) { c->num_kv_heads = -1; }, "num_kv_heads"},
      {[](kvrt_config* c) { c->head_dim = 0; }, "head_dim"},
      {[](kvrt_config* c) { c->head_dim = 100000; }, "head_dim"},
      {[](kvrt_config* c) { c->head_dim = 1025; }, "head_dim"},
      {[](kvrt_config* c) { c->dtype = static_cast<kvrt_dtype>(9); }, "dtype"},
      {[](kvrt_config* c) { c->scale = NAN; }, "scale"},
      {[](kvrt_config* c) { c->scale = -1.f; }, "scale"},
      {[](kvrt_config* c) { c->sink_tokens = -1; }, "sink_tokens"},
      {[](kvrt_config* c) { c->window_tokens = 0; }, "window_tokens"},
      {[](kvrt_config* c) { c->top_k = 0; }, "top_k"},
      {[](kvrt_config* c) { c->index_kind = static_cast<kvrt_index_kind>(42); }, "index_kind"},
      {[](kvrt_config* c) { c->search_effort = -3; }, "search_effort"},
      {[](kvrt_config* c) { c->worker_threads = -2; }, "worker_threads"},
      {[](kvrt_config* c) { c->record_attended = 2; }, "record_attended"},
      {[](kvrt_config* c) { c->use_gpu = 5; }, "use_gpu"},
      {[](kvrt_config* c) { c->group_search = 2; }, "group_search"},
      {[](kvrt_config* c) { c->cold_attention = static_cast<kvrt_cold_attention>(3); },
       "cold_attention"},
  };
  for (const auto& b : cases) {
    c = kvrt_config_default();
    b.mutate(&c);
    rt = reinterpret_cast<kvrt_runtime*>(0x1);
    EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_ERR_INVALID_ARGUMENT) << b.field;
    EXPECT_TRUE(Mentions(b.field)) << b.field << ": " << kvrt_last_error();
    EXPECT_EQ(rt, reinterpret_cast<kvrt_runtime*>(0x1)) << "out written on failure";
  }
  c = kvrt_config_default();
  c.use_gpu = 1;
  // Without a CUDA device (CI) the GPU backend is refused by name; with one it is created.
  const kvrt_status st = kvrt_runtime_create(&c, &rt);
  if (st == KVRT_OK) {
    kvrt_runtime_destroy(rt);
  } else {
    EXPECT_EQ(st, KVRT_ERR_UNIMPLEMENTED);
    EXPECT_TRUE(Mentions("CUDA")) << kvrt_last_error();
  }
}

TEST_F(ApiTest, NullHandlesAndPointers) {
  kvrt_seq_id id;
  int64_t n;
  kvrt_stats st = kvrt_stats_init();
  kvrt_config c = kvrt_config_default();
  EXPECT_EQ(kvrt_seq_create(nullptr, &id), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("rt is NULL"));
  EXPECT_EQ(kvrt_seq_create(rt_, nullptr), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_seq_release(nullptr, seq_), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_seq_length(nullptr, seq_, 0, &n), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_seq_length(rt_, seq_, 0, nullptr), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_runtime_config(nullptr, &c), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_runtime_config(rt_, nullptr), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_get_stats(nullptr, &st), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_get_stats(rt_, nullptr), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_prefill(nullptr, seq_, 0, nullptr, kv_.data(), kv_.data(), 1),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_prefill(rt_, seq_, 0, nullptr, nullptr, kv_.data(), 1), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("k and v"));
  EXPECT_EQ(kvrt_append(rt_, seq_, 0, kv_.data(), nullptr, 1), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, nullptr, out_.data()), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q_.data(), nullptr), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("q and out"));
  int64_t count;
  EXPECT_EQ(kvrt_get_attended(rt_, seq_, 0, 0, nullptr, 4, &count), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_get_attended(rt_, seq_, 0, 0, nullptr, 0, nullptr), KVRT_ERR_INVALID_ARGUMENT);
}

TEST_F(ApiTest, UnknownReleasedSequenceAndLayerOutOfRange) {
  EXPECT_EQ(kvrt_append(rt_, seq_ + 100, 0, kv_.data(), kv_.data(), 1), KVRT_ERR_NOT_FOUND);
  EXPECT_TRUE(Mentions("sequence"));
  EXPECT_EQ(kvrt_append(rt_, seq_, 2, kv_.data(), kv_.data(), 1), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("layer 2"));
  EXPECT_EQ(kvrt_append(rt_, seq_, -1, kv_.data(), kv_.data(), 1), KVRT_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(kvrt_seq_release(rt_, seq_), KVRT_OK);
  EXPECT_EQ(kvrt_seq_release(rt_, seq_), KVRT_ERR_NOT_FOUND);
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q_.data(), out_.data()), KVRT_ERR_NOT_FOUND);
  EXPECT_TRUE(Mentions("released"));
  kvrt_seq_id next;
  ASSERT_EQ(kvrt_seq_create(rt_, &next), KVRT_OK);
  EXPECT_NE(next, seq_) << "ids are never reused";
}

TEST_F(ApiTest, TokenCountsAndState) {
  EXPECT_EQ(kvrt_append(rt_, seq_, 0, kv_.data(), kv_.data(), 0), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("n_tokens"));
  EXPECT_EQ(kvrt_append(rt_, seq_, 0, kv_.data(), kv_.data(), -5), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_append(rt_, seq_, 0, kv_.data(), kv_.data(), INT64_MAX),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("exceeds"));
  // Attend on an empty layer: precondition, output untouched.
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q_.data(), out_.data()), KVRT_ERR_FAILED_PRECONDITION);
  EXPECT_EQ(out_[0], -7.f);
  ASSERT_EQ(kvrt_append(rt_, seq_, 0, kv_.data(), kv_.data(), 3), KVRT_OK);
  EXPECT_EQ(kvrt_prefill(rt_, seq_, 0, nullptr, kv_.data(), kv_.data(), 3),
            KVRT_ERR_FAILED_PRECONDITION);
  EXPECT_TRUE(Mentions("already holds 3"));
  int64_t n = 0;
  ASSERT_EQ(kvrt_seq_length(rt_, seq_, 0, &n), KVRT_OK);
  EXPECT_EQ(n, 3) << "the failed prefill changed nothing";
  int64_t count;
  EXPECT_EQ(kvrt_get_attended(rt_, seq_, 0, 0, nullptr, 0, &count), KVRT_ERR_FAILED_PRECONDITION);
  EXPECT_TRUE(Mentions("record_attended"));
  float lse = 0.f;
  EXPECT_EQ(kvrt_get_estimate_lse(rt_, seq_, 0, 0, &lse), KVRT_ERR_FAILED_PRECONDITION);
  EXPECT_TRUE(Mentions("record_attended"));
  EXPECT_TRUE(Mentions("get_estimate_lse")) << "named get_attended before 0.3.36";
  EXPECT_EQ(kvrt_get_estimate_lse(rt_, seq_, 0, 0, nullptr), KVRT_ERR_INVALID_ARGUMENT);
}

// The cluster kind's estimate of the cold tokens a step leaves out, as kvrt_get_estimate_lse
// reports it: a share of the exact attention mass between 0 and 1, close to the share the attended
// tokens missed (the estimate recovers part of it, docs/cluster.md); a kind without an estimate
// reports -inf.
TEST(ApiEstimate, ClusterReportsItsEstimateAndFlatNone) {
  const int d = 64, n = 9000;
  std::vector<float> k(static_cast<std::size_t>(n) * d), v(k.size()), q(2 * d), out(2 * d);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = 0.3f * nd(rng);
  for (kvrt_index_kind kind : {KVRT_INDEX_CLUSTER, KVRT_INDEX_FLAT}) {
    kvrt_config c = TinyConfig(1, 2);
    c.head_dim = d;
    c.window_tokens = 64;
    c.index_kind = kind;
    c.record_attended = 1;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    kvrt_seq_id s;
    ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), n), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
    for (int h = 0; h < 2; ++h) {
      float est = 0.f;
      ASSERT_EQ(kvrt_get_estimate_lse(rt, s, 0, h, &est), KVRT_OK) << kvrt_last_error();
      if (kind == KVRT_INDEX_FLAT) {
        EXPECT_TRUE(std::isinf(est) && est < 0) << est;
        continue;
      }
      // Exact lse over all n tokens, and the mass of the tokens this step did not attend.
      std::vector<int64_t> ids(n);
      int64_t count = 0;
      ASSERT_EQ(kvrt_get_attended(rt, s, 0, h, ids.data(), n, &count), KVRT_OK);
      std::vector<double> score(n);
      double m = -1e300;
      for (int t = 0; t < n; ++t) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[h * d + j] * k[static_cast<std::size_t>(t) * d + j];
        score[t] = dot / std::sqrt(static_cast<double>(d));
        m = std::max(m, score[t]);
      }
      double z = 0, attended = 0;
      for (int t = 0; t < n; ++t) z += std::exp(score[t] - m);
      for (int64_t i = 0; i < count; ++i) attended += std::exp(score[ids[i]] - m);
      const double missed = 1.0 - attended / z;
      ASSERT_TRUE(std::isfinite(est)) << "head " << h << ": an estimate of the clusters left out";
      const double claimed = std::exp(est - (m + std::log(z)));
      EXPECT_GT(claimed, 0.0);
      EXPECT_LT(claimed, 1.0);
      EXPECT_GT(missed, 0.0);
      // Within a factor of 20 of the truth: the estimate is biased low, but not absent.
      EXPECT_LT(std::abs(std::log(claimed / missed)), std::log(20.0))
          << "head " << h << ": claimed " << claimed << ", missed " << missed;
    }
    kvrt_runtime_destroy(rt);
  }
}

TEST_F(ApiTest, ExecContext) {
  kvrt_exec e = kvrt_exec_default();
  EXPECT_EQ(e.memory, KVRT_MEMORY_HOST);
  e.memory = KVRT_MEMORY_DEVICE;
  EXPECT_EQ(kvrt_append_ex(rt_, seq_, 0, kv_.data(), kv_.data(), 1, &e), KVRT_ERR_UNIMPLEMENTED);
  e.memory = static_cast<kvrt_memory>(3);
  EXPECT_EQ(kvrt_attend_ex(rt_, seq_, 0, q_.data(), out_.data(), &e), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_prefill_ex(rt_, seq_, 0, nullptr, kv_.data(), kv_.data(), 1, &e),
            KVRT_ERR_INVALID_ARGUMENT);
}

TEST_F(ApiTest, LastErrorIsPerThreadAndDestroyedHandleIsDetected) {
  EXPECT_EQ(kvrt_append(rt_, seq_, 9, kv_.data(), kv_.data(), 1), KVRT_ERR_INVALID_ARGUMENT);
  std::string other;
  std::thread([&] { other = kvrt_last_error(); }).join();
  EXPECT_EQ(other, "");
  EXPECT_TRUE(Mentions("layer 9"));
  kvrt_runtime* dead = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&cfg_, &dead), KVRT_OK);
  kvrt_runtime_destroy(dead);
  kvrt_runtime_destroy(nullptr);
}

TEST(ApiMemory, LimitsFailCleanlyAndLeaveTheRuntimeUsable) {
  kvrt_config c = TinyConfig();
  c.sink_tokens = 1;
  c.window_tokens = 2;
  c.index_kind = KVRT_INDEX_EXACT;
  const int64_t token_bytes = 2 * 4 * 4;  // k + v, one kv head, d = 4, f32
  c.gpu_memory_limit = 3 * token_bytes;   // exactly sinks + ring of one sequence
  c.host_memory_limit = 10 * token_bytes;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  std::vector<float> kv(64 * 4, 1.f), q(8, 1.f), out(8);
  kvrt_seq_id a, b;
  ASSERT_EQ(kvrt_seq_create(rt, &a), KVRT_OK);
  ASSERT_EQ(kvrt_seq_create(rt, &b), KVRT_OK);
  ASSERT_EQ(kvrt_append(rt, a, 0, kv.data(), kv.data(), 13), KVRT_OK);  // 3 on GPU, 10 on host
  // The host store is full: one more token would evict one more.
  EXPECT_EQ(kvrt_append(rt, a, 0, kv.data(), kv.data(), 1), KVRT_ERR_OUT_OF_MEMORY);
  EXPECT_TRUE(Mentions("host_memory_limit")) << kvrt_last_error();
  int64_t n = 0;
  ASSERT_EQ(kvrt_seq_length(rt, a, 0, &n), KVRT_OK);
  EXPECT_EQ(n, 13) << "a failed append changes nothing";
  // The GPU tier is full: a second sequence cannot get its buffers.
  EXPECT_EQ(kvrt_append(rt, b, 0, kv.data(), kv.data(), 1), KVRT_ERR_OUT_OF_MEMORY);
  EXPECT_TRUE(Mentions("gpu_memory_limit")) << kvrt_last_error();
  EXPECT_EQ(kvrt_attend(rt, a, 0, q.data(), out.data()), KVRT_OK) << "still usable";
  kvrt_stats st = kvrt_stats_init();
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_EQ(st.gpu_allocated_bytes, 3 * token_bytes);
  EXPECT_EQ(st.host_tokens, 10);
  // Releasing gives the budget back.
  ASSERT_EQ(kvrt_seq_release(rt, a), KVRT_OK);
  EXPECT_EQ(kvrt_append(rt, b, 0, kv.data(), kv.data(), 13), KVRT_OK);
  kvrt_runtime_destroy(rt);
}

TEST(ApiValidation, NonFiniteInputsAreRejectedNamingTheTensor) {
  kvrt_config c = TinyConfig();
  ASSERT_EQ(c.check_finite, 1) << "on by default";
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  std::vector<float> k(3 * 4, 1.f), v(3 * 4, 1.f), q(8, 1.f), out(8);
  v[2 * 4 + 3] = NAN;
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), 3), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("append: v")) << kvrt_last_error();
  EXPECT_TRUE(Mentions("token 2")) << kvrt_last_error();
  v[2 * 4 + 3] = 0.f;
  ASSERT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), 3), KVRT_OK);
  q[5] = INFINITY;
  EXPECT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("attend: q")) << kvrt_last_error();
  EXPECT_TRUE(Mentions("head 1")) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

// The check reads the storage bits: in bf16 and f16 an all-ones exponent (Inf, NaN, of either
// sign) is refused at its position, the largest finite values and zeros are not.
TEST(ApiValidation, NonFiniteBitsOfEveryDtypeAreFound) {
  struct Case {
    kvrt_dtype dtype;
    uint16_t bad[3], ok[3];  // +Inf, NaN, -Inf; max finite, -max finite, -0
  };
  for (const Case& t : {Case{KVRT_DTYPE_BF16, {0x7f80, 0x7fc1, 0xff80}, {0x7f7f, 0xff7f, 0x8000}},
                        Case{KVRT_DTYPE_F16, {0x7c00, 0x7e01, 0xfc00}, {0x7bff, 0xfbff, 0x8000}}}) {
    kvrt_config c = TinyConfig();
    c.dtype = t.dtype;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
    kvrt_seq_id s;
    ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    std::vector<uint16_t> k(3 * 4, 0x3c00), v(3 * 4, 0x3c00);  // finite in both dtypes
    for (int i = 0; i < 3; ++i) {
      k[1 * 4 + 2] = t.ok[i];
      EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), 3), KVRT_OK) << i;
      k[1 * 4 + 2] = t.bad[i];
      EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), 3), KVRT_ERR_INVALID_ARGUMENT) << i;
      EXPECT_TRUE(Mentions("append: k holds a non-finite value at token 1, head 0, element 2"))
          << kvrt_last_error();
      k[1 * 4 + 2] = 0x3c00;
    }
    kvrt_runtime_destroy(rt);
  }
}

// A tensor of a few MiB is checked in chunks on the runtime's workers: the error still names the
// first non-finite value, whichever chunk finishes first.
TEST(ApiValidation, ALargeTensorNamesItsFirstNonFiniteValue) {
  kvrt_config c = TinyConfig();
  c.head_dim = 64;
  c.worker_threads = 3;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const int n = 40000;  // 2.56M elements: three chunks of 2^20
  std::vector<float> k(static_cast<std::size_t>(n) * 64, 0.5f), v(k.size(), 0.5f);
  k[30000 * 64 + 7] = NAN;       // the third chunk
  k[20000 * 64 + 5] = INFINITY;  // the second
  k[33000 * 64] = -INFINITY;
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), n), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("append: k holds a non-finite value at token 20000, head 0, element 5"))
      << kvrt_last_error();
  k[20000 * 64 + 5] = 0.f;
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), n), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("token 30000, head 0, element 7")) << kvrt_last_error();
  k[30000 * 64 + 7] = 0.f;
  k[33000 * 64] = 0.f;
  v[n * 64 - 1] = NAN;  // the last element
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), n), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("append: v holds a non-finite value at token 39999, head 0, element 63"))
      << kvrt_last_error();
  v[n * 64 - 1] = 0.f;
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), n), KVRT_OK) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

TEST(ApiHeadPolicy, StreamingHeadAttendsToTheGpuTierOnly) {
  kvrt_config c = TinyConfig(2);
  c.sink_tokens = 2;
  c.window_tokens = 3;
  c.index_kind = KVRT_INDEX_EXACT;
  c.record_attended = 1;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  EXPECT_EQ(kvrt_set_head_policy(rt, 2, 0, KVRT_HEAD_STREAMING), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("layer 2"));
  EXPECT_EQ(kvrt_set_head_policy(rt, 0, 2, KVRT_HEAD_STREAMING), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("q_head 2"));
  EXPECT_EQ(kvrt_set_head_policy(rt, 0, 0, static_cast<kvrt_head_policy>(7)),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_set_head_policy(nullptr, 0, 0, KVRT_HEAD_STREAMING), KVRT_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(kvrt_set_head_policy(rt, 1, 1, KVRT_HEAD_STREAMING), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const int n = 20;
  std::vector<float> k(n * 4), v(n * 4), q = {0.3f, -0.2f, 0.5f, 0.1f, 0.3f, -0.2f, 0.5f, 0.1f},
                                         out(8);
  for (int i = 0; i < n * 4; ++i) {
    k[i] = std::sin(0.7f * i);
    v[i] = std::cos(0.3f * i);
  }
  for (int layer = 0; layer < 2; ++layer)
    ASSERT_EQ(kvrt_append(rt, s, layer, k.data(), v.data(), n), KVRT_OK);
  ASSERT_EQ(kvrt_attend(rt, s, 1, q.data(), out.data()), KVRT_OK);
  // Head 0 (retrieval) sees all 20 tokens; head 1 (streaming) the 2 sinks and the 3 last.
  std::vector<int64_t> ids(n);
  int64_t count = 0;
  ASSERT_EQ(kvrt_get_attended(rt, s, 1, 0, ids.data(), n, &count), KVRT_OK);
  EXPECT_EQ(count, n);
  ASSERT_EQ(kvrt_get_attended(rt, s, 1, 1, ids.data(), n, &count), KVRT_OK);
  ASSERT_EQ(count, 5);
  EXPECT_EQ(std::vector<int64_t>(ids.begin(), ids.begin() + 5),
            (std::vector<int64_t>{0, 1, 17, 18, 19}));
  // Its output is exact attention over those 5 tokens.
  std::vector<double> w;
  double z = 0;
  for (int64_t t : {0, 1, 17, 18, 19}) {
    double dot = 0;
    for (int j = 0; j < 4; ++j) dot += q[4 + j] * k[t * 4 + j];
    w.push_back(std::exp(dot / 2.0));  // scale 1/sqrt(4)
    z += w.back();
  }
  int i = 0;
  for (int64_t t : {0, 1, 17, 18, 19}) {
    for (int j = 0; j < 4; ++j) out[4 + j] -= static_cast<float>(w[i] / z * v[t * 4 + j]);
    ++i;
  }
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(out[4 + j], 0.f, 1e-5f);
  // Layer 0 kept the default policy.
  ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK);
  ASSERT_EQ(kvrt_get_attended(rt, s, 0, 1, ids.data(), n, &count), KVRT_OK);
  EXPECT_EQ(count, n);
  kvrt_runtime_destroy(rt);
}

}  // namespace

// kvrt_attend_batch: the same outputs as one kvrt_attend per sequence, and its own error paths.
TEST(ApiAttendBatch, EqualsOneAttendPerSequenceAndNamesBadInput) {
  kvrt_config c = TinyConfig(1, 4);
  c.num_kv_heads = 2;
  c.sink_tokens = 1;
  c.window_tokens = 4;
  c.top_k = 3;
  c.index_kind = KVRT_INDEX_FLAT;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  const int n = 5, T = 40, kv = 2 * 4, qrow = 4 * 4;
  std::vector<kvrt_seq_id> seqs(n);
  std::vector<float> k(T * kv), v(T * kv), q(n * qrow);
  for (int s = 0; s < n; ++s) {
    ASSERT_EQ(kvrt_seq_create(rt, &seqs[s]), KVRT_OK);
    for (int i = 0; i < T * kv; ++i) {
      k[i] = std::sin(0.37f * i + s);
      v[i] = std::cos(0.11f * i - s);
    }
    ASSERT_EQ(kvrt_prefill(rt, seqs[s], 0, nullptr, k.data(), v.data(), T - s), KVRT_OK);
  }
  for (int i = 0; i < n * qrow; ++i) q[i] = std::sin(0.23f * i);
  std::vector<float> batch(n * qrow, NAN), single(n * qrow, NAN);
  ASSERT_EQ(kvrt_attend_batch(rt, seqs.data(), n, 0, q.data(), batch.data()), KVRT_OK)
      << kvrt_last_error();
  for (int s = 0; s < n; ++s)
    ASSERT_EQ(kvrt_attend(rt, seqs[s], 0, q.data() + s * qrow, single.data() + s * qrow), KVRT_OK);
  EXPECT_EQ(batch, single);

  std::vector<float> out(n * qrow, 7.f);
  EXPECT_EQ(kvrt_attend_batch(rt, seqs.data(), 0, 0, q.data(), out.data()),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_attend_batch(rt, nullptr, 1, 0, q.data(), out.data()), KVRT_ERR_INVALID_ARGUMENT);
  std::vector<kvrt_seq_id> twice = {seqs[0], seqs[1], seqs[0]};
  EXPECT_EQ(kvrt_attend_batch(rt, twice.data(), 3, 0, q.data(), out.data()),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvrt_last_error()).find("listed twice"), std::string::npos)
      << kvrt_last_error();
  EXPECT_EQ(kvrt_attend_batch(rt, seqs.data(), n, 3, q.data(), out.data()),
            KVRT_ERR_INVALID_ARGUMENT);
  for (float x : out) EXPECT_EQ(x, 7.f);  // nothing written by the refused calls
  // An unknown sequence fails its own row only (test_api_contract.cc covers the rule in full).
  std::vector<kvrt_seq_id> unknown = {seqs[0], 12345};
  EXPECT_EQ(kvrt_attend_batch(rt, unknown.data(), 2, 0, q.data(), out.data()), KVRT_ERR_NOT_FOUND);
  EXPECT_NE(std::string(kvrt_last_error()).find("12345"), std::string::npos) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

// kvrt.h lets kvrt_runtime_config run beside anything but create/destroy, kvrt_set_search_effort
// included: its copy of the config and the setter's write were a data race (TSan, 3 of 3 runs of
// a probe; scripts/sanitize.sh --tsan runs this test). Here: every effort read is one set.
TEST(ApiThreads, RuntimeConfigBesideSetSearchEffortReadsAnEffortSet) {
  kvrt_config c = TinyConfig();
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  std::thread setter([rt] {
    for (int i = 0; i < 2000; ++i) kvrt_set_search_effort(rt, 1 + i % 2);
  });
  for (int i = 0; i < 2000; ++i) {
    kvrt_config got = kvrt_config_default();
    ASSERT_EQ(kvrt_runtime_config(rt, &got), KVRT_OK);
    EXPECT_TRUE(got.search_effort == 0 || got.search_effort == 1 || got.search_effort == 2);
  }
  setter.join();
  kvrt_runtime_destroy(rt);
}
