// The API's contract where an integrator first found it broken (each case failed before its fix),
// per defect.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt.h"
#include "tests/support/tiny_config.h"

namespace {

// The size of an older kvrt_config that ended with the int32 field at `offset` (tail padding
// included): what a caller compiled against that header passes as struct_size.
constexpr std::size_t ConfigSizeEndingAt(std::size_t offset) {
  return (offset + sizeof(int32_t) + alignof(kvrt_config) - 1) / alignof(kvrt_config) *
         alignof(kvrt_config);
}

// A runtime made from c, the config it reports in effect in *eff, and the runtime gone again.
::testing::AssertionResult EffectiveConfig(const kvrt_config& c, kvrt_config* eff) {
  kvrt_runtime* rt = nullptr;
  if (kvrt_runtime_create(&c, &rt) != KVRT_OK)
    return ::testing::AssertionFailure() << "kvrt_runtime_create: " << kvrt_last_error();
  *eff = kvrt_config_default();
  const kvrt_status st = kvrt_runtime_config(rt, eff);
  kvrt_runtime_destroy(rt);
  if (st != KVRT_OK)
    return ::testing::AssertionFailure() << "kvrt_runtime_config: " << kvrt_last_error();
  return ::testing::AssertionSuccess();
}

bool Mentions(const char* what) {
  return std::string(kvrt_last_error()).find(what) != std::string::npos;
}

// kvrt_runtime_create refuses c with KVRT_ERR_INVALID_ARGUMENT, kvrt_last_error() names `field`,
// and the handle stays null.
::testing::AssertionResult RefusedNaming(const kvrt_config& c, const char* field) {
  kvrt_runtime* rt = nullptr;
  const kvrt_status st = kvrt_runtime_create(&c, &rt);
  if (st != KVRT_ERR_INVALID_ARGUMENT) {
    if (rt != nullptr) kvrt_runtime_destroy(rt);
    return ::testing::AssertionFailure() << "kvrt_runtime_create: status " << st;
  }
  if (!Mentions(field))
    return ::testing::AssertionFailure()
           << "the error does not name " << field << ": " << kvrt_last_error();
  if (rt != nullptr) return ::testing::AssertionFailure() << "a refused create set the handle";
  return ::testing::AssertionSuccess();
}

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

// ---- defect 3: NaN propagates with check_finite = 0, in every tier and with every index kind ---

constexpr int kD = 8;
constexpr int kTokens = 400;  // sinks 2 + window 4 + 394 cold: enough for every kind to build

struct NanCase {
  kvrt_index_kind kind;
  const char* name;
};

// Every index kind, as test parameters named by the kind; the NaN and host-limit contracts are
// instantiated for the first six (they predate the cluster kind).
const NanCase kKinds[] = {
    {KVRT_INDEX_EXACT, "exact"},       {KVRT_INDEX_FLAT, "flat"},
    {KVRT_INDEX_IVF, "ivf"},           {KVRT_INDEX_HNSW, "hnsw"},
    {KVRT_INDEX_LANDMARK, "landmark"}, {KVRT_INDEX_ATTENTION_AWARE, "attention_aware"},
    {KVRT_INDEX_CLUSTER, "cluster"}};
std::string KindName(const ::testing::TestParamInfo<NanCase>& p) { return p.param.name; }

class NanPropagation : public ::testing::TestWithParam<NanCase> {
 protected:
  // Two kv heads, two q heads each: a NaN in kv head 0 must turn q heads 0 and 1 into NaN and
  // leave heads 2 and 3 finite.
  kvrt_config Config(int sinks) const {
    kvrt_config c = TinyConfig(1, 4);
    c.num_kv_heads = 2;
    c.head_dim = kD;
    c.sink_tokens = sinks;
    c.window_tokens = 4;
    c.top_k = 8;
    c.index_kind = GetParam().kind;
    c.check_finite = 0;
    c.worker_threads = 2;
    return c;
  }
  // Prefills kTokens tokens (a NaN put by `poison` into k or v) and attends with q (head 0 of q
  // poisoned by the caller if wanted). Returns the output [4, kD].
  std::vector<float> Run(int sinks, int64_t tokens,
                         void (*poison)(std::vector<float>*, std::vector<float>*), bool nan_q) {
    kvrt_config c = Config(sinks);
    kvrt_runtime* rt = nullptr;
    EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    kvrt_seq_id s = 0;
    EXPECT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    auto k = Wave(static_cast<std::size_t>(tokens) * 2 * kD, 0.37f, 0.1f);
    auto v = Wave(static_cast<std::size_t>(tokens) * 2 * kD, 0.11f, 0.7f);
    if (poison) poison(&k, &v);
    auto q = Wave(4 * kD, 0.23f, 0.3f);
    if (nan_q) q[3] = NAN;  // one element of q head 0
    EXPECT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), tokens), KVRT_OK)
        << kvrt_last_error();
    std::vector<float> out(4 * kD, 7.f);
    EXPECT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
    kvrt_runtime_destroy(rt);
    return out;
  }
  // Heads 0 and 1 (kv head 0) NaN, heads 2 and 3 finite.
  static void ExpectKvHead0Nan(const std::vector<float>& out) {
    EXPECT_TRUE(AllNan(out.data(), 2 * kD)) << "q heads of kv head 0 must be NaN";
    EXPECT_TRUE(AllFinite(out.data() + 2 * kD, 2 * kD)) << "the other kv head's q heads are finite";
  }
  // A NaN in element 5 of a value row: element 5 of heads 0 and 1 is NaN (the others are sums
  // over finite values), heads 2 and 3 finite.
  static void ExpectValueElementNan(const std::vector<float>& out) {
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < kD; ++e)
        EXPECT_EQ(std::isnan(out[h * kD + e]), e == 5) << "head " << h << " element " << e;
    EXPECT_TRUE(AllFinite(out.data() + 2 * kD, 2 * kD));
  }
};

// Element e of token t, kv head 0, in a [tokens, 2, kD] tensor.
std::size_t At(int64_t t, int e = 5) { return static_cast<std::size_t>(t) * 2 * kD + e; }

TEST_P(NanPropagation, NanInQGivesNanInThatHeadOnly) {
  const auto out = Run(2, kTokens, nullptr, true);
  EXPECT_TRUE(AllNan(out.data(), kD)) << "q head 0 held a NaN: its output is NaN, not zeros";
  EXPECT_TRUE(AllFinite(out.data() + kD, 3 * kD));
}

TEST_P(NanPropagation, NanInQWithFewTokens) {  // the case: 20 tokens, no cold index
  const auto out = Run(2, 20, nullptr, true);
  EXPECT_TRUE(AllNan(out.data(), kD));
  EXPECT_TRUE(AllFinite(out.data() + kD, 3 * kD));
}

TEST_P(NanPropagation, NanInTheOnlySinkKey) {
  ExpectKvHead0Nan(Run(
      1, kTokens, [](std::vector<float>* k, std::vector<float>*) { (*k)[At(0)] = NAN; }, false));
}

TEST_P(NanPropagation, NanInASinkValue) {
  ExpectValueElementNan(Run(
      2, kTokens, [](std::vector<float>*, std::vector<float>* v) { (*v)[At(1)] = NAN; }, false));
}

TEST_P(NanPropagation, NanInAWindowKey) {
  ExpectKvHead0Nan(Run(
      2, kTokens, [](std::vector<float>* k, std::vector<float>*) { (*k)[At(kTokens - 2)] = NAN; },
      false));
}

TEST_P(NanPropagation, NanInAColdKey) {
  // Token 100 is cold; a key that scores NaN must not be dropped by the search.
  ExpectKvHead0Nan(Run(
      2, kTokens, [](std::vector<float>* k, std::vector<float>*) { (*k)[At(100)] = NAN; }, false));
}

TEST_P(NanPropagation, NanInAColdValue) {
  // Its key is ordinary, so no search would pick it for its score: it is attended because its row
  // holds a NaN.
  ExpectValueElementNan(Run(
      2, kTokens, [](std::vector<float>*, std::vector<float>* v) { (*v)[At(200)] = NAN; }, false));
}

