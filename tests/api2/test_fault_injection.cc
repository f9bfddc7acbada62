// KVRT_ERR_INTERNAL and index-update failures, provoked through the test-only fault hook
// (runtime/src/fault_injection.h): an index search that fails fails the attend with INTERNAL and
// a message naming the search, and writes nothing; an index update that fails does not fail or
// half-apply the prefill/append (counted in stats.index_update_failures, the unindexed rows are
// scanned exactly, so outputs stay exact); the runtime stays usable after both.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt.h"
#include "runtime/src/fault_injection.h"

namespace {

namespace fault = kvrt::runtime::fault;

constexpr int kQHeads = 4, kKvHeads = 2, kDim = 8;

bool Mentions(const char* what) { return std::strstr(kvrt_last_error(), what) != nullptr; }

// FLAT index with top_k above every cold count used here, so a correct attend is exact attention
// over all tokens. 300-token prompt: past the 256 cold rows at which the runtime builds an index.
kvrt_config FlatConfig(int top_k = 1024, int group_search = 0) {
  kvrt_config c = kvrt_config_default();
  c.num_layers = 1;
  c.num_q_heads = kQHeads;
  c.num_kv_heads = kKvHeads;
  c.head_dim = kDim;
  c.dtype = KVRT_DTYPE_F32;
  c.sink_tokens = 2;
  c.window_tokens = 8;
  c.top_k = top_k;
  c.index_kind = KVRT_INDEX_FLAT;
  c.worker_threads = 2;
  c.group_search = group_search;
  return c;
}

// Every k and v given to the sequence, in order, so the test can compute exact attention.
struct Tokens {
  std::vector<float> k, v;
  std::mt19937 rng{7};
  std::normal_distribution<float> dist{0.f, 1.f};
  std::vector<float> Draw(int64_t n) {
    std::vector<float> x(static_cast<std::size_t>(n) * kKvHeads * kDim);
    for (auto& e : x) e = dist(rng);
    return x;
  }
  // n new tokens, written to *nk, *nv and remembered.
  void Next(int64_t n, std::vector<float>* nk, std::vector<float>* nv) {
    *nk = Draw(n);
    *nv = Draw(n);
    k.insert(k.end(), nk->begin(), nk->end());
    v.insert(v.end(), nv->begin(), nv->end());
  }
  int64_t size() const { return static_cast<int64_t>(k.size()) / (kKvHeads * kDim); }
};

// Softmax attention of every q head over all tokens, in f64.
std::vector<float> Reference(const Tokens& t, const std::vector<float>& q) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(kDim));
  const int group = kQHeads / kKvHeads;
  std::vector<float> out(static_cast<std::size_t>(kQHeads) * kDim);
  for (int h = 0; h < kQHeads; ++h) {
    const int g = h / group;
    std::vector<double> s(t.size());
    double mx = -1e300;
    for (int64_t i = 0; i < t.size(); ++i) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j)
        dot += double(q[h * kDim + j]) * t.k[(i * kKvHeads + g) * kDim + j];
      s[i] = dot * scale;
      mx = std::max(mx, s[i]);
    }
    double sum = 0;
    std::vector<double> o(kDim, 0.0);
    for (int64_t i = 0; i < t.size(); ++i) {
      const double w = std::exp(s[i] - mx);
      sum += w;
      for (int j = 0; j < kDim; ++j) o[j] += w * t.v[(i * kKvHeads + g) * kDim + j];
    }
    for (int j = 0; j < kDim; ++j) out[h * kDim + j] = static_cast<float>(o[j] / sum);
  }
  return out;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

kvrt_stats Stats(kvrt_runtime* rt) {
  kvrt_stats st = kvrt_stats_init();
  EXPECT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  return st;
}

class FaultInjection : public ::testing::Test {
 protected:
  // The counters are process-wide: never leave one armed for the next test.
  void TearDown() override {
    fault::FailNext(fault::Site::kIndexUpdate, 0);
    fault::FailNext(fault::Site::kIndexSearch, 0);
  }

