// The runtime against a plain double-precision attention over all tokens.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt_common/dtype.h"
#include "kvrt_common/finite_bits.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_runtime/runtime.h"

namespace kvrt::runtime {
namespace {

struct Tokens {
  std::vector<float> k, v;  // [n, kv_heads, d] f32 (values as stored, after dtype rounding)
};

// Random tensor in `dtype`; `f32` receives the values it represents.
std::vector<unsigned char> Random(std::mt19937& rng, std::size_t n, DType t,
                                  std::vector<float>* f32, float sigma = 1.f) {
  std::normal_distribution<float> dist(0.f, sigma);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  std::vector<unsigned char> bytes(n * DTypeSize(t));
  ConvertFromF32(x.data(), n, t, bytes.data());
  if (f32) {
    std::vector<float> back(n);
    ConvertToF32(bytes.data(), t, n, back.data());
    f32->insert(f32->end(), back.begin(), back.end());
  }
  return bytes;
}

// Exact attention of q (f32 [H, d]) over all n tokens; lse (optional): each head's log-sum-exp of
// its scaled scores.
std::vector<double> Exact(const RuntimeConfig& c, const std::vector<float>& q, const Tokens& kv,
                          int64_t n, std::vector<double>* lse = nullptr) {
  const int d = c.head_dim, group = c.num_q_heads / c.num_kv_heads;
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(static_cast<std::size_t>(c.num_q_heads) * d, 0.0);
  for (int h = 0; h < c.num_q_heads; ++h) {
    const int g = h / group;
    std::vector<double> s(n);
    double m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0;
      for (int j = 0; j < d; ++j)
        acc += static_cast<double>(q[h * d + j]) * kv.k[(i * c.num_kv_heads + g) * d + j];
      s[i] = acc * scale;
      m = std::max(m, s[i]);
    }
    double l = 0;
    for (auto& x : s) l += (x = std::exp(x - m));
    if (lse != nullptr) lse->push_back(m + std::log(l));
    for (int64_t i = 0; i < n; ++i)
      for (int j = 0; j < d; ++j)
        out[h * d + j] += s[i] / l * kv.v[(i * c.num_kv_heads + g) * d + j];
  }
  return out;
}

double RelError(const std::vector<float>& got, const std::vector<double>& want, int h, int d) {
  double num = 0, den = 0;
  for (int j = 0; j < d; ++j) {
    num += (got[h * d + j] - want[h * d + j]) * (got[h * d + j] - want[h * d + j]);
    den += want[h * d + j] * want[h * d + j];
  }
  return std::sqrt(num / den);
}

struct Case {
  DType dtype;
  int sinks, window;
  int64_t prompt, steps;
  cpu_index::IndexKind kind = cpu_index::IndexKind::kExact;
  int top_k = 100000;
  bool group_search = true;
  int64_t cluster_segment = 0;  // cluster kind: segment_tokens (0 = default)
  int cluster_keys = 0;         // cluster kind: cluster_size (0 = default)
  int q_heads = 4, kv_heads = 2;
};

// Prefill `prompt` tokens, then `steps` x (append 1, attend), checking each output.
void RunAndCheck(const Case& cs, double tol) {
  RuntimeConfig c;
  c.num_layers = 2;
  c.num_q_heads = cs.q_heads;
  c.num_kv_heads = cs.kv_heads;
  c.head_dim = 32;
  c.dtype = cs.dtype;
  c.sink_tokens = cs.sinks;
  c.window_tokens = cs.window;
  c.index_kind = cs.kind;
  c.top_k = cs.top_k;
  c.group_search = cs.group_search;
  if (cs.cluster_segment > 0) c.index.cluster.segment_tokens = cs.cluster_segment;
  if (cs.cluster_keys > 0) c.index.cluster.cluster_size = cs.cluster_keys;
  c.worker_threads = 2;
  c.record_attended = true;
  auto rt = Runtime::Create(c);
  ASSERT_TRUE(rt.ok()) << rt.status();
  auto seq = (*rt)->CreateSequence();
  ASSERT_TRUE(seq.ok());
  std::mt19937 rng(7);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  const std::size_t qrow = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  const int layer = 1;
  Tokens kv;
  int64_t n = 0;
  if (cs.prompt > 0) {
    auto q = Random(rng, cs.prompt * qrow, c.dtype, nullptr);
    auto k = Random(rng, cs.prompt * row, c.dtype, &kv.k, 2.f);
    auto v = Random(rng, cs.prompt * row, c.dtype, &kv.v);
    ASSERT_TRUE((*rt)->Prefill(*seq, layer, q.data(), k.data(), v.data(), cs.prompt).ok());
    n = cs.prompt;
  }
  for (int64_t s = 0; s < cs.steps; ++s) {
    auto k = Random(rng, row, c.dtype, &kv.k, 2.f);
    auto v = Random(rng, row, c.dtype, &kv.v);
    ASSERT_TRUE((*rt)->Append(*seq, layer, k.data(), v.data(), 1).ok());
    ++n;
    std::vector<float> qf;
    auto q = Random(rng, qrow, c.dtype, &qf);
    std::vector<float> out(qrow), lse(c.num_q_heads, NAN);
    // The merged lse through both entry points (kvrt_attend_batch_lse_ex with one sequence).
    const int64_t id = *seq;
    auto st = s % 2 == 0 ? (*rt)->Attend(id, layer, q.data(), out.data(), {}, lse.data())
                         : (*rt)->AttendBatch(&id, 1, layer, q.data(), out.data(), {}, lse.data());
    ASSERT_TRUE(st.ok()) << st;
    std::vector<double> want_lse;
    const auto want = Exact(c, qf, kv, n, &want_lse);
    for (int h = 0; h < c.num_q_heads; ++h) {
      ASSERT_LT(RelError(out, want, h, c.head_dim), tol) << "step " << s << " head " << h;
      ASSERT_NEAR(lse[h], want_lse[h], 1e-4) << "step " << s << " head " << h;
    }
    // Every token is attended exactly once.
    std::vector<int64_t> ids;
    ASSERT_TRUE((*rt)->GetAttended(*seq, layer, 0, &ids).ok());
    std::vector<int> seen(n, 0);
    for (auto id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, n);
      ++seen[id];
    }
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "token " << i << " step " << s;
    auto len = (*rt)->SequenceLength(*seq, layer);
    ASSERT_EQ(*len, n);
  }
  const auto stats = (*rt)->Stats();
  EXPECT_EQ(stats.gpu_tokens + stats.host_tokens, n);
  EXPECT_LE(stats.gpu_tokens, cs.sinks + cs.window);
}