TEST_P(NanPropagation, NanArrivingByAppendInBf16) {
  kvrt_config c = Config(2);
  c.dtype = KVRT_DTYPE_BF16;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_seq_id s = 0;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<uint16_t> r(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      uint32_t w;
      std::memcpy(&w, &x[i], 4);
      r[i] = static_cast<uint16_t>(w >> 16);
    }
    return r;
  };
  auto k = Wave(static_cast<std::size_t>(kTokens) * 2 * kD, 0.37f, 0.1f);
  auto v = Wave(static_cast<std::size_t>(kTokens) * 2 * kD, 0.11f, 0.7f);
  v[At(3)] = NAN;  // token 3 goes cold through the window when the later tokens are appended
  const auto kb = to_bf16(k), vb = to_bf16(v);
  for (int64_t t = 0; t < kTokens; t += 50)
    ASSERT_EQ(kvrt_append(rt, s, 0, kb.data() + At(t, 0), vb.data() + At(t, 0), 50), KVRT_OK);
  const auto q = to_bf16(Wave(4 * kD, 0.23f, 0.3f));
  std::vector<float> out(4 * kD, 7.f);
  ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
  ExpectValueElementNan(out);
  kvrt_runtime_destroy(rt);
}

INSTANTIATE_TEST_SUITE_P(EveryIndexKind, NanPropagation, ::testing::ValuesIn(kKinds, kKinds + 6),
                         KindName);

// ---- defect 4: attend_batch has one rule for every per-sequence error --------------------------

// A batch's three sequences over one layer (TinyConfig(1, 2): 2 q heads, 1 kv head, d = 4;
// sinks 1, window 4): a holds the 30 tokens of k, v, b their first 20, empty none.
struct BatchOfThree {
  kvrt_runtime* rt = nullptr;
  kvrt_seq_id a = 0, b = 0, empty = 0;
  std::vector<float> k = Wave(30 * 4, 0.3f, 0.f), v = Wave(30 * 4, 0.7f, 1.f);
  ~BatchOfThree() { kvrt_runtime_destroy(rt); }
};

::testing::AssertionResult MakeBatchOfThree(kvrt_index_kind kind, BatchOfThree* t) {
  kvrt_config c = TinyConfig(1, 2);
  c.sink_tokens = 1;
  c.window_tokens = 4;
  c.index_kind = kind;
  if (kvrt_runtime_create(&c, &t->rt) != KVRT_OK || kvrt_seq_create(t->rt, &t->a) != KVRT_OK ||
      kvrt_seq_create(t->rt, &t->b) != KVRT_OK || kvrt_seq_create(t->rt, &t->empty) != KVRT_OK ||
      kvrt_prefill(t->rt, t->a, 0, nullptr, t->k.data(), t->v.data(), 30) != KVRT_OK ||
      kvrt_prefill(t->rt, t->b, 0, nullptr, t->k.data(), t->v.data(), 20) != KVRT_OK)
    return ::testing::AssertionFailure() << kvrt_last_error();
  return ::testing::AssertionSuccess();
}

TEST(ContractAttendBatch, UnknownIdFailsItsRowOnlyAndTheOthersAreWritten) {
  BatchOfThree t;
  ASSERT_TRUE(MakeBatchOfThree(KVRT_INDEX_FLAT, &t));
  kvrt_runtime* rt = t.rt;
  const kvrt_seq_id a = t.a, b = t.b, empty = t.empty;
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
    EXPECT_TRUE(Mentions(std::to_string(bad).c_str()))
        << "the message names the sequence: " << kvrt_last_error();
    for (int i = 0; i < row; ++i) {
      EXPECT_EQ(out[i], want[i]) << "row of a written";
      EXPECT_EQ(out[row + i], 7.f) << "failed row untouched";
      EXPECT_EQ(out[2 * row + i], want[2 * row + i]) << "row of b written";
    }
  }
}

// A NaN in a batch's q names its batch row (0.3.36 said "token 1": the batch has no tokens).
TEST(ContractAttendBatch, ANonFiniteQNamesItsBatchRow) {
  BatchOfThree t;
  ASSERT_TRUE(MakeBatchOfThree(KVRT_INDEX_FLAT, &t));
  auto q = Wave(2 * 2 * 4, 0.5f, 0.2f);
  q[2 * 4 + 5] = NAN;  // row 1, head 1, element 1
  const kvrt_seq_id seqs[2] = {t.a, t.b};
  std::vector<float> out(q.size());
  EXPECT_EQ(kvrt_attend_batch(t.rt, seqs, 2, 0, q.data(), out.data()), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(
      Mentions("attend_batch: q holds a non-finite value at batch row 1, head 1, "
               "element 1"))
      << kvrt_last_error();
}

// ---- 0.3.23: the merged lse, for callers that merge kvrt's output with states of their own ------

// log sum_i exp(scale * q . k_i) over n keys k [n, d] (one kv head), in double.
double ExactLse(const float* q, const std::vector<float>& k, int n, int d) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> s(n);
  double m = -INFINITY, sum = 0;
  for (int i = 0; i < n; ++i) {
    double dot = 0;
    for (int j = 0; j < d; ++j) dot += static_cast<double>(q[j]) * k[i * d + j];
    m = std::max(m, s[i] = scale * dot);
  }
  for (double x : s) sum += std::exp(x - m);
  return m + std::log(sum);
}

TEST(ContractAttendBatchLse, EqualsTheExactLseAndFollowsOutsRowRules) {
  BatchOfThree t;
  ASSERT_TRUE(MakeBatchOfThree(KVRT_INDEX_EXACT, &t));
  kvrt_runtime* rt = t.rt;
  const kvrt_seq_id a = t.a, b = t.b, empty = t.empty;
  const std::vector<float>& k = t.k;
  const int row = 2 * 4;
  const auto q = Wave(3 * row, 0.5f, 0.2f);
  const kvrt_seq_id good[2] = {a, b};
  std::vector<float> want(2 * row), out(2 * row), lse(2 * 2, NAN);
  ASSERT_EQ(kvrt_attend_batch(rt, good, 2, 0, q.data(), want.data()), KVRT_OK);
  ASSERT_EQ(kvrt_attend_batch_lse_ex(rt, good, 2, 0, q.data(), out.data(), lse.data(), nullptr),
            KVRT_OK)
      << kvrt_last_error();
  EXPECT_EQ(out, want) << "out is kvrt_attend_batch's";
  for (int h = 0; h < 2; ++h) {
    EXPECT_NEAR(lse[h], ExactLse(q.data() + h * 4, k, 30, 4), 1e-5) << "a, head " << h;
    EXPECT_NEAR(lse[2 + h], ExactLse(q.data() + row + h * 4, k, 20, 4), 1e-5) << "b, head " << h;
  }
  // A failed member's lse row stays untouched, as its out row does.
  const kvrt_seq_id seqs[3] = {a, empty, b};
  std::vector<float> lse3(3 * 2, 7.f), out3(3 * row);
  EXPECT_EQ(kvrt_attend_batch_lse_ex(rt, seqs, 3, 0, q.data(), out3.data(), lse3.data(), nullptr),
            KVRT_ERR_FAILED_PRECONDITION);
  EXPECT_EQ(lse3[0], lse[0]);
  EXPECT_EQ(lse3[2], 7.f);
  EXPECT_EQ(lse3[3], 7.f);
  EXPECT_NEAR(lse3[4], ExactLse(q.data() + 2 * row, k, 20, 4), 1e-5);
  // Bad arguments are named.
  EXPECT_EQ(kvrt_attend_batch_lse_ex(rt, good, 2, 0, q.data(), out.data(), nullptr, nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("lse")) << kvrt_last_error();
  EXPECT_EQ(
      kvrt_attend_batch_lse_ex(nullptr, good, 2, 0, q.data(), out.data(), lse.data(), nullptr),
      KVRT_ERR_INVALID_ARGUMENT);
  // Any overlap with out is refused (an lse inside out's rows overwrote part of them).
  EXPECT_EQ(kvrt_attend_batch_lse_ex(rt, good, 2, 0, q.data(), out.data(), out.data() + 5, nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("overlaps")) << kvrt_last_error();
  // A streaming head weighs the GPU tier alone: its lse is over the sink and the window (token 0
  // and tokens 26-29 of a's 30), the other head's still over all 30.
  ASSERT_EQ(kvrt_set_head_policy(rt, 0, 1, KVRT_HEAD_STREAMING), KVRT_OK);
  std::vector<float> gpu_tier(k.begin(), k.begin() + 4);
  gpu_tier.insert(gpu_tier.end(), k.begin() + 26 * 4, k.begin() + 30 * 4);
  float lse1[2];
  ASSERT_EQ(kvrt_attend_batch_lse_ex(rt, &a, 1, 0, q.data(), out.data(), lse1, nullptr), KVRT_OK);
  EXPECT_NEAR(lse1[0], ExactLse(q.data(), k, 30, 4), 1e-5);
  EXPECT_NEAR(lse1[1], ExactLse(q.data() + 4, gpu_tier, 5, 4), 1e-5);
}

// ---- defect 5: worker_threads above the hardware count is clamped, whatever its size -----------

TEST(ContractConfig, WorkerThreadsAboveTheHardwareAreClamped) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int32_t asked : {hw + 1, 4097, 100000, INT32_MAX}) {
    kvrt_config c = TinyConfig();
    c.worker_threads = asked;
    kvrt_config eff;
    ASSERT_TRUE(EffectiveConfig(c, &eff)) << asked;
    EXPECT_EQ(eff.worker_threads, hw);
  }
  kvrt_config c = TinyConfig();
  c.worker_threads = -1;
  kvrt_runtime* rt = nullptr;
  EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_ERR_INVALID_ARGUMENT);
}