  // A runtime with one sequence holding a 300-token prompt (index built: nothing armed).
  void Start(const kvrt_config& c) {
    ASSERT_EQ(kvrt_runtime_create(&c, &rt_), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_seq_create(rt_, &seq_), KVRT_OK);
  }
  void Prefill(int64_t n) {
    std::vector<float> k, v;
    tokens_.Next(n, &k, &v);
    ASSERT_EQ(kvrt_prefill(rt_, seq_, 0, nullptr, k.data(), v.data(), n), KVRT_OK)
        << kvrt_last_error();
    // The prompt's build is a background job (0.3.28) and the armed faults are the process's:
    // a test arms them for the build (before this call) or for what follows (after it), never
    // for a build still running.
    ASSERT_EQ(kvrt_seq_wait(rt_, seq_), KVRT_OK) << kvrt_last_error();
  }
  void Append(int64_t n) {
    std::vector<float> k, v;
    tokens_.Next(n, &k, &v);
    ASSERT_EQ(kvrt_append(rt_, seq_, 0, k.data(), v.data(), n), KVRT_OK) << kvrt_last_error();
  }
  std::vector<float> Query() {
    std::vector<float> q(static_cast<std::size_t>(kQHeads) * kDim);
    for (auto& e : q) e = tokens_.dist(tokens_.rng);
    return q;
  }
  // An attend that must succeed and equal exact attention over every token stored.
  void ExpectExactAttend(const char* when) {
    const auto q = Query();
    std::vector<float> out(q.size(), 0.f);
    ASSERT_EQ(kvrt_attend(rt_, seq_, 0, q.data(), out.data()), KVRT_OK)
        << when << ": " << kvrt_last_error();
    EXPECT_LT(MaxAbsDiff(out, Reference(tokens_, q)), 1e-5) << when;
  }
  // Index searches one attend runs, counted as armed faults consumed: one per q head (group_search
  // 0) or per GQA group of every kv head that has an index. (The flat index holds no bytes of its
  // own, so stats.index_bytes cannot tell whether it was built.) The probe attend fails when any
  // search runs, which changes nothing (IndexSearchFailureIsInternalAndWritesNothing).
  int ProbeSearches() {
    constexpr int kMany = 1000;
    fault::FailNext(fault::Site::kIndexSearch, kMany);
    const auto q = Query();
    std::vector<float> out(q.size());
    const kvrt_status s = kvrt_attend(rt_, seq_, 0, q.data(), out.data());
    const int n = kMany - fault::Pending(fault::Site::kIndexSearch);
    fault::FailNext(fault::Site::kIndexSearch, 0);
    EXPECT_EQ(s, n > 0 ? KVRT_ERR_INTERNAL : KVRT_OK) << kvrt_last_error();
    return n;
  }
  int64_t Length() {
    int64_t n = -1;
    EXPECT_EQ(kvrt_seq_length(rt_, seq_, 0, &n), KVRT_OK);
    return n;
  }
  void TearDownRuntime() {
    EXPECT_EQ(kvrt_seq_release(rt_, seq_), KVRT_OK);
    const kvrt_stats st = Stats(rt_);
    EXPECT_EQ(st.sequences, 0);
    EXPECT_EQ(st.host_tokens, 0);
    EXPECT_EQ(st.gpu_tokens, 0);
    kvrt_runtime_destroy(rt_);
    rt_ = nullptr;
  }

  kvrt_runtime* rt_ = nullptr;
  kvrt_seq_id seq_{};
  Tokens tokens_;
};

// A failing index search fails the attend with KVRT_ERR_INTERNAL, names the search, writes
// nothing to out and counts no attend; the next attend works. Per q head (flat) and GQA group
// search (landmark: a kind whose group search shares work; top_k >= cold tokens makes it exact).
TEST_F(FaultInjection, IndexSearchFailureIsInternalAndWritesNothing) {
  for (int group_search : {0, 1}) {
    SCOPED_TRACE(group_search ? "group search" : "search per q head");
    tokens_ = Tokens{};
    kvrt_config c = FlatConfig(1024, group_search);
    if (group_search) c.index_kind = KVRT_INDEX_LANDMARK;
    const char* kind = group_search ? "landmark" : "flat";
    Start(c);
    Prefill(300);
    ASSERT_EQ(ProbeSearches(), group_search ? kKvHeads : kQHeads)
        << "the prompt built the " << kind << " index";
    const kvrt_stats before = Stats(rt_);

    fault::FailNext(fault::Site::kIndexSearch, 1);
    const auto q = Query();
    std::vector<float> out(q.size(), 42.f);
    EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q.data(), out.data()), KVRT_ERR_INTERNAL);
    EXPECT_TRUE(Mentions("attend: cold-index search of kv head")) << kvrt_last_error();
    EXPECT_TRUE(Mentions((std::string(kind) + " search: injected fault").c_str()))
        << kvrt_last_error();
    EXPECT_EQ(fault::Pending(fault::Site::kIndexSearch), 0) << "exactly one search consumed it";
    for (float x : out) ASSERT_EQ(x, 42.f) << "a failed attend must not write out";
    const kvrt_stats after = Stats(rt_);
    EXPECT_EQ(after.attend_calls, before.attend_calls) << "a failed attend is not counted";
    EXPECT_EQ(after.cold_tokens_attended, before.cold_tokens_attended);
    EXPECT_EQ(Length(), 300);

    // The sequence and runtime stay usable: attend, append, attend again, all exact.
    ExpectExactAttend("attend after the failed one");
    Append(3);
    ExpectExactAttend("attend after an append");
    TearDownRuntime();
  }
}