// Every 16-bit pattern of f16 and bf16, and f32's around its exponent's edges, at every offset of
// a block and past it: found exactly when the exponent bits are all ones (Inf and NaN of either
// sign), as the first of several.
TEST(FiniteBits, EveryPatternIsFoundExactlyWhenItsExponentIsAllOnes) {
  for (const auto& [dtype, exponent] :
       {std::pair{DType::kF16, 0x7c00u}, std::pair{DType::kBF16, 0x7f80u}}) {
    std::vector<uint16_t> x(2100, 0x3c00);  // finite in both
    for (uint32_t bits = 0; bits < 65536; ++bits) {
      const std::size_t at = (bits * 7919u) % x.size();
      x[at] = static_cast<uint16_t>(bits);
      const bool bad = (bits & exponent) == exponent;
      ASSERT_EQ(FirstNonFinite(x.data(), x.size(), dtype), bad ? at : x.size()) << bits;
      x[at] = 0;
    }
  }
  std::vector<uint32_t> f(3000, 0x3f800000u);
  constexpr std::size_t kLater = 2500;
  for (uint32_t bits : {0x7f800000u, 0xff800000u, 0x7fc00001u, 0xffffffffu, 0x7f7fffffu,
                        0xff7fffffu, 0x80000000u, 0x00000001u, 0x7f000000u}) {
    const bool bad = (bits & 0x7f800000u) == 0x7f800000u;
    for (std::size_t at :
         {std::size_t{0}, std::size_t{1023}, std::size_t{1024}, std::size_t{2999}}) {
      f[at] = bits;
      f[kLater] = 0x7f800000u;
      EXPECT_EQ(FirstNonFinite(f.data(), f.size(), DType::kF32),
                bad ? std::min(at, kLater) : kLater)
          << std::hex << bits << " at " << std::dec << at;
      f[at] = 0x3f800000u;
      f[kLater] = 0x3f800000u;
    }
  }
}