// ---- defect 2: host_memory_limit covers the cold index's growth before it happens --------------

kvrt_config BudgetConfig(kvrt_index_kind kind, int64_t limit) {
  kvrt_config c = TinyConfig(1, 2);
  c.num_kv_heads = 2;
  c.head_dim = 64;  // k + v of a token: 2 * 2 * 64 * 4 = 1024 bytes
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.index_kind = kind;
  c.top_k = 16;
  c.host_memory_limit = limit;
  c.worker_threads = 2;
  return c;
}

TEST(ContractHostLimit, PrefillPastTheLimitWithItsIndexFailsAndChangesNothing) {
  // The case: 300 tokens, 280 go cold: 286720 bytes of store, and HNSW's ~280 KB more.
  kvrt_config c = BudgetConfig(KVRT_INDEX_HNSW, 409600);
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const auto k = Wave(300 * 128, 0.37f, 0.f), v = Wave(300 * 128, 0.11f, 1.f);
  EXPECT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 300), KVRT_ERR_OUT_OF_MEMORY);
  EXPECT_TRUE(Mentions("host_memory_limit")) << kvrt_last_error();
  int64_t n = -1;
  ASSERT_EQ(kvrt_seq_length(rt, s, 0, &n), KVRT_OK);
  EXPECT_EQ(n, 0);
  kvrt_stats st = {};
  st.struct_size = sizeof st;
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_EQ(st.host_bytes, 0);
  EXPECT_EQ(st.index_bytes, 0);
  EXPECT_EQ(st.gpu_allocated_bytes, 0);
  // The same prompt without an index fits; kvrt_seq_wait (below 256 cold rows no build runs in
  // the background) returns at once, and names an unknown sequence.
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 200), KVRT_OK);
  EXPECT_EQ(kvrt_seq_wait(rt, s), KVRT_OK);
  EXPECT_EQ(kvrt_seq_wait(rt, s + 1000), KVRT_ERR_NOT_FOUND);
  EXPECT_EQ(kvrt_seq_wait(nullptr, s), KVRT_ERR_INVALID_ARGUMENT);
  // An append that makes the index appear (256 cold rows) is refused the same way.
  EXPECT_EQ(kvrt_append(rt, s, 0, k.data(), v.data(), 100), KVRT_ERR_OUT_OF_MEMORY);
  ASSERT_EQ(kvrt_seq_length(rt, s, 0, &n), KVRT_OK);
  EXPECT_EQ(n, 200);
  kvrt_runtime_destroy(rt);
}

class HostLimitEveryKind : public ::testing::TestWithParam<NanCase> {};

TEST_P(HostLimitEveryKind, StoreAndIndexesNeverPassTheLimit) {
  const int64_t limit = 900 * 1024;
  kvrt_config c = BudgetConfig(GetParam().kind, limit);
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const auto k = Wave(100 * 128, 0.37f, 0.f), v = Wave(100 * 128, 0.11f, 1.f);
  int64_t held = 0;
  bool refused = false;
  for (int step = 0; step < 20 && !refused; ++step) {
    const kvrt_status r = step == 0 ? kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 100)
                                    : kvrt_append(rt, s, 0, k.data(), v.data(), 100);
    ASSERT_TRUE(r == KVRT_OK || r == KVRT_ERR_OUT_OF_MEMORY) << kvrt_last_error();
    refused = r != KVRT_OK;
    if (!refused) held += 100;
    kvrt_stats st = {};
    st.struct_size = sizeof st;
    ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
    EXPECT_LE(st.host_bytes + st.index_bytes, limit) << "after " << held << " tokens";
    int64_t n = -1;
    ASSERT_EQ(kvrt_seq_length(rt, s, 0, &n), KVRT_OK);
    EXPECT_EQ(n, held);
  }
  EXPECT_TRUE(refused) << "2000 tokens (about 2 MB of store) do not fit in 900 KB";
  std::vector<float> q(2 * 64, 0.1f), out(2 * 64);
  EXPECT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << "still usable";
  kvrt_runtime_destroy(rt);
}

INSTANTIATE_TEST_SUITE_P(EveryIndexKind, HostLimitEveryKind,
                         ::testing::ValuesIn(kKinds, kKinds + 6), KindName);

// The cluster kind keeps the prompt's last queries (up to 256 rows of f32) for its calibration,
// which its growth bound left out: at head_dim 256 and the smallest limit that admits a prompt,
// the store and index passed it by ~90 KB (0.3.36).
TEST(ContractHostLimit, TheClusterKindsCalibrationQueriesAreInItsBound) {
  constexpr int kDim = 256, kHeads = 8, kPrompt = 300;
  const auto q = Wave(static_cast<std::size_t>(kPrompt) * kHeads * kDim, 0.013f, 0.3f);
  const auto k = Wave(static_cast<std::size_t>(kPrompt) * kDim, 0.37f, 0.f);
  auto prefill_under = [&](int64_t limit, kvrt_stats* st) {
    kvrt_config c = TinyConfig(1, kHeads);
    c.head_dim = kDim;
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.sink_tokens = 4;
    c.window_tokens = 16;
    c.host_memory_limit = limit;
    kvrt_runtime* rt = nullptr;
    kvrt_seq_id s = 0;
    EXPECT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    EXPECT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    const bool ok = kvrt_prefill(rt, s, 0, q.data(), k.data(), k.data(), kPrompt) == KVRT_OK;
    if (ok) {
      EXPECT_EQ(kvrt_seq_wait(rt, s), KVRT_OK);
      st->struct_size = sizeof *st;
      EXPECT_EQ(kvrt_get_stats(rt, st), KVRT_OK);
    }
    kvrt_runtime_destroy(rt);
    return ok;
  };
  kvrt_stats st{};
  int64_t lo = 1, hi = int64_t{64} << 20;  // refused at lo, admitted at hi
  ASSERT_TRUE(prefill_under(hi, &st));
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (prefill_under(mid, &st) ? hi : lo) = mid;
  }
  ASSERT_TRUE(prefill_under(hi, &st));
  EXPECT_GT(st.index_bytes, 0);
  EXPECT_LE(st.host_bytes + st.index_bytes, hi) << "the smallest limit admitting the prompt";
}

// 0.3.3 appended cluster_direct_step: a caller compiled against 0.3.1 / 0.3.2 passes the size
// that ended at cuda_device, and gets the new field's default whatever lies past its struct.
TEST(ContractConfig, A031CallerGetsTheDefaultDirectStep) {
  const std::size_t config031 = ConfigSizeEndingAt(offsetof(kvrt_config, cuda_device));
  kvrt_config c = TinyConfig();
  c.struct_size = config031;
  c.cluster_direct_step = 7;  // past the 0.3.1 struct: not read
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.cluster_direct_step, kvrt_config_default().cluster_direct_step);
  kvrt_runtime_destroy(rt);
}