// An index that throws (rather than returning a status) during a search: the exception is
// caught at the API boundary as KVRT_ERR_INTERNAL with its message, nothing is written.
TEST_F(FaultInjection, IndexSearchExceptionIsInternal) {
  Start(FlatConfig());
  Prefill(300);
  fault::FailNext(fault::Site::kIndexSearch, 1, fault::Mode::kThrow);
  const auto q = Query();
  std::vector<float> out(q.size(), 42.f);
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q.data(), out.data()), KVRT_ERR_INTERNAL);
  EXPECT_TRUE(Mentions("internal error")) << kvrt_last_error();
  EXPECT_TRUE(Mentions("flat search: injected fault")) << kvrt_last_error();
  for (float x : out) ASSERT_EQ(x, 42.f) << "a failed attend must not write out";
  ExpectExactAttend("attend after the exception");
  Append(1);
  ExpectExactAttend("attend after an append");
  TearDownRuntime();
}

// An allocation inside an index that fails (std::bad_alloc from a search, a build or an insert):
// the search's attend fails with OUT_OF_MEMORY and writes nothing; the update is a failed update
// like the others (counted, the rows scanned exactly, retried); the runtime stays usable.
TEST_F(FaultInjection, IndexOutOfMemoryIsOutOfMemoryOrAFailedUpdate) {
  Start(FlatConfig());
  fault::FailNext(fault::Site::kIndexUpdate, kKvHeads, fault::Mode::kBadAlloc);
  Prefill(300);
  EXPECT_EQ(fault::Pending(fault::Site::kIndexUpdate), 0);
  EXPECT_EQ(Length(), 300);
  EXPECT_EQ(Stats(rt_).index_update_failures, kKvHeads);
  EXPECT_EQ(ProbeSearches(), 0) << "no index was built";
  ExpectExactAttend("builds out of memory");
  Append(2);  // the builds catch up
  EXPECT_EQ(ProbeSearches(), kQHeads);

  fault::FailNext(fault::Site::kIndexSearch, 1, fault::Mode::kBadAlloc);
  const auto q = Query();
  std::vector<float> out(q.size(), 42.f);
  EXPECT_EQ(kvrt_attend(rt_, seq_, 0, q.data(), out.data()), KVRT_ERR_OUT_OF_MEMORY);
  EXPECT_TRUE(Mentions("attend: cold-index search of kv head")) << kvrt_last_error();
  EXPECT_TRUE(Mentions("flat search: out of memory")) << kvrt_last_error();
  for (float x : out) ASSERT_EQ(x, 42.f) << "a failed attend must not write out";
  ExpectExactAttend("attend after the search out of memory");
  Append(1);
  ExpectExactAttend("attend after an append");
  TearDownRuntime();
}