TEST(RuntimeExact, F32EqualsFullAttention) { RunAndCheck({DType::kF32, 4, 16, 200, 20}, 1e-5); }
TEST(RuntimeExact, F16Storage) { RunAndCheck({DType::kF16, 4, 16, 100, 10}, 1e-5); }
TEST(RuntimeExact, Bf16Storage) { RunAndCheck({DType::kBF16, 4, 16, 100, 10}, 1e-5); }
TEST(RuntimeExact, NoSinks) { RunAndCheck({DType::kF32, 0, 16, 100, 10}, 1e-5); }
TEST(RuntimeExact, WindowLongerThanSequence) { RunAndCheck({DType::kF32, 4, 1000, 50, 10}, 1e-5); }
TEST(RuntimeExact, WindowExactlyFull) { RunAndCheck({DType::kF32, 4, 16, 19, 1}, 1e-5); }
TEST(RuntimeExact, OneToken) { RunAndCheck({DType::kF32, 4, 16, 0, 1}, 1e-5); }
TEST(RuntimeExact, OnlyDecodeAppends) { RunAndCheck({DType::kF32, 2, 5, 0, 40}, 1e-5); }
TEST(RuntimeExact, WindowOfOne) { RunAndCheck({DType::kF32, 1, 1, 30, 5}, 1e-5); }
TEST(RuntimeFlat, TopKCoveringEverythingIsExact) {
  RunAndCheck({DType::kF32, 4, 16, 600, 5, cpu_index::IndexKind::kFlat, 100000}, 1e-5);
}

// top_k >= cold tokens makes every kind exhaustive, so the output is exact attention with the
// group search (one search per kv head for its 2 q heads) and without.
TEST(RuntimeGroupSearch, ExhaustiveSearchIsExactForEveryKind) {
  for (auto kind : {cpu_index::IndexKind::kFlat, cpu_index::IndexKind::kLandmark,
                    cpu_index::IndexKind::kAttentionAware}) {
    for (bool group : {true, false}) {
      SCOPED_TRACE(std::string(cpu_index::IndexKindName(kind)) + (group ? " group" : " per head"));
      RunAndCheck({DType::kBF16, 4, 16, 700, 4, kind, 100000, group}, 1e-5);
    }
  }
}

// The cluster kind permutes the store (cluster-contiguous rows) as it indexes segments: with a
// budget covering every cluster the output is exact attention, and the recorded positions (through
// the cold tier's row-to-position map) still name every token once. Segments of 128 rows, so that
// the 700-token prompt and the decode appends cover several and leave an uncovered tail.
TEST(RuntimeCluster, FullBudgetIsExactAndPositionsSurviveThePermutation) {
  for (bool group : {true, false}) {
    SCOPED_TRACE(group ? "group" : "per head");
    RunAndCheck({DType::kBF16, 4, 16, 700, 140, cpu_index::IndexKind::kCluster, 100000, group, 128},
                1e-5);
  }
}