// 0.3.4 appended worker_cpu_first / worker_cpu_count: a caller compiled against 0.3.3 passes the
// size that ended at cluster_direct_step (worker_cpu_first lies in its tail padding, which such a
// caller never set); whatever lies there and past its struct, its runtime is not bound, and
// kvrt_runtime_config writes only its prefix.
TEST(ContractConfig, A033CallerGetsNoCpuBinding) {
  const std::size_t config033 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_direct_step));
  ASSERT_GT(config033, offsetof(kvrt_config, worker_cpu_first)) << "the field sits in padding";
  ASSERT_LE(config033, offsetof(kvrt_config, worker_cpu_count));
  kvrt_config c = TinyConfig();
  c.struct_size = config033;
  c.worker_cpu_first = -5;  // the 0.3.3 struct's padding: not read (it would be refused)
  c.worker_cpu_count = 7;   // past the 0.3.3 struct
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.worker_cpu_first, 0);
  EXPECT_EQ(eff.worker_cpu_count, 0);
  kvrt_config old;
  std::memset(&old, 0xab, sizeof old);
  old.struct_size = config033;
  ASSERT_EQ(kvrt_runtime_config(rt, &old), KVRT_OK);
  EXPECT_EQ(old.num_layers, 1);
  int32_t untouched;
  std::memset(&untouched, 0xab, sizeof untouched);
  EXPECT_EQ(old.worker_cpu_count, untouched);
  kvrt_runtime_destroy(rt);
  EXPECT_EQ(kvrt_config_init(&old, config033), KVRT_OK);
  EXPECT_EQ(old.struct_size, config033);
}

// 0.3.5 appended cluster_group_select / cluster_top_p: a caller compiled against 0.3.4 passes the
// size that ended at worker_cpu_count (cluster_group_select lies in its tail padding); whatever
// lies there and past its struct, it gets the new fields' defaults, and kvrt_runtime_config writes
// only its prefix.
TEST(ContractConfig, A034CallerGetsTheDefaultGroupSelection) {
  const std::size_t config034 = ConfigSizeEndingAt(offsetof(kvrt_config, worker_cpu_count));
  ASSERT_GT(config034, offsetof(kvrt_config, cluster_group_select)) << "the field sits in padding";
  ASSERT_LE(config034, offsetof(kvrt_config, cluster_top_p));
  kvrt_config c = TinyConfig();
  c.struct_size = config034;
  c.cluster_group_select = 0;  // the 0.3.4 struct's padding: not read
  c.cluster_top_p = 7.f;       // past the 0.3.4 struct (it would be refused)
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.cluster_group_select, kvrt_config_default().cluster_group_select);
  EXPECT_EQ(eff.cluster_top_p, kvrt_config_default().cluster_top_p);
  kvrt_config old;
  std::memset(&old, 0xab, sizeof old);
  old.struct_size = config034;
  ASSERT_EQ(kvrt_runtime_config(rt, &old), KVRT_OK);
  float untouched;
  std::memset(&untouched, 0xab, sizeof untouched);
  EXPECT_EQ(std::memcmp(&old.cluster_top_p, &untouched, sizeof untouched), 0);
  kvrt_runtime_destroy(rt);
}

// Every 0/1 switch refuses other values (0.3.22 took 7 or -1 for 1 in the cluster switches).
TEST(ContractConfig, SwitchesAreZeroOrOne) {
  for (int32_t bad : {-1, 2, 7}) {
    kvrt_config c = TinyConfig();
    c.cluster_group_select = bad;
    EXPECT_TRUE(RefusedNaming(c, "cluster_group_select")) << bad;
    c = TinyConfig();
    c.cluster_direct_step = bad;
    EXPECT_TRUE(RefusedNaming(c, "cluster_direct_step")) << bad;
    c = TinyConfig();
    c.record_attended = bad;
    EXPECT_TRUE(RefusedNaming(c, "record_attended")) << bad;
  }
}

TEST(ContractConfig, ClusterTopPOutOfRangeIsRefused) {
  kvrt_config c = TinyConfig();
  c.index_kind = KVRT_INDEX_CLUSTER;
  c.cluster_top_p = 1.5f;
  EXPECT_TRUE(RefusedNaming(c, "cluster_top_p"));
}

// 0.3.9 appended cluster_miss_penalty (and reserved0, which keeps the size apart; cluster_keys
// since 0.3.10): a caller
// compiled against 0.3.5-0.3.8 passes the size that ended at cluster_top_p (the penalty lies in
// its tail padding); whatever lies there and past its struct, it gets the penalty's default, and
// kvrt_runtime_config writes only its prefix.
TEST(ContractConfig, A035CallerGetsTheDefaultMissPenalty) {
  const std::size_t config035 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_top_p));
  ASSERT_GT(config035, offsetof(kvrt_config, cluster_miss_penalty)) << "the field sits in padding";
  ASSERT_LT(config035, sizeof(kvrt_config)) << "the sizes must differ";
  kvrt_config c = TinyConfig();
  c.struct_size = config035;
  c.cluster_top_p = 0.25f;       // inside the 0.3.5 struct: read
  c.cluster_miss_penalty = NAN;  // the 0.3.5 struct's padding: not read (it would be refused)
  c.cluster_keys = 7;            // past the 0.3.5 struct: not read
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.cluster_top_p, 0.25f);
  EXPECT_EQ(eff.cluster_miss_penalty, kvrt_config_default().cluster_miss_penalty);
  EXPECT_EQ(eff.cluster_miss_penalty, 0.5f);
  EXPECT_EQ(eff.cluster_keys, 16);
  kvrt_config old;
  std::memset(&old, 0xab, sizeof old);
  old.struct_size = config035;
  ASSERT_EQ(kvrt_runtime_config(rt, &old), KVRT_OK);
  EXPECT_EQ(old.struct_size, config035);
  EXPECT_EQ(old.cluster_top_p, 0.25f);
  int32_t untouched;
  std::memset(&untouched, 0xab, sizeof untouched);
  EXPECT_EQ(old.cluster_keys, untouched);
  kvrt_runtime_destroy(rt);
  EXPECT_EQ(kvrt_config_init(&old, config035), KVRT_OK);
  EXPECT_EQ(old.struct_size, config035);
  EXPECT_EQ(old.cluster_top_p, kvrt_config_default().cluster_top_p);
}

// 0.3.10 gave 0.3.9's reserved0 a meaning, cluster_keys: a 0.3.9 caller (kvrt_config_default set
// it to 0) gets 16, the runtime reports what is in effect, and values outside [2, 256] are
// refused naming the field.
TEST(ContractConfig, ClusterKeysZeroMeansSixteenAndTheRangeIsChecked) {
  EXPECT_EQ(kvrt_config_default().cluster_keys, 16);
  for (int32_t keys : {0, 2, 8, 256}) {
    SCOPED_TRACE(::testing::Message() << "cluster_keys " << keys);
    kvrt_config c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_keys = keys;
    kvrt_config eff;
    ASSERT_TRUE(EffectiveConfig(c, &eff));
    EXPECT_EQ(eff.cluster_keys, keys == 0 ? 16 : keys);
  }
  for (int32_t keys : {1, -1, 257}) {
    SCOPED_TRACE(::testing::Message() << "cluster_keys " << keys);
    kvrt_config c = TinyConfig();
    c.cluster_keys = keys;
    EXPECT_TRUE(RefusedNaming(c, "cluster_keys"));
  }
}