// Failed index builds and inserts in prefill/append: the call still succeeds with every token
// stored (not half-applied), stats.index_update_failures counts each failed kv head, attends stay
// exact (unindexed rows are scanned), and the update is retried at the next call.
TEST_F(FaultInjection, IndexUpdateFailureDoesNotHalfApply) {
  Start(FlatConfig());

  // Both kv heads' builds fail at prefill: no index, all 290 cold rows scanned exactly.
  fault::FailNext(fault::Site::kIndexUpdate, kKvHeads);
  Prefill(300);  // waits for the build, which takes the armed failures
  EXPECT_EQ(fault::Pending(fault::Site::kIndexUpdate), 0);
  EXPECT_EQ(Length(), 300);
  kvrt_stats st = Stats(rt_);
  EXPECT_EQ(st.index_update_failures, kKvHeads);
  EXPECT_EQ(st.host_tokens, 300 - 2 - 8) << "every cold token stored";
  EXPECT_EQ(ProbeSearches(), 0) << "no index was built";
  ExpectExactAttend("no index");

  // The next append retries the builds; one of the two fails again (a half-indexed layer).
  fault::FailNext(fault::Site::kIndexUpdate, 1);
  Append(5);
  EXPECT_EQ(Length(), 305);
  st = Stats(rt_);
  EXPECT_EQ(st.index_update_failures, kKvHeads + 1);
  EXPECT_EQ(ProbeSearches(), kQHeads / kKvHeads) << "the other kv head's index was built";
  ExpectExactAttend("one kv head indexed");

  // An index that throws from an insert: caught, counted, the append still succeeds.
  fault::FailNext(fault::Site::kIndexUpdate, kKvHeads, fault::Mode::kThrow);
  Append(4);
  EXPECT_EQ(Length(), 309);
  EXPECT_EQ(Stats(rt_).index_update_failures, kKvHeads + 1 + kKvHeads);
  ExpectExactAttend("after a throwing insert");

  // Nothing armed: the build and inserts catch up, no new failure, still exact.
  Append(2);
  st = Stats(rt_);
  EXPECT_EQ(st.index_update_failures, kKvHeads + 1 + kKvHeads);
  EXPECT_EQ(st.host_tokens, 311 - 2 - 8);
  EXPECT_EQ(ProbeSearches(), kQHeads) << "both kv heads indexed";
  ExpectExactAttend("caught up");
  TearDownRuntime();
}

// With top_k below the cold count the attend is a top-k selection; a lagging index (failed
// inserts) must give the same top-k as an index that never failed: the rows it misses compete
// for the top-k by exact score (FinishCold).
TEST_F(FaultInjection, IndexUpdateFailureKeepsTopKSelection) {
  const kvrt_config c = FlatConfig(/*top_k=*/16);
  kvrt_runtime* twin = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &twin), KVRT_OK);
  kvrt_seq_id twin_seq{};
  ASSERT_EQ(kvrt_seq_create(twin, &twin_seq), KVRT_OK);
  Start(c);
  std::vector<float> k, v;
  tokens_.Next(300, &k, &v);
  ASSERT_EQ(kvrt_prefill(rt_, seq_, 0, nullptr, k.data(), v.data(), 300), KVRT_OK);
  ASSERT_EQ(kvrt_prefill(twin, twin_seq, 0, nullptr, k.data(), v.data(), 300), KVRT_OK);
  // Both prompts' builds run in the background (0.3.28) and the armed faults are the process's:
  // a build still running would take them.
  ASSERT_EQ(kvrt_seq_wait(rt_, seq_), KVRT_OK);
  ASSERT_EQ(kvrt_seq_wait(twin, twin_seq), KVRT_OK);
  for (int step = 0; step < 6; ++step) {
    // Every insert of the faulty runtime fails for the first 40 appended tokens, then catches up.
    fault::FailNext(fault::Site::kIndexUpdate, step < 4 ? kKvHeads : 0);
    tokens_.Next(10, &k, &v);
    ASSERT_EQ(kvrt_append(rt_, seq_, 0, k.data(), v.data(), 10), KVRT_OK) << kvrt_last_error();
    fault::FailNext(fault::Site::kIndexUpdate, 0);
    ASSERT_EQ(kvrt_append(twin, twin_seq, 0, k.data(), v.data(), 10), KVRT_OK);
    const auto q = Query();
    std::vector<float> out(q.size()), want(q.size());
    ASSERT_EQ(kvrt_attend(rt_, seq_, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_attend(twin, twin_seq, 0, q.data(), want.data()), KVRT_OK);
    EXPECT_LT(MaxAbsDiff(out, want), 1e-5) << "step " << step;
  }
  EXPECT_EQ(Stats(rt_).index_update_failures, 4 * kKvHeads);
  EXPECT_EQ(Stats(twin).index_update_failures, 0);
  EXPECT_EQ(kvrt_seq_release(twin, twin_seq), KVRT_OK);
  kvrt_runtime_destroy(twin);
  TearDownRuntime();
}

// Off by default: nothing armed, no failure counted (the hook costs one atomic load).
TEST(FaultInjectionOff, NothingArmedByDefault) {
  EXPECT_EQ(fault::Pending(fault::Site::kIndexUpdate), 0);
  EXPECT_EQ(fault::Pending(fault::Site::kIndexSearch), 0);
  EXPECT_TRUE(fault::Check(fault::Site::kIndexSearch, "flat", "search").ok());
}

}  // namespace