// An MQA shape: 40 q heads over one kv head, the step's only unit of parallel work, whose search
// and attention run in parallel over its clusters and its heads (chunks of 8): still exact at the
// full budget, with the group's one selection and per head.
TEST(RuntimeCluster, WideGroupFullBudgetIsExact) {
  for (bool group : {true, false}) {
    SCOPED_TRACE(group ? "group" : "per head");
    Case cs{DType::kBF16, 4, 16, 700, 20, cpu_index::IndexKind::kCluster, 100000, group, 128};
    cs.q_heads = 40;
    cs.kv_heads = 1;
    RunAndCheck(cs, 1e-5);
  }
}

// One layer, one kv head with 2 q heads of d = 16, f32, 2 sinks, `window` window tokens.
RuntimeConfig TwoHeadConfig(cpu_index::IndexKind kind, int window) {
  RuntimeConfig c;
  c.num_layers = 1;
  c.num_q_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 16;
  c.dtype = DType::kF32;
  c.sink_tokens = 2;
  c.window_tokens = window;
  c.index_kind = kind;
  return c;
}

// The GPU's selection runs only what its kernels take: a two-stage selection, a selection on codes
// of a head_dim that is not whole 32-channel words, one estimating from value codes other than
// 2-bit ones at head_dim 64, 128 or 256, or a group of more than 16 q heads per kv head stays the
// CPU's (and so does the attend: no direct step).
// The effective config says so on any machine.
TEST(RuntimeCluster, SelectionsTheGpuCannotRunStayOnTheCpu) {
  struct Case {
    int head_dim;
    float rescore;
    int bits;
    bool gpu;
    int value_bits = 0;
    int q_heads = 2;  // over one kv head
  };
  for (const Case k :
       {Case{64, 0.f, 0, true}, Case{64, 0.f, 2, true}, Case{80, 0.f, 0, true},
        Case{80, 0.f, 2, false}, Case{72, 0.f, 8, false}, Case{64, 4.f, 2, false},
        Case{64, 0.f, 2, true, 2}, Case{128, 0.f, 2, true, 2}, Case{256, 0.f, 2, true, 2},
        Case{96, 0.f, 2, false, 2}, Case{64, 0.f, 2, false, 4}, Case{64, 0.f, 2, false, 1},
        Case{64, 0.f, 0, true, 0, 16}, Case{64, 0.f, 0, false, 0, 17}}) {
    SCOPED_TRACE(::testing::Message()
                 << "d " << k.head_dim << " rescore " << k.rescore << " bits " << k.bits
                 << " value bits " << k.value_bits << " q heads " << k.q_heads);
    RuntimeConfig c = TwoHeadConfig(cpu_index::IndexKind::kCluster, 16);
    c.head_dim = k.head_dim;
    c.num_q_heads = k.q_heads;
    c.index.cluster.rescore = k.rescore;
    c.index.cluster.rescore_bits = k.bits;
    c.index.cluster.value_bits = k.value_bits;
    c.direct_step = true;
    auto rt = Runtime::Create(c);
    ASSERT_TRUE(rt.ok()) << rt.status();
    EXPECT_EQ((*rt)->config().index.cluster.gpu_select, k.gpu);
    EXPECT_EQ((*rt)->config().direct_step, k.gpu);
  }
}