TEST(ContractConfig, ClusterMissPenaltyOutsideZeroTo64IsRefused) {
  const struct {
    float value;
    const char* text;
  } bad[] = {{NAN, "= nan"}, {-1.f, "= -1"}, {65.f, "= 65"}, {INFINITY, "= inf"}};
  for (const auto& b : bad) {
    SCOPED_TRACE(::testing::Message() << "cluster_miss_penalty " << b.value);
    kvrt_config c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_miss_penalty = b.value;
    EXPECT_TRUE(RefusedNaming(c, "cluster_miss_penalty"));
    EXPECT_TRUE(Mentions(b.text)) << kvrt_last_error();
  }
  for (float good : {0.f, 2.f, 64.f}) {
    SCOPED_TRACE(::testing::Message() << "cluster_miss_penalty " << good);
    kvrt_config c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_miss_penalty = good;
    kvrt_config eff;
    ASSERT_TRUE(EffectiveConfig(c, &eff));
    EXPECT_EQ(eff.cluster_miss_penalty, good);
  }
}

// 0.3.11 appended cluster_rescore (and reserved1, which keeps the size apart): a caller compiled
// against 0.3.9/0.3.10 passes the size that ended at cluster_keys (the new field lies in its tail
// padding) and gets its default; values outside [0, 64] are refused naming the field; rescoring
// turns the direct step off (the GPU's selection kernels do not rescore), which the effective
// config reports.
TEST(ContractConfig, ClusterRescoreAndA0310CallerOfTheSizeBefore) {
  const std::size_t config039 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_keys));
  ASSERT_GT(config039, offsetof(kvrt_config, cluster_rescore)) << "the field sits in padding";
  ASSERT_LT(config039, sizeof(kvrt_config)) << "the sizes must differ";
  EXPECT_EQ(kvrt_config_default().cluster_rescore, 0.f);
  kvrt_config c = TinyConfig();
  c.index_kind = KVRT_INDEX_CLUSTER;
  c.struct_size = config039;
  c.cluster_keys = 8;       // inside the 0.3.10 struct: read
  c.cluster_rescore = NAN;  // its padding: not read (it would be refused)
  kvrt_config eff;
  ASSERT_TRUE(EffectiveConfig(c, &eff));
  EXPECT_EQ(eff.cluster_keys, 8);
  EXPECT_EQ(eff.cluster_rescore, 0.f);
  EXPECT_EQ(eff.cluster_direct_step, 1);
  for (float bad : {NAN, -1.f, 65.f, INFINITY}) {
    SCOPED_TRACE(::testing::Message() << "cluster_rescore " << bad);
    c = TinyConfig();
    c.cluster_rescore = bad;
    EXPECT_TRUE(RefusedNaming(c, "cluster_rescore"));
  }
  for (float good : {0.f, 1.f, 4.f, 64.f}) {
    SCOPED_TRACE(::testing::Message() << "cluster_rescore " << good);
    c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_rescore = good;
    ASSERT_TRUE(EffectiveConfig(c, &eff));
    EXPECT_EQ(eff.cluster_rescore, good);
    EXPECT_EQ(eff.cluster_direct_step, good > 1.f ? 0 : 1);
  }
}

// 0.3.13 reads reserved1 as cluster_rescore_bits (the size is unchanged): a 0.3.11/0.3.12 caller
// set it to 0 through kvrt_config_default(), which scores the candidates on their keys, as then;
// widths other than 0, 1, 2, 4, 8 are refused naming the field; the effective config reports it
// and the runtime's search description names the codes.
TEST(ContractConfig, ClusterRescoreBitsIsTheFormerReserved1) {
  EXPECT_EQ(kvrt_config_default().cluster_rescore_bits, 0);
  for (int bad : {-1, 3, 5, 16}) {
    SCOPED_TRACE(::testing::Message() << "cluster_rescore_bits " << bad);
    kvrt_config c = TinyConfig();
    c.cluster_rescore_bits = bad;
    EXPECT_TRUE(RefusedNaming(c, "cluster_rescore_bits"));
  }
  for (int good : {0, 1, 2, 4, 8}) {
    SCOPED_TRACE(::testing::Message() << "cluster_rescore_bits " << good);
    kvrt_config c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_rescore = 4.f;
    c.cluster_rescore_bits = good;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    kvrt_config eff = kvrt_config_default();
    ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
    EXPECT_EQ(eff.cluster_rescore_bits, good);
    char text[512];
    ASSERT_EQ(kvrt_runtime_describe_search(rt, text, sizeof(text)), KVRT_OK);
    EXPECT_EQ(std::string(text).find("-bit codes") != std::string::npos, good > 0) << text;
    kvrt_runtime_destroy(rt);
  }
}

// 0.3.15 appended cluster_value_bits (and reserved2, which keeps the size apart): a caller
// compiled against 0.3.13/0.3.14 passes the size that ended at cluster_rescore_bits (the new field
// lies in its tail padding) and gets its default, value means; widths other than 0, 1, 2, 4, 8,
// and any width without the selection on codes, are refused naming the field; a valid one the
// GPU's kernels do not take (head_dim 32; widths other than 2) turns the direct step off, 2 bits
// at head_dim 64 keep it (since 0.3.17, gpu::CodeValueRest), and the search description names
// the value codes.
TEST(ContractConfig, ClusterValueBitsAndA0314CallerOfTheSizeBefore) {
  const std::size_t config0313 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_rescore_bits));
  ASSERT_GT(config0313, offsetof(kvrt_config, cluster_value_bits)) << "the field sits in padding";
  ASSERT_LT(config0313, sizeof(kvrt_config)) << "the sizes must differ";
  EXPECT_EQ(kvrt_config_default().cluster_value_bits, 0);
  kvrt_config c = TinyConfig();
  c.index_kind = KVRT_INDEX_CLUSTER;
  c.struct_size = config0313;
  c.cluster_rescore_bits = 2;  // inside the 0.3.14 struct: read
  c.cluster_value_bits = 3;    // its padding: not read (it would be refused)
  kvrt_config eff;
  ASSERT_TRUE(EffectiveConfig(c, &eff));
  EXPECT_EQ(eff.cluster_rescore_bits, 2);
  EXPECT_EQ(eff.cluster_value_bits, 0);
  for (int bad : {-1, 3, 16}) {
    SCOPED_TRACE(::testing::Message() << "cluster_value_bits " << bad);
    c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_rescore_bits = 2;
    c.cluster_value_bits = bad;
    EXPECT_TRUE(RefusedNaming(c, "cluster_value_bits"));
  }
  for (float rescore : {0.f, 4.f}) {  // no key codes; key codes in a second stage
    c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.cluster_rescore = rescore;
    c.cluster_rescore_bits = rescore > 0.f ? 2 : 0;
    c.cluster_value_bits = 2;
    EXPECT_TRUE(RefusedNaming(c, "cluster_value_bits")) << rescore;
  }
  for (int good : {0, 1, 2, 4, 8}) {
    SCOPED_TRACE(::testing::Message() << "cluster_value_bits " << good);
    c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.head_dim = 32;  // whole 32-channel words: the GPU could scan the key codes
    c.cluster_rescore_bits = 2;
    c.cluster_value_bits = good;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
    EXPECT_EQ(eff.cluster_value_bits, good);
    EXPECT_EQ(eff.cluster_direct_step, good > 0 ? 0 : 1);
    char text[512];
    ASSERT_EQ(kvrt_runtime_describe_search(rt, text, sizeof(text)), KVRT_OK);
    EXPECT_EQ(std::string(text).find("value codes") != std::string::npos, good > 0) << text;
    kvrt_runtime_destroy(rt);
  }
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(::testing::Message() << "head_dim 64, cluster_value_bits " << bits);
    c = TinyConfig();
    c.index_kind = KVRT_INDEX_CLUSTER;
    c.head_dim = 64;
    c.cluster_rescore_bits = 2;
    c.cluster_value_bits = bits;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
    EXPECT_EQ(eff.cluster_direct_step, bits == 2 ? 1 : 0);
    kvrt_runtime_destroy(rt);
  }
}

// The host backend allocates the window ring as it fills: 10 tokens of a 2^20-token window cost
// 10 tokens, not 1 GiB.
// 0.3.1 appended config and stats fields. A caller compiled against 0.3.0's kvrt.h passes the
// older sizes: the config fields it does not know (the first lies in 0.3.0's tail padding, which
// such a caller never set) keep their defaults, and only its prefix of the stats is written.
TEST(ContractConfig, A030CallerGetsTheDefaultsOfLaterFieldsAndItsStatsPrefix) {
  const std::size_t config030 = ConfigSizeEndingAt(offsetof(kvrt_config, cold_attention));
  ASSERT_GT(config030, offsetof(kvrt_config, hot_cache_fraction)) << "the field sits in padding";
  kvrt_config c = TinyConfig();
  c.struct_size = config030;
  c.hot_cache_fraction = -7.f;  // garbage in the 0.3.0 struct's padding: not read
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.hot_cache_fraction, kvrt_config_default().hot_cache_fraction);
  EXPECT_EQ(eff.cluster_budget_fraction, kvrt_config_default().cluster_budget_fraction);
  EXPECT_EQ(eff.cuda_device, -1);
  kvrt_stats st;
  std::memset(&st, 0xab, sizeof st);
  st.struct_size = offsetof(kvrt_stats, hot_hits);
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.sequences, 0);
  int64_t untouched;
  std::memset(&untouched, 0xab, sizeof untouched);
  EXPECT_EQ(st.hot_hits, untouched);
  // The size stays the caller's, so that a loop polling with one struct keeps to its prefix
  // (0.3.36 wrote this header's size there, and the next call wrote past the caller's struct).
  EXPECT_EQ(st.struct_size, offsetof(kvrt_stats, hot_hits));
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.hot_hits, untouched);
  // 0.3.2 appended the GPU build's stats: a 0.3.1 caller gets the hot cache's, not those.
  std::memset(&st, 0xab, sizeof st);
  st.struct_size = offsetof(kvrt_stats, segments_built_gpu);
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.hot_hits, 0);
  EXPECT_EQ(st.segments_built_gpu, untouched);
  st.struct_size = offsetof(kvrt_stats, segments_built_gpu) + 4;  // no kvrt.h declared this size
  EXPECT_EQ(kvrt_get_stats(rt, &st), KVRT_ERR_INVALID_ARGUMENT);
  // 0.3.19 appended value_codes_fallbacks: a 0.3.4-0.3.18 caller's struct ends before it.
  std::memset(&st, 0xab, sizeof st);
  st.struct_size = offsetof(kvrt_stats, value_codes_fallbacks);
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.time_background_wait_ns, 0);
  EXPECT_EQ(st.value_codes_fallbacks, untouched);
  // 0.3.34 appended evicted_in_place: a 0.3.19-0.3.33 caller's struct ends before it.
  std::memset(&st, 0xab, sizeof st);
  st.struct_size = offsetof(kvrt_stats, evicted_in_place);
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.value_codes_fallbacks, 0);
  EXPECT_EQ(st.evicted_in_place, untouched);
  st.struct_size = sizeof st;
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK) << kvrt_last_error();
  EXPECT_EQ(st.value_codes_fallbacks, 0) << "the host backend has no device summary";
  EXPECT_EQ(st.evicted_in_place, 0) << "the host backend has no device kernel";
  kvrt_runtime_destroy(rt);
  // The new fields are checked like the others.
  c = TinyConfig();
  c.hot_cache_fraction = 1.5f;
  EXPECT_TRUE(RefusedNaming(c, "hot_cache_fraction"));
  c = TinyConfig();
  c.cluster_budget_fraction = 0.f;
  EXPECT_TRUE(RefusedNaming(c, "cluster_budget_fraction"));
  c = TinyConfig();
  c.cuda_device = -2;
  EXPECT_TRUE(RefusedNaming(c, "cuda_device"));
  // The host backend with use_gpu = -1 ignores an ordinal no machine has.
  c = TinyConfig();
  c.use_gpu = -1;
  c.cuda_device = 4096;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_runtime_destroy(rt);
}

TEST(ContractWindow, RingGrowsAsItFills) {
  kvrt_config c = TinyConfig(1, 2);
  c.sink_tokens = 2;
  c.window_tokens = 1 << 20;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const int64_t token = 2 * 4 * 4;  // k + v, one kv head, d = 4, f32
  const auto k = Wave(40 * 4, 0.3f, 0.f), v = Wave(40 * 4, 0.7f, 0.f);
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 12), KVRT_OK);
  kvrt_stats st = {};
  st.struct_size = sizeof st;
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_EQ(st.gpu_allocated_bytes, 12 * token);
  for (int i = 12; i < 40; ++i)
    ASSERT_EQ(kvrt_append(rt, s, 0, k.data() + 4 * i, v.data() + 4 * i, 1), KVRT_OK);
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_LE(st.gpu_allocated_bytes, (2 + 2 * 38) * token)
      << "doubling: at most twice what it holds";
  // The ring still holds every token in order: attend equals an exact attend over all 40.
  std::vector<float> q = {0.3f, -0.2f, 0.5f, 0.1f, 0.2f, 0.4f, -0.3f, 0.6f}, out(8);
  ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK);
  for (int h = 0; h < 2; ++h) {
    double m = -1e30, l = 0, o[4] = {0, 0, 0, 0};
    std::vector<double> sc(40);
    for (int t = 0; t < 40; ++t) {
      double dot = 0;
      for (int e = 0; e < 4; ++e) dot += q[h * 4 + e] * k[t * 4 + e];
      sc[t] = dot / 2.0;  // 1/sqrt(4)
      m = std::max(m, sc[t]);
    }
    for (int t = 0; t < 40; ++t) {
      const double w = std::exp(sc[t] - m);
      l += w;
      for (int e = 0; e < 4; ++e) o[e] += w * v[t * 4 + e];
    }
    for (int e = 0; e < 4; ++e) EXPECT_NEAR(out[h * 4 + e], o[e] / l, 1e-5);
  }
  kvrt_runtime_destroy(rt);
}

// cold_keys_searchable counts the q heads that search: a streaming head searches nothing, and
// counting it made keys_scored / cold_keys_searchable read low.
TEST(ContractStats, ColdKeysSearchableCountsRetrievalHeadsOnly) {
  kvrt_config c = TinyConfig(1, 2);
  c.sink_tokens = 1;
  c.window_tokens = 4;
  c.index_kind = KVRT_INDEX_FLAT;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  ASSERT_EQ(kvrt_set_head_policy(rt, 0, 1, KVRT_HEAD_STREAMING), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const auto k = Wave(40 * 4, 0.3f, 0.f), v = Wave(40 * 4, 0.7f, 0.f);
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 40), KVRT_OK);  // 35 cold
  std::vector<float> q(8, 0.2f), out(8);
  ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK);
  kvrt_stats st = kvrt_stats_init();
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_EQ(st.cold_keys_searchable, 35) << "one retrieval head, 35 cold keys";
  EXPECT_EQ(st.keys_scored, 35) << "flat scans them all";
  kvrt_runtime_destroy(rt);
}

// The host backend's tier attention (sinks + window) and merge ran inside attend in no timing
// field (0.3.36 and before: both 0); since 0.3.37 they are its wall time, inside the attend's.
TEST(ContractStats, HostBackendTimesItsTierAttentionAndMerge) {
  kvrt_config c = TinyConfig(1, 2);
  c.sink_tokens = 2;
  c.window_tokens = 64;
  c.index_kind = KVRT_INDEX_FLAT;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK);
  kvrt_seq_id s;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const auto k = Wave(200 * 4, 0.3f, 0.f), v = Wave(200 * 4, 0.7f, 0.f);
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v.data(), 200), KVRT_OK);
  std::vector<float> q(8, 0.2f), out(8);
  for (int i = 0; i < 20; ++i) ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK);
  kvrt_stats st = kvrt_stats_init();
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_GT(st.time_gpu_attention_ns, 0);
  EXPECT_GT(st.time_merge_ns, 0);
  EXPECT_LE(st.time_gpu_attention_ns + st.time_merge_ns, st.time_attend_ns);
  EXPECT_EQ(st.time_h2d_ns, 0) << "no device";
  kvrt_runtime_destroy(rt);
}

// ---- 0.3.25: multi-head latent attention served as its latent ----------------------------------