// Clusters of 8 keys (config.cluster_keys) instead of 16: still exact at the full budget, and a
// step scores twice the clusters (keys_scored counts each cluster once per q head).
TEST(RuntimeCluster, EightKeysPerClusterScoreTwiceTheClustersAndStayExact) {
  RunAndCheck({DType::kBF16, 4, 16, 700, 20, cpu_index::IndexKind::kCluster, 100000, true, 128, 8},
              1e-5);
  int64_t scored[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    RuntimeConfig c = TwoHeadConfig(cpu_index::IndexKind::kCluster, 16);
    c.index.cluster.segment_tokens = 256;
    c.index.cluster.outlier_fraction = 0.f;
    c.index.cluster.cluster_size = i == 0 ? 16 : 8;
    auto rt = *Runtime::Create(c);
    auto seq = *rt->CreateSequence();
    std::mt19937 rng(5);
    const int64_t n = 2 * 256 + 2 + 16;  // two whole segments of cold rows, no unclustered tail
    std::vector<float> k, v;
    auto kb = Random(rng, n * 16, DType::kF32, &k);
    auto vb = Random(rng, n * 16, DType::kF32, &v);
    ASSERT_TRUE(rt->Prefill(seq, 0, nullptr, kb.data(), vb.data(), n).ok());
    std::vector<float> q(2 * 16, 0.5f), out(2 * 16);
    ASSERT_TRUE(rt->Attend(seq, 0, q.data(), out.data()).ok());
    scored[i] = rt->Stats().keys_scored;
  }
  // 16 keys: 32 clusters per kv head, each scored by 2 q heads; the few always-scored rows (an
  // outlier per segment at least) are the same in both.
  const int64_t clusters16 = 2 * (2 * 256 / 16);
  EXPECT_GE(scored[0], clusters16);
  EXPECT_LE(scored[0], clusters16 + 8);
  EXPECT_EQ(scored[1] - scored[0], clusters16) << "8 keys: twice the clusters, the rest the same";
}

// A prompt of one token hands the cluster kind a query sample of its group's few queries: a
// metric and spreads fit to those (rank 2 here, of d = 16) made every segment clustered during
// decode ~10x less accurate than no queries at all (d = 128: mean output error 0.18 against 0.019,
// forty-sixth session). Below MinMetricQueries the sample is not used: the decode reads exactly
// what a prompt without queries gives.
TEST(RuntimeCluster, APromptOfTooFewQueriesClustersAsOneWithoutQueries) {
  RuntimeConfig c = TwoHeadConfig(cpu_index::IndexKind::kCluster, 32);
  c.index.cluster.segment_tokens = 256;
  ASSERT_LT(c.num_q_heads, cpu_index::MinMetricQueries(c.head_dim));
  std::mt19937 rng(9);
  const int64_t n = 1 + 3 * 256 + 40;  // three segments clustered during decode, a tail
  Tokens kv;
  auto kb = Random(rng, n * 16, DType::kF32, &kv.k);
  auto vb = Random(rng, n * 16, DType::kF32, &kv.v);
  std::vector<float> pq;
  auto pqb = Random(rng, 2 * 16, DType::kF32, &pq);  // the prompt token's 2 q heads
  std::vector<std::vector<float>> outs(2);
  double worst = 0;
  for (int with_query = 0; with_query < 2; ++with_query) {
    auto rt = *Runtime::Create(c);
    auto seq = *rt->CreateSequence();
    ASSERT_TRUE(
        rt->Prefill(seq, 0, with_query ? pqb.data() : nullptr, kb.data(), vb.data(), 1).ok());
    std::mt19937 qrng(4);
    for (int64_t t = 1; t < n; ++t) {
      ASSERT_TRUE(rt->Append(seq, 0, kb.data() + t * 16 * 4, vb.data() + t * 16 * 4, 1).ok());
      if (t % 64 != 63) continue;
      std::vector<float> q;
      auto qb = Random(qrng, 2 * 16, DType::kF32, &q);
      std::vector<float> out(2 * 16);
      ASSERT_TRUE(rt->Attend(seq, 0, qb.data(), out.data()).ok());
      outs[with_query].insert(outs[with_query].end(), out.begin(), out.end());
      const std::vector<double> want = Exact(c, q, kv, t + 1);
      for (int h = 0; h < 2; ++h) worst = std::max(worst, RelError(out, want, h, 16));
    }
  }
  EXPECT_EQ(outs[0], outs[1]) << "the one-token prompt's queries changed the clustering";
  EXPECT_TRUE(std::isfinite(worst));
}