// DeepSeek-V3's latent as kvrt serves it (kvrt.hf, mla="latent"): 128 q heads over one kv head
// of 576 (the 512-wide latent and the 64-wide rope part), past the 512 that head_dim stopped at
// before 0.3.25, whose values are its keys (values_are_keys: v passed as NULL). Every index kind
// takes the shape on the host backend; EXACT and FLAT (top_k covering every cold token) equal a
// naive f64 attention over every token with the keys as values. The cluster kind gets a whole
// segment of cold tokens (8192), so that its summary, not only its tail, is searched.
class LatentShapeEveryKind : public ::testing::TestWithParam<NanCase> {};

TEST_P(LatentShapeEveryKind, HostBackendAttendsEveryToken) {
  constexpr int kHeads = 128, kDim = 576, kAppended = 3;
  const int kPrompt = GetParam().kind == KVRT_INDEX_CLUSTER ? 8192 + 300 : 1200;
  kvrt_config c = TinyConfig(1, kHeads);
  c.head_dim = kDim;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.top_k = 2048;  // every cold token, so that FLAT is exact too
  c.index_kind = GetParam().kind;
  c.worker_threads = 2;
  c.values_are_keys = 1;
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_seq_id s = 0;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  const int n = kPrompt + kAppended;
  auto k = Wave(static_cast<std::size_t>(n) * kDim, 0.37f, 0.1f);
  // Keys that differ per token beyond a phase: a few tokens stand out for each head.
  for (int t = 0; t < n; ++t) k[static_cast<std::size_t>(t) * kDim + t % kDim] += 3.f;
  const std::vector<float>& v = k;
  ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), nullptr, kPrompt), KVRT_OK)
      << kvrt_last_error();
  for (int t = kPrompt; t < n; ++t)
    ASSERT_EQ(kvrt_append(rt, s, 0, k.data() + static_cast<std::size_t>(t) * kDim, nullptr, 1),
              KVRT_OK)
        << kvrt_last_error();
  kvrt_stats st = {};
  st.struct_size = sizeof st;
  ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
  EXPECT_EQ(st.host_bytes, st.host_tokens * kDim * 4) << "one row per token: its key";
  const auto q = Wave(static_cast<std::size_t>(kHeads) * kDim, 0.05f, 0.3f);
  std::vector<float> out(static_cast<std::size_t>(kHeads) * kDim, NAN);
  ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), out.data()), KVRT_OK) << kvrt_last_error();
  EXPECT_TRUE(AllFinite(out.data(), kHeads * kDim));
  const bool exact = GetParam().kind == KVRT_INDEX_EXACT || GetParam().kind == KVRT_INDEX_FLAT;
  for (int h = 0; exact && h < kHeads; h += 17) {
    const double lse = ExactLse(q.data() + h * kDim, k, n, kDim);
    std::vector<double> w(n);
    for (int t = 0; t < n; ++t) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j)
        dot += static_cast<double>(q[h * kDim + j]) * k[static_cast<std::size_t>(t) * kDim + j];
      w[t] = std::exp(dot / std::sqrt(static_cast<double>(kDim)) - lse);
    }
    double worst = 0;
    for (int e = 0; e < kDim; e += 5) {
      double want = 0;
      for (int t = 0; t < n; ++t) want += w[t] * v[static_cast<std::size_t>(t) * kDim + e];
      worst = std::max(worst, std::abs(want - out[h * kDim + e]));
    }
    EXPECT_LT(worst, 1e-4) << "head " << h;
  }
  kvrt_runtime_destroy(rt);
}

INSTANTIATE_TEST_SUITE_P(EveryIndexKind, LatentShapeEveryKind, ::testing::ValuesIn(kKinds),
                         KindName);

// values_are_keys stores one row per token where a runtime given the keys as values stores two,
// and attends the same: the outputs equal bit for bit (EXACT; the tier and cold rows alike), the
// host store is half. v is not read (NULL or anything); the GPU backend and values other than
// 0/1 are refused by name.
TEST(ContractConfig, ValuesAreKeysHalvesTheStoreAndAttendsTheSame) {
  constexpr int kDimV = 16, kTokens = 300;
  auto k = Wave(static_cast<std::size_t>(kTokens) * 2 * kDimV, 0.37f, 0.1f);
  const auto q = Wave(4 * kDimV, 0.23f, 0.3f);
  std::vector<float> outs[2];
  int64_t host_bytes[2] = {0, 0};
  for (int shared : {0, 1}) {
    kvrt_config c = TinyConfig(1, 4);
    c.num_kv_heads = 2;
    c.head_dim = kDimV;
    c.sink_tokens = 2;
    c.window_tokens = 8;
    c.index_kind = KVRT_INDEX_EXACT;
    c.values_are_keys = shared;
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    kvrt_seq_id s = 0;
    ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    const float* v = shared ? nullptr : k.data();
    ASSERT_EQ(kvrt_prefill(rt, s, 0, nullptr, k.data(), v, kTokens - 5), KVRT_OK)
        << kvrt_last_error();
    const std::size_t at = static_cast<std::size_t>(kTokens - 5) * 2 * kDimV;
    // The appended rows' v: ignored when values are keys (here a wrong pointer, not NULL).
    const auto other = Wave(5 * 2 * kDimV, 0.9f, 0.4f);
    ASSERT_EQ(kvrt_append(rt, s, 0, k.data() + at, shared ? other.data() : k.data() + at, 5),
              KVRT_OK);
    outs[shared].assign(4 * kDimV, NAN);
    ASSERT_EQ(kvrt_attend(rt, s, 0, q.data(), outs[shared].data()), KVRT_OK) << kvrt_last_error();
    kvrt_stats st = {};
    st.struct_size = sizeof st;
    ASSERT_EQ(kvrt_get_stats(rt, &st), KVRT_OK);
    host_bytes[shared] = st.host_bytes;
    kvrt_config eff = kvrt_config_default();
    ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
    EXPECT_EQ(eff.values_are_keys, shared);
    kvrt_runtime_destroy(rt);
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_GT(host_bytes[0], 0);
  EXPECT_EQ(host_bytes[1] * 2, host_bytes[0]);
  kvrt_config c = TinyConfig();
  c.values_are_keys = 2;
  EXPECT_TRUE(RefusedNaming(c, "values_are_keys"));
  c.values_are_keys = 1;
  c.use_gpu = 1;
  EXPECT_TRUE(RefusedNaming(c, "values_are_keys"));
  c.use_gpu = -1;  // the host backend, then
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_config eff = kvrt_config_default();
  ASSERT_EQ(kvrt_runtime_config(rt, &eff), KVRT_OK);
  EXPECT_EQ(eff.use_gpu, 0);
  kvrt_runtime_destroy(rt);
}

// ---- 0.3.29: a prefill from the queries of the rows kvrt reads -------------------------------

kvrt_config SampledConfig(kvrt_index_kind kind) {
  kvrt_config c = TinyConfig(1, 4);  // 4 q heads per kv head: kvrt reads 4096 / 4 = 1024 rows
  c.head_dim = 16;
  c.sink_tokens = 4;
  c.window_tokens = 64;
  c.index_kind = kind;
  c.record_attended = 1;
  return c;
}

TEST(ContractPrefillSampled, QueryRowsAreEvenlySpacedAndNoneForKindsThatReadNone) {
  kvrt_runtime* rt = nullptr;
  kvrt_config c = SampledConfig(KVRT_INDEX_CLUSTER);
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  int64_t count = -1, stride = -1;
  ASSERT_EQ(kvrt_prefill_query_rows(rt, 5000, &count, &stride), KVRT_OK);
  EXPECT_EQ(count, 1000);  // at most 1024 (4096 query rows over 4 q heads per kv head)
  EXPECT_EQ(stride, 5);
  // Spread over the whole prompt, whatever its length: the last row within a stride of its end.
  for (int64_t n : {1025, 2000, 2047, 4096, 5000, 20000, 131071}) {
    ASSERT_EQ(kvrt_prefill_query_rows(rt, n, &count, &stride), KVRT_OK);
    EXPECT_LE(count, 1024) << n;
    EXPECT_LT((count - 1) * stride, n) << n;
    EXPECT_GE((count - 1) * stride, n - stride) << n;
  }
  ASSERT_EQ(kvrt_prefill_query_rows(rt, 300, &count, &stride), KVRT_OK);
  EXPECT_EQ(count, 300);
  EXPECT_EQ(stride, 1);
  EXPECT_EQ(kvrt_prefill_query_rows(rt, 0, &count, &stride), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("n_tokens"));
  // Up to the 2^34 tokens a prefill takes; past it refused (INT64_MAX gave count -2047 with OK).
  ASSERT_EQ(kvrt_prefill_query_rows(rt, int64_t{1} << 34, &count, &stride), KVRT_OK);
  EXPECT_EQ(count, 1024);
  EXPECT_EQ(stride, int64_t{1} << 24);
  count = stride = -1;
  for (int64_t n : {(int64_t{1} << 34) + 1, std::numeric_limits<int64_t>::max()}) {
    EXPECT_EQ(kvrt_prefill_query_rows(rt, n, &count, &stride), KVRT_ERR_INVALID_ARGUMENT) << n;
    EXPECT_TRUE(Mentions("must be in [1, 2^34]")) << kvrt_last_error();
    EXPECT_EQ(count, -1);
  }
  EXPECT_EQ(kvrt_prefill_query_rows(rt, 10, nullptr, &stride), KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_prefill_query_rows(nullptr, 10, &count, &stride), KVRT_ERR_INVALID_ARGUMENT);
  kvrt_runtime_destroy(rt);
  c = SampledConfig(KVRT_INDEX_FLAT);
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  ASSERT_EQ(kvrt_prefill_query_rows(rt, 5000, &count, &stride), KVRT_OK);
  EXPECT_EQ(count, 0);
  kvrt_runtime_destroy(rt);
}

// Normal values, dimension j scaled by scale[j % size] (queries that favour some dimensions: what
// the cluster kind's query-aware metric learns from the prompt's queries).
std::vector<float> Normal(std::size_t n, uint32_t seed, const std::vector<float>& scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = dist(gen) * scale[i % scale.size()];
  return x;
}

TEST(ContractPrefillSampled, TheNamedRowsBuildTheIndexOfEveryQuery) {
  // Two segments of 8192 clustered rows, the rest an unclustered tail that every step attends.
  constexpr int kHeads = 4, kDim = 16, kPrompt = 20000;
  const kvrt_config c = SampledConfig(KVRT_INDEX_CLUSTER);
  std::vector<float> skew(kDim, 0.2f);
  for (int j = 0; j < 4; ++j) skew[j] = 3.0f;
  const auto q = Normal(static_cast<std::size_t>(kPrompt) * kHeads * kDim, 1, skew);
  const auto k = Normal(static_cast<std::size_t>(kPrompt) * kDim, 2, {1.0f});
  const auto v = Normal(static_cast<std::size_t>(kPrompt) * kDim, 3, {1.0f});
  const auto step_q = Normal(3 * kHeads * kDim, 4, skew);
  const std::size_t q_row = kHeads * kDim;
  // Runs a prompt, given queries (n_queries < 0: kvrt_prefill with all of them), then three
  // decode queries; returns their outputs and the positions they attended.
  auto run = [&](const float* queries, int64_t n_queries, std::vector<float>* outs,
                 std::vector<int64_t>* attended) {
    kvrt_runtime* rt = nullptr;
    ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
    kvrt_seq_id s = 0;
    ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
    const kvrt_status st = n_queries < 0
                               ? kvrt_prefill(rt, s, 0, queries, k.data(), v.data(), kPrompt)
                               : kvrt_prefill_sampled_ex(rt, s, 0, queries, n_queries, k.data(),
                                                         v.data(), kPrompt, nullptr);
    ASSERT_EQ(st, KVRT_OK) << kvrt_last_error();
    for (int i = 0; i < 3; ++i) {
      std::vector<float> out(q_row, NAN);
      ASSERT_EQ(kvrt_attend(rt, s, 0, step_q.data() + i * q_row, out.data()), KVRT_OK)
          << kvrt_last_error();
      outs->insert(outs->end(), out.begin(), out.end());
      for (int h = 0; h < kHeads; ++h) {
        std::vector<int64_t> ids(kPrompt);
        int64_t n = 0;
        ASSERT_EQ(kvrt_get_attended(rt, s, 0, h, ids.data(), kPrompt, &n), KVRT_OK);
        attended->insert(attended->end(), ids.begin(), ids.begin() + n);
      }
    }
    kvrt_runtime_destroy(rt);
  };
  kvrt_runtime* probe = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &probe), KVRT_OK) << kvrt_last_error();
  int64_t count = 0, stride = 0;
  ASSERT_EQ(kvrt_prefill_query_rows(probe, kPrompt, &count, &stride), KVRT_OK);
  kvrt_runtime_destroy(probe);
  ASSERT_EQ(count, 1000);
  ASSERT_EQ(stride, 20);
  std::vector<float> sample;
  for (int64_t i = 0; i < count; ++i)
    sample.insert(sample.end(), q.begin() + i * stride * q_row,
                  q.begin() + (i * stride + 1) * q_row);
  std::vector<float> out_all, out_sampled, out_none;
  std::vector<int64_t> at_all, at_sampled, at_none;
  run(q.data(), -1, &out_all, &at_all);
  run(sample.data(), count, &out_sampled, &at_sampled);
  run(nullptr, 0, &out_none, &at_none);
  ASSERT_FALSE(out_all.empty());
  EXPECT_EQ(out_sampled, out_all);
  EXPECT_EQ(at_sampled, at_all);
  // Without queries the cluster kind builds another index (its metric from keys alone): the
  // comparison above could tell the two apart.
  EXPECT_NE(at_none, at_all);
}

TEST(ContractPrefillSampled, RefusesMoreQueriesThanTokensAndChecksOnlyTheRowsGiven) {
  constexpr int kHeads = 4, kDim = 16, kPrompt = 600;
  kvrt_config c = SampledConfig(KVRT_INDEX_CLUSTER);
  c.check_finite = 1;
  auto q = Wave(static_cast<std::size_t>(kPrompt) * kHeads * kDim, 0.011f, 0.2f);
  const auto k = Wave(static_cast<std::size_t>(kPrompt) * kDim, 0.37f, 0.1f);
  kvrt_runtime* rt = nullptr;
  ASSERT_EQ(kvrt_runtime_create(&c, &rt), KVRT_OK) << kvrt_last_error();
  kvrt_seq_id s = 0;
  ASSERT_EQ(kvrt_seq_create(rt, &s), KVRT_OK);
  EXPECT_EQ(kvrt_prefill_sampled_ex(rt, s, 0, q.data(), kPrompt + 1, k.data(), k.data(), kPrompt,
                                    nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("n_queries"));
  EXPECT_EQ(kvrt_prefill_sampled_ex(rt, s, 0, q.data(), -1, k.data(), k.data(), kPrompt, nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvrt_prefill_sampled_ex(rt, s, 0, nullptr, 5, k.data(), k.data(), kPrompt, nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(Mentions("q is NULL"));
  // A NaN in the 11th query: refused when it is given, not read when only 10 rows are.
  q[10 * kHeads * kDim + 3] = NAN;
  EXPECT_EQ(kvrt_prefill_sampled_ex(rt, s, 0, q.data(), 11, k.data(), k.data(), kPrompt, nullptr),
            KVRT_ERR_INVALID_ARGUMENT);
  // The 11th of the rows given, not the prompt's token 10 (0.3.36 said "token 10").
  EXPECT_TRUE(Mentions("prefill: q holds a non-finite value at query row 10, head 0, element 3"))
      << kvrt_last_error();
  int64_t n = -1;
  ASSERT_EQ(kvrt_seq_length(rt, s, 0, &n), KVRT_OK);
  EXPECT_EQ(n, 0);  // nothing entered on a refused call
  ASSERT_EQ(kvrt_prefill_sampled_ex(rt, s, 0, q.data(), 10, k.data(), k.data(), kPrompt, nullptr),
            KVRT_OK)
      << kvrt_last_error();
  ASSERT_EQ(kvrt_seq_length(rt, s, 0, &n), KVRT_OK);
  EXPECT_EQ(n, kPrompt);
  kvrt_runtime_destroy(rt);
}

}  // namespace