TEST(RuntimeFlat, RetrievesTheExactTopKOfColdTokens) {
  RuntimeConfig c = TwoHeadConfig(cpu_index::IndexKind::kFlat, 8);
  c.top_k = 5;
  c.record_attended = true;
  auto rt = *Runtime::Create(c);
  auto seq = *rt->CreateSequence();
  std::mt19937 rng(3);
  const int64_t n = 1000;
  std::vector<float> k, v;
  auto kb = Random(rng, n * 16, DType::kF32, &k);
  auto vb = Random(rng, n * 16, DType::kF32, &v);
  ASSERT_TRUE(rt->Prefill(seq, 0, nullptr, kb.data(), vb.data(), n).ok());
  std::vector<float> q(32), out(32);
  for (auto& x : q) x = std::normal_distribution<float>()(rng);
  ASSERT_TRUE(rt->Attend(seq, 0, q.data(), out.data()).ok());
  std::vector<int64_t> ids;
  ASSERT_TRUE(rt->GetAttended(seq, 0, 1, &ids).ok());
  ASSERT_EQ(ids.size(), 2u + 8u + 5u);
  // The cold part (last 5) must be the 5 best cold tokens [2, n - 8) for head 1.
  std::vector<std::pair<float, int64_t>> scored;
  for (int64_t i = 2; i < n - 8; ++i) {
    float s = 0;
    for (int j = 0; j < 16; ++j) s += q[16 + j] * k[i * 16 + j];
    scored.push_back({-s, i});
  }
  std::sort(scored.begin(), scored.end());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ids[10 + i], scored[i].second);
}

// Group selection (cluster.group_select): the q heads of a kv head attend the same cold positions,
// at least the budget; heads selecting their own clusters attend at least as many each, and more
// in their union (what the kv head reads).
TEST(RuntimeCluster, GroupSelectionSharesTheColdRowsOfAKvHead) {
  std::size_t union_per_head = 0, union_group = 0;
  for (bool group_select : {false, true}) {
    SCOPED_TRACE(group_select ? "group selection" : "per q head");
    RuntimeConfig c;
    c.num_layers = 1;
    c.num_q_heads = 4;
    c.num_kv_heads = 1;
    c.head_dim = 32;
    c.dtype = DType::kF32;
    c.sink_tokens = 2;
    c.window_tokens = 16;
    c.top_k = 1;
    c.index_kind = cpu_index::IndexKind::kCluster;
    c.index.cluster.segment_tokens = 512;
    c.index.cluster.min_budget_tokens = 64;
    c.index.cluster.budget_fraction = 0.05f;
    c.index.cluster.outlier_fraction = 0.f;
    c.index.cluster.group_select = group_select;
    c.record_attended = true;
    auto rt = *Runtime::Create(c);
    auto seq = *rt->CreateSequence();
    std::mt19937 rng(11);
    const int64_t n = 2 * 512 + 2 + 16;  // two whole segments of cold rows
    std::vector<float> k, v, qf;
    auto kb = Random(rng, n * 32, DType::kF32, &k);
    auto vb = Random(rng, n * 32, DType::kF32, &v);
    auto qb = Random(rng, n * 4 * 32, DType::kF32, &qf);
    ASSERT_TRUE(rt->Prefill(seq, 0, qb.data(), kb.data(), vb.data(), n).ok());
    std::vector<float> q(4 * 32), out(4 * 32);
    for (auto& x : q) x = std::normal_distribution<float>(0.f, 2.f)(rng);
    ASSERT_TRUE(rt->Attend(seq, 0, q.data(), out.data()).ok());
    std::vector<std::vector<int64_t>> cold(4);
    std::vector<int64_t> uni;
    for (int h = 0; h < 4; ++h) {
      std::vector<int64_t> ids;
      ASSERT_TRUE(rt->GetAttended(seq, 0, h, &ids).ok());
      for (int64_t id : ids)
        if (id >= 2 && id < n - 16) cold[h].push_back(id);
      std::sort(cold[h].begin(), cold[h].end());
      // The clustered cold rows: at least the budget (5% of 1024, raised to 64) per head.
      EXPECT_GE(cold[h].size(), 64u);
      uni.insert(uni.end(), cold[h].begin(), cold[h].end());
    }
    std::sort(uni.begin(), uni.end());
    uni.erase(std::unique(uni.begin(), uni.end()), uni.end());
    if (group_select) {
      for (int h = 1; h < 4; ++h) EXPECT_EQ(cold[h], cold[0]) << "head " << h;
      union_group = uni.size();
    } else {
      union_per_head = uni.size();
    }
    for (float x : out) EXPECT_TRUE(std::isfinite(x));
  }
  EXPECT_GT(union_per_head, union_group);
}

TEST(RuntimeErrors, StatusesNameTheProblem) {
  RuntimeConfig c;
  c.num_q_heads = 6;
  c.num_kv_heads = 4;
  auto bad = Runtime::Create(c);
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("num_q_heads"), absl::string_view::npos);
  c.num_q_heads = 8;
  c.head_dim = 8;
  c.dtype = DType::kF32;
  auto rt = *Runtime::Create(c);
  auto seq = *rt->CreateSequence();
  float x[64] = {};
  EXPECT_EQ(rt->Attend(seq, 0, x, x).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(rt->Append(seq, 1, x, x, 1).code(), absl::StatusCode::kInvalidArgument);  // layer
  EXPECT_EQ(rt->Append(seq + 5, 0, x, x, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(rt->Append(seq, 0, x, x, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rt->Append(seq, 0, nullptr, x, 1).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(rt->Append(seq, 0, x, x, 1).ok());
  EXPECT_EQ(rt->Prefill(seq, 0, nullptr, x, x, 1).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(rt->ReleaseSequence(seq).ok());
  EXPECT_EQ(rt->ReleaseSequence(seq).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(rt->Stats().gpu_tokens, 0);
}

TEST(RuntimeConcurrency, SequencesOnManyThreadsAgreeWithSerial) {
  RuntimeConfig c;
  c.num_layers = 1;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.dtype = DType::kF32;
  c.sink_tokens = 2;
  c.window_tokens = 8;
  c.top_k = 4;
  c.index_kind = cpu_index::IndexKind::kFlat;
  c.worker_threads = 4;
  auto rt = *Runtime::Create(c);
  const int threads = 8, steps = 40;
  auto drive = [&](int t, std::vector<float>* outs) {
    std::mt19937 rng(100 + t);
    auto seq = *rt->CreateSequence();
    for (int s = 0; s < steps; ++s) {
      auto k = Random(rng, 32, DType::kF32, nullptr);
      auto v = Random(rng, 32, DType::kF32, nullptr);
      auto q = Random(rng, 64, DType::kF32, nullptr);
      std::vector<float> out(64);
      ASSERT_TRUE(rt->Append(seq, 0, k.data(), v.data(), 1).ok());
      ASSERT_TRUE(rt->Attend(seq, 0, q.data(), out.data()).ok());
      outs->insert(outs->end(), out.begin(), out.end());
    }
    ASSERT_TRUE(rt->ReleaseSequence(seq).ok());
  };
  std::vector<std::vector<float>> serial(threads), parallel(threads);
  for (int t = 0; t < threads; ++t) drive(t, &serial[t]);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(drive, t, &parallel[t]);
  for (auto& th : pool) th.join();
  for (int t = 0; t < threads; ++t) EXPECT_EQ(serial[t], parallel[t]) << "thread " << t;
  EXPECT_EQ(rt->Stats().sequences, 0);
  EXPECT_EQ(rt->Stats().host_tokens, 0);
}

}  // namespace
}  // namespace kvrt::runtime
