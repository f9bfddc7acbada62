// cluster kind (cluster.h): the row-order handshake with the store, exactness at the maximal
// budget, the estimate against a brute-force evaluation of its formula, incremental segments,
// outliers, group search, top-p, empty and tiny inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "oneapi/tbb/task_arena.h"
#include "tests/cpu_index/normal_vector.h"

namespace kvrt::cpu_index {
namespace {

constexpr int kDim = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Clustered keys (a few directions plus noise) so that k-means has structure to find.
void AppendRows(HeadStore* store, int64_t n, uint64_t seed, DType t = DType::kF32) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<std::vector<float>> dirs(12, std::vector<float>(kDim));
  for (auto& d : dirs)
    for (auto& x : d) x = 2.f * nd(rng);
  std::vector<float> k(static_cast<std::size_t>(n) * kDim), v(k.size());
  for (int64_t i = 0; i < n; ++i) {
    const auto& d = dirs[rng() % dirs.size()];
    for (int j = 0; j < kDim; ++j) {
      k[i * kDim + j] = d[j] + 0.5f * nd(rng);
      v[i * kDim + j] = nd(rng);
    }
  }
  std::vector<unsigned char> kb(k.size() * DTypeSize(t)), vb(kb.size());
  ConvertFromF32(k.data(), k.size(), t, kb.data());
  ConvertFromF32(v.data(), v.size(), t, vb.data());
  ASSERT_TRUE(store->Append(kb.data(), vb.data(), n, kDim).ok());
}

std::vector<float> RandomQuery(uint64_t seed, float sd = 1.f) {
  return testing::NormalVector(kDim, seed, sd);
}

// n queries [n, kDim], query i drawn with seed first_seed + i.
std::vector<float> RandomQueries(int n, uint64_t first_seed) {
  std::vector<float> qs;
  for (int i = 0; i < n; ++i) {
    const auto q = RandomQuery(first_seed + i);
    qs.insert(qs.end(), q.begin(), q.end());
  }
  return qs;
}

IndexConfig SmallConfig() {
  IndexConfig c;
  c.cluster.cluster_size = 8;
  c.cluster.segment_tokens = 256;
  c.cluster.budget_fraction = 0.f;
  c.cluster.min_budget_tokens = 0;
  c.cluster.outlier_fraction = 0.02f;
  return c;
}

std::vector<float> KeyRow(const HeadStore& s, int64_t r) {
  std::vector<float> k(s.dim());
  s.KeyF32(r, k.data());
  return k;
}

void ApplyOrder(KeyIndex* index, HeadStore* store, int64_t want_begin, int64_t want_n) {
  int64_t begin = -1;
  std::vector<int64_t> order;
  ASSERT_TRUE(index->TakeRowOrder(&begin, &order));
  EXPECT_EQ(begin, want_begin);
  ASSERT_EQ(static_cast<int64_t>(order.size()), want_n);
  ASSERT_TRUE(store->PermuteRows(begin, order).ok());
  EXPECT_FALSE(index->TakeRowOrder(&begin, &order));
}

// Clusters are contiguous row ranges whose mean key is the centroid (bf16 rounding).
void ExpectLayout(const ClusterSummary& s, const HeadStore& store) {
  std::set<int64_t> rows;
  for (int64_t c = 0; c < s.num_clusters(); ++c) {
    std::vector<double> mean(kDim, 0.0);
    for (int64_t r = s.begin[c]; r < s.begin[c] + s.size[c]; ++r) {
      EXPECT_TRUE(rows.insert(r).second);
      const auto k = KeyRow(store, r);
      for (int j = 0; j < kDim; ++j) mean[j] += k[j] / s.size[c];
    }
    for (int j = 0; j < kDim; ++j) {
      const float cj = Bf16ToF32(s.centroid[c * kDim + j]);
      ASSERT_NEAR(cj, mean[j], 1e-2 * (1 + std::fabs(mean[j]))) << "cluster " << c;
    }
  }
  for (int64_t r : s.outliers) EXPECT_TRUE(rows.insert(r).second);
}

TEST(HeadStorePermute, PermutesKeysAndValuesAndRejectsNonPermutations) {
  HeadStore s(kDim, DType::kF32);
  AppendRows(&s, 10, 1);
  std::vector<std::vector<float>> before;
  for (int64_t r = 0; r < 10; ++r) before.push_back(KeyRow(s, r));
  const std::vector<int64_t> order = {3, 0, 2, 1};
  ASSERT_TRUE(s.PermuteRows(4, order).ok());
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(KeyRow(s, 4 + i), before[4 + order[i]]);
  EXPECT_EQ(KeyRow(s, 0), before[0]);
  EXPECT_EQ(KeyRow(s, 9), before[9]);
  EXPECT_FALSE(s.PermuteRows(8, order).ok());      // past the end
  EXPECT_FALSE(s.PermuteRows(0, {0, 0, 1}).ok());  // duplicate
  EXPECT_FALSE(s.PermuteRows(0, {0, 5}).ok());     // out of range
  EXPECT_TRUE(s.PermuteRows(3, {}).ok());
}

TEST(ClusterIndex, KindNameAndFactory) {
  EXPECT_STREQ(IndexKindName(IndexKind::kCluster), "cluster");
  EXPECT_EQ(ParseIndexKind("cluster").value(), IndexKind::kCluster);
  auto index = MakeIndex(IndexKind::kCluster, SmallConfig(), kDim).value();
  EXPECT_EQ(index->kind(), IndexKind::kCluster);
  EXPECT_NE(GetClusterSummary(*index), nullptr);
  auto flat = MakeIndex(IndexKind::kFlat, {}, kDim).value();
  EXPECT_EQ(GetClusterSummary(*flat), nullptr);
}

TEST(ClusterIndex, HandshakeLayoutAndExactAtMaximalBudget) {
  for (bool query_aware : {false, true}) {
    HeadStore store(kDim, DType::kBF16);
    AppendRows(&store, 3 * 256 + 100, 2, DType::kBF16);
    IndexConfig cfg = SmallConfig();
    cfg.cluster.query_aware = query_aware;
    const std::vector<float> qs = RandomQueries(64, 100);
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, qs.data(), 64).ok());
    EXPECT_EQ(index->size(), 768);
    ApplyOrder(index.get(), &store, 0, 768);
    const ClusterSummary& s = *GetClusterSummary(*index);
    ExpectLayout(s, store);
    EXPECT_EQ(static_cast<int64_t>(s.outliers.size()), 3 * 5);  // 2% of 256 per segment
    EXPECT_GT(index->MemoryBytes(), 0u);

    // Budget >= n: every covered row comes back, no estimate, and merging the uncovered rows
    // gives exact attention over the store.
    const auto q = RandomQuery(7, 0.5f);
    SearchParams p;
    p.k = 1 << 20;
    SearchResult r;
    ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
    std::vector<int64_t> ids = r.ids;
    std::sort(ids.begin(), ids.end());
    std::vector<int64_t> all(768);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(ids, all);
    EXPECT_EQ(r.est_lse, kNegInf);
    EXPECT_TRUE(r.est_o.empty());
    EXPECT_EQ(r.scanned, s.num_clusters() + static_cast<int64_t>(s.outliers.size()));
    const float scale = 1.f / std::sqrt(float(kDim));
    std::vector<float> o(kDim), o2(kDim), ref(kDim);
    float lse, lse2, lse_ref;
    AttendStoreRows(q.data(), scale, store, r.ids.data(), r.ids.size(), o.data(), &lse);
    std::vector<int64_t> rest(store.size() - 768);
    std::iota(rest.begin(), rest.end(), 768);
    AttendStoreRows(q.data(), scale, store, rest.data(), rest.size(), o2.data(), &lse2);
    MergeInto(o.data(), &lse, o2.data(), lse2, kDim);
    AttendStoreAll(q.data(), scale, store, ref.data(), &lse_ref);
    EXPECT_NEAR(lse, lse_ref, 1e-4);
    for (int j = 0; j < kDim; ++j) EXPECT_NEAR(o[j], ref[j], 1e-4);
  }
}

TEST(ClusterIndex, EstimateMatchesBruteForceOfItsFormula) {
  for (float spread_weight : {0.f, 1.f}) {
    HeadStore store(kDim, DType::kF32);
    AppendRows(&store, 512, 3);
    IndexConfig cfg = SmallConfig();
    cfg.cluster.spread_weight = spread_weight;
    cfg.cluster.scale = 0.2f;
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
    ApplyOrder(index.get(), &store, 0, 512);
    const ClusterSummary& s = *GetClusterSummary(*index);
    const auto q = RandomQuery(11, 0.7f);
    SearchParams p;
    p.k = 40;
    SearchResult r;
    ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
    ASSERT_EQ(static_cast<int>(r.est_o.size()), kDim);
    std::set<int64_t> got(r.ids.begin(), r.ids.end());
    // Brute force over clusters none of whose rows came back.
    double qn2 = 0;
    for (float x : q) qn2 += double(x) * x;
    std::vector<double> lm;
    std::vector<int64_t> unsel;
    int64_t sel_tokens = 0;
    for (int64_t c = 0; c < s.num_clusters(); ++c) {
      if (got.count(s.begin[c])) {
        sel_tokens += s.size[c];
        continue;
      }
      double dot = 0;
      for (int j = 0; j < kDim; ++j) dot += double(q[j]) * Bf16ToF32(s.centroid[c * kDim + j]);
      lm.push_back(0.2 * dot + spread_weight * 0.5 * 0.04 * qn2 * s.spread[c] +
                   std::log(double(s.size[c])));
      unsel.push_back(c);
    }
    EXPECT_GE(sel_tokens, 40);
    EXPECT_EQ(static_cast<int64_t>(r.ids.size()),
              sel_tokens + static_cast<int64_t>(s.outliers.size()));
    const double m = *std::max_element(lm.begin(), lm.end());
    double l = 0;
    std::vector<double> o(kDim, 0.0);
    for (std::size_t i = 0; i < lm.size(); ++i) {
      const double w = std::exp(lm[i] - m);
      l += w;
      for (int j = 0; j < kDim; ++j) o[j] += w * Bf16ToF32(s.value_mean[unsel[i] * kDim + j]);
    }
    EXPECT_NEAR(r.est_lse, m + std::log(l), 1e-4 * (1 + std::fabs(m)));
    for (int j = 0; j < kDim; ++j) EXPECT_NEAR(r.est_o[j], o[j] / l, 1e-5);
  }
}

TEST(ClusterIndex, SelectionTakesTheDensestClustersFirst) {
  HeadStore store(kDim, DType::kF32);
  AppendRows(&store, 512, 4);
  IndexConfig cfg = SmallConfig();
  cfg.cluster.spread_weight = 0.f;
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  ApplyOrder(index.get(), &store, 0, 512);
  const ClusterSummary& s = *GetClusterSummary(*index);
  const auto q = RandomQuery(5);
  std::vector<float> scores(s.num_clusters()), dens(s.num_clusters());
  for (int64_t c = 0; c < s.num_clusters(); ++c) {
    float a = 0;
    for (int j = 0; j < kDim; ++j) a += q[j] * Bf16ToF32(s.centroid[c * kDim + j]);
    scores[c] = a;
  }
  ClusterDensity(s, scores.data(), 1.f, 0.125f, 0.f, dens.data());
  std::vector<int32_t> sel;
  const int64_t tokens = SelectClusters(s, dens.data(), 50, 0.f, &sel);
  ASSERT_FALSE(sel.empty());
  EXPECT_GE(tokens, 50);
  EXPECT_LT(tokens - s.size[sel.back()], 50);  // shortest prefix
  float worst_sel = std::numeric_limits<float>::infinity();
  for (int32_t c : sel) worst_sel = std::min(worst_sel, dens[c]);
  for (int64_t c = 0; c < s.num_clusters(); ++c)
    if (std::find(sel.begin(), sel.end(), c) == sel.end()) {
      EXPECT_LE(dens[c], worst_sel);
    }
  // top-p: a tiny share stops after the first cluster.
  SelectClusters(s, dens.data(), 1 << 20, 1e-9f, &sel);
  EXPECT_EQ(sel.size(), 1u);
  // Budget 0 selects nothing; the estimate then covers every cluster.
  EXPECT_EQ(SelectClusters(s, dens.data(), 0, 0.f, &sel), 0);
  std::vector<float> o(kDim);
  float lse;
  EstimateUnselected(s, dens.data(), sel, o.data(), &lse);
  EXPECT_TRUE(std::isfinite(lse));
}

// The group's estimate (one pass over the value means for the q heads of a kv head) is each
// query's own, bit for bit: a query whose densities are all -inf (nothing to estimate), one with a
// cluster the others have (-inf there: it adds nothing), a budget of nothing and of some clusters.
TEST(ClusterIndex, GroupEstimateIsEachQuerysOwn) {
  HeadStore store(kDim, DType::kF32);
  AppendRows(&store, 512, 31);
  auto index = MakeIndex(IndexKind::kCluster, SmallConfig(), kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  ApplyOrder(index.get(), &store, 0, 512);
  const ClusterSummary& s = *GetClusterSummary(*index);
  const int64_t c = s.num_clusters();
  const int nq = 4;
  std::vector<float> dens(static_cast<std::size_t>(nq) * c);
  for (int h = 0; h < nq; ++h) {
    const auto q = RandomQuery(40 + h);
    std::vector<float> scores(c);
    for (int64_t j = 0; j < c; ++j) {
      float a = 0;
      for (int t = 0; t < kDim; ++t) a += q[t] * Bf16ToF32(s.centroid[j * kDim + t]);
      scores[j] = a;
    }
    ClusterDensity(s, scores.data(), 1.f, 0.125f, 1.f, dens.data() + h * c);
  }
  std::fill(dens.begin() + 2 * c, dens.begin() + 3 * c, -std::numeric_limits<float>::infinity());
  dens[3 * c + 1] = -std::numeric_limits<float>::infinity();
  const std::vector<float> log_size = LogSizes(s);
  for (const int64_t budget : {int64_t{0}, int64_t{60}}) {
    std::vector<int32_t> sel;
    SelectClusters(s, dens.data(), budget, 0.f, &sel);
    std::vector<float> o(static_cast<std::size_t>(nq) * kDim, 7.f), lse(nq, 7.f);
    EstimateUnselectedGroup(s, dens.data(), nq, sel, log_size.data(), o.data(), lse.data());
    for (int h = 0; h < nq; ++h) {
      std::vector<float> o1(kDim, 5.f);
      float lse1 = 5.f;
      EstimateUnselected(s, dens.data() + h * c, sel, o1.data(), &lse1);
      EXPECT_EQ(std::vector<float>(o.begin() + h * kDim, o.begin() + (h + 1) * kDim), o1)
          << "budget " << budget << " query " << h;
      EXPECT_EQ(std::memcmp(&lse[h], &lse1, sizeof(float)), 0) << "budget " << budget;
    }
    EXPECT_EQ(lse[2], -std::numeric_limits<float>::infinity());
  }
}

// A summary past one wave of the estimate's parallel blocks (kEstimateBlock x kEstimateWave =
// 16384 clusters), with a width past the 16-lane chunks and a group past the 4-head kernel: the
// estimate is each query's own, bit for bit, and the same with 1 and 3 threads (its blocks run in
// parallel and are summed in block order).
TEST(ClusterIndex, EstimateOverManyBlocksIsEachQuerysOwnOnAnyThreadCount) {
  constexpr int kWide = 72;
  constexpr int64_t kClusters = 16384 + 3000;
  ClusterSummary s;
  s.dim = kWide;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> g(0.f, 1.f);
  std::uniform_int_distribution<int> sizes(1, 30);
  for (int64_t j = 0; j < kClusters; ++j) {
    s.begin.push_back(j * 32);
    s.size.push_back(j % 97 == 5 ? 0 : sizes(rng));  // some padding clusters
    s.spread.push_back(0.1f);
    for (int t = 0; t < kWide; ++t) {
      s.centroid.push_back(F32ToBf16(g(rng)));
      s.value_mean.push_back(F32ToBf16(g(rng)));
    }
  }
  const int nq = 6;
  std::vector<float> dens(static_cast<std::size_t>(nq) * kClusters);
  for (auto& x : dens) x = 3.f * g(rng);
  for (int64_t j = 0; j < kClusters; j += 7) dens[4 * kClusters + j] = -INFINITY;
  std::vector<int32_t> sel;
  SelectClusters(s, dens.data(), 2000, 0.f, &sel);
  const std::vector<float> log_size = LogSizes(s);
  auto run = [&](int threads, std::vector<float>* o, std::vector<float>* lse) {
    o->assign(static_cast<std::size_t>(nq) * kWide, 7.f);
    lse->assign(nq, 7.f);
    tbb::task_arena arena(threads);
    arena.execute([&] {
      EstimateUnselectedGroup(s, dens.data(), nq, sel, log_size.data(), o->data(), lse->data());
    });
  };
  std::vector<float> o1, l1, o3, l3;
  run(1, &o1, &l1);
  run(3, &o3, &l3);
  EXPECT_EQ(std::memcmp(o1.data(), o3.data(), o1.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(l1.data(), l3.data(), l1.size() * sizeof(float)), 0);
  for (int h = 0; h < nq; ++h) {
    std::vector<float> o(kWide);
    float lse = 0.f;
    EstimateUnselected(s, dens.data() + h * kClusters, sel, o.data(), &lse);
    EXPECT_EQ(std::memcmp(o.data(), o3.data() + h * kWide, kWide * sizeof(float)), 0)
        << "query " << h;
    EXPECT_EQ(std::memcmp(&lse, &l3[h], sizeof(float)), 0) << "query " << h;
    EXPECT_TRUE(std::isfinite(lse));
  }
}

// The build's products with the prompt's queries run in fixed blocks on the workers (the metric's
// Gram matrix, the keys' map, the calibration's blocks of clusters): with 1 and 3 threads the
// factor, the clustering and the calibrated spreads are the same bit for bit, at sizes past one
// block of each (576 dims: nine row blocks of M; 1500 keys: six map blocks, two calibration ones).
TEST(ClusterSegment, QueryMetricBuildIsTheSameOnAnyThreadCount) {
  const int d = 576;
  const int64_t n = 1500, nq = 300;
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n * d), v(n * d), q(nq * d);
  for (auto* x : {&k, &v, &q})
    for (auto& e : *x) e = nd(rng);
  for (int64_t i = 0; i < nq; ++i) q[i * d + i % 7] += 4.f;  // an anisotropic metric
  ClusterConfig cfg;
  cfg.cluster_size = 16;
  struct Built {
    std::vector<float> l;
    SegmentClustering part;
  };
  auto build = [&](int threads) {
    Built b;
    tbb::task_arena arena(threads);
    arena.execute([&] {
      b.l = QueryMetricFactor(q.data(), nq, d, 4096);
      ClusterSegment(k.data(), v.data(), n, d, b.l.data(), cfg, 5, &b.part);
      CalibrateSpreads(k.data(), n, d, q.data(), nq, 0.05f, 1.f, &b.part);
    });
    return b;
  };
  const Built one = build(1), three = build(3);
  ASSERT_EQ(one.l.size(), three.l.size());
  EXPECT_EQ(std::memcmp(one.l.data(), three.l.data(), one.l.size() * sizeof(float)), 0);
  EXPECT_FALSE(std::equal(one.l.begin(), one.l.end(), QueryMetricFactor(nullptr, 0, d, 1).begin()))
      << "the queries shape the metric";
  EXPECT_EQ(one.part.order, three.part.order);
  EXPECT_EQ(one.part.size, three.part.size);
  ASSERT_EQ(one.part.spread.size(), three.part.spread.size());
  EXPECT_EQ(std::memcmp(one.part.spread.data(), three.part.spread.data(),
                        one.part.spread.size() * sizeof(float)),
            0);
  EXPECT_EQ(std::memcmp(one.part.centroid.data(), three.part.centroid.data(),
                        one.part.centroid.size() * sizeof(float)),
            0);
  int positive = 0;
  for (float sp : one.part.spread) positive += sp > 0.f;
  EXPECT_GT(positive, 0) << "the calibration ran";
}

// Segments clustered outside the index (the GPU build) are taken as they are: a preset of the
// parts ClusterSegment itself computes gives the same summary and order as the index's own build,
// for the segments preset (here the first two of three; the third it clusters itself).
TEST(ClusterIndex, PresetSegmentsAreTakenAsTheyAre) {
  HeadStore own_store(kDim, DType::kF32), preset_store(kDim, DType::kF32);
  AppendRows(&own_store, 3 * 256, 21);
  AppendRows(&preset_store, 3 * 256, 21);
  const IndexConfig cfg = SmallConfig();
  const std::vector<float> metric = QueryMetricFactor(nullptr, 0, kDim, 0);
  std::vector<SegmentClustering> parts(2);
  for (int s = 0; s < 2; ++s) {
    std::vector<float> k(256 * kDim), v(k.size());
    for (int64_t r = 0; r < 256; ++r) {
      preset_store.KeyF32(s * 256 + r, k.data() + r * kDim);
      ConvertToF32(preset_store.value(s * 256 + r), DType::kF32, kDim, v.data() + r * kDim);
    }
    ClusterSegment(k.data(), v.data(), 256, kDim, metric.data(), cfg.cluster,
                   cfg.cluster.seed + static_cast<uint64_t>(s) * 256, &parts[s]);
    // Marked so that the test sees the preset was used, not recomputed: the spread is only
    // copied into the summary.
    for (float& x : parts[s].spread) x += 1000.f;
  }
  auto own = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  auto preset = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(PresetSegments(preset.get(), 0, parts).ok());
  ASSERT_TRUE(own->Build(own_store, nullptr, 0).ok());
  ASSERT_TRUE(preset->Build(preset_store, nullptr, 0).ok());
  ApplyOrder(own.get(), &own_store, 0, 768);
  ApplyOrder(preset.get(), &preset_store, 0, 768);
  const ClusterSummary& a = *GetClusterSummary(*own);
  const ClusterSummary& b = *GetClusterSummary(*preset);
  EXPECT_EQ(a.begin, b.begin);
  EXPECT_EQ(a.size, b.size);
  EXPECT_EQ(a.centroid, b.centroid);
  EXPECT_EQ(a.outliers, b.outliers);
  const int64_t preset_clusters =
      static_cast<int64_t>(parts[0].size.size() + parts[1].size.size());
  for (int64_t c = 0; c < a.num_clusters(); ++c)
    EXPECT_FLOAT_EQ(b.spread[c], a.spread[c] + (c < preset_clusters ? 1000.f : 0.f)) << c;
  for (int64_t r = 0; r < 768; ++r) EXPECT_EQ(KeyRow(own_store, r), KeyRow(preset_store, r));

  // Refused: another kind, a start that is not the next segment, a part of the wrong size.
  auto flat = MakeIndex(IndexKind::kFlat, cfg, kDim).value();
  EXPECT_EQ(PresetSegments(flat.get(), 0, parts).code(), absl::StatusCode::kInvalidArgument);
  auto fresh = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  EXPECT_EQ(PresetSegments(fresh.get(), 256, parts).code(), absl::StatusCode::kInvalidArgument);
  parts[1].order.pop_back();
  EXPECT_EQ(PresetSegments(fresh.get(), 0, parts).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClusterIndex, IncrementalSegmentsKeepEarlierRows) {
  HeadStore store(kDim, DType::kF32);
  AppendRows(&store, 300, 5);
  auto index = MakeIndex(IndexKind::kCluster, SmallConfig(), kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  EXPECT_EQ(index->size(), 256);
  ApplyOrder(index.get(), &store, 0, 256);
  const int64_t c1 = GetClusterSummary(*index)->num_clusters();
  std::vector<std::vector<float>> first;
  for (int64_t r = 0; r < 256; ++r) first.push_back(KeyRow(store, r));

  AppendRows(&store, 200, 6);  // 500 rows: still one segment
  ASSERT_TRUE(index->Add(store).ok());
  EXPECT_EQ(index->size(), 256);
  int64_t b;
  std::vector<int64_t> order;
  EXPECT_FALSE(index->TakeRowOrder(&b, &order));

  AppendRows(&store, 600, 7);  // 1100 rows: segments 2..4 (rows 256..1024)
  ASSERT_TRUE(index->Add(store).ok());
  EXPECT_EQ(index->size(), 1024);
  ApplyOrder(index.get(), &store, 256, 768);
  for (int64_t r = 0; r < 256; ++r) EXPECT_EQ(KeyRow(store, r), first[r]);
  const ClusterSummary& s = *GetClusterSummary(*index);
  EXPECT_GT(s.num_clusters(), 3 * c1);
  ExpectLayout(s, store);
  for (int64_t c = c1; c < s.num_clusters(); ++c) EXPECT_GE(s.begin[c], 256);

  // Two Adds before the caller takes the order: one permutation covering both.
  auto index2 = MakeIndex(IndexKind::kCluster, SmallConfig(), kDim).value();
  HeadStore store2(kDim, DType::kF32);
  AppendRows(&store2, 256, 8);
  ASSERT_TRUE(index2->Build(store2, nullptr, 0).ok());
  AppendRows(&store2, 512, 9);
  ASSERT_TRUE(index2->Add(store2).ok());
  ApplyOrder(index2.get(), &store2, 0, 768);
  ExpectLayout(*GetClusterSummary(*index2), store2);
}

TEST(ClusterIndex, OutliersAreAlwaysReturned) {
  HeadStore store(kDim, DType::kF32);
  AppendRows(&store, 256, 10);
  // Needles: far from every cluster.
  std::vector<float> needle(kDim, 0.f), zero(kDim, 0.f);
  const std::vector<int64_t> needle_rows = {256, 257, 258};
  for (int i = 0; i < 3; ++i) {
    std::fill(needle.begin(), needle.end(), 0.f);
    needle[i] = 40.f;
    ASSERT_TRUE(store.Append(needle.data(), zero.data(), 1, kDim).ok());
  }
  AppendRows(&store, 253, 11);
  IndexConfig cfg = SmallConfig();
  cfg.cluster.segment_tokens = 512;
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  int64_t b;
  std::vector<int64_t> order;
  ASSERT_TRUE(index->TakeRowOrder(&b, &order));
  ASSERT_TRUE(store.PermuteRows(b, order).ok());
  const ClusterSummary& s = *GetClusterSummary(*index);
  // Each needle is an outlier or a singleton cluster (scored exactly through its centroid).
  std::set<int64_t> exact_old;
  for (int64_t r : s.outliers) exact_old.insert(order[r]);
  for (int64_t c = 0; c < s.num_clusters(); ++c)
    if (s.size[c] == 1) exact_old.insert(order[s.begin[c]]);
  for (int64_t r : needle_rows) EXPECT_TRUE(exact_old.count(r)) << r;
  EXPECT_EQ(s.outliers.size(), 10u);
  SearchParams p;
  p.k = 1;
  SearchResult r;
  const auto q = RandomQuery(12);
  ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
  for (int64_t o : s.outliers) EXPECT_NE(std::find(r.ids.begin(), r.ids.end(), o), r.ids.end());
  // A query along a needle finds it at the smallest budget.
  for (int i = 0; i < 3; ++i) {
    std::vector<float> qn(kDim, 0.f);
    qn[i] = 1.f;
    ASSERT_TRUE(index->Search(store, qn.data(), p, &r).ok());
    bool found = false;
    for (int64_t id : r.ids) found |= order[id] == needle_rows[i];
    EXPECT_TRUE(found) << i;
  }
}

// Without group_select a group's search is each query's own, also when the group's queries are
// scored in one pass (the second stage on codes, and the selection on codes, which scores every
// cluster's rows for all the group's queries at once), and with the summary's products on the AMX
// tiles (IndexConfig::host_tiles, where they run).
TEST(ClusterIndex, GroupSearchEqualsPerQuerySearch) {
  for (const bool tiles : {false, true}) {
    SCOPED_TRACE(tiles ? "on the tiles" : "f32 loops");
    struct Mode {
      const char* name;
      float rescore;
      int bits;
      int value_bits = 0;
    };
    for (const Mode m : {Mode{"centroids", 0.f, 0}, Mode{"two stages on codes", 3.f, 2},
                         Mode{"selection on codes", 0.f, 2}, Mode{"on 4-bit codes", 0.f, 4},
                         Mode{"and the rest on value codes", 0.f, 2, 2}}) {
      SCOPED_TRACE(m.name);
      HeadStore store(kDim, DType::kBF16);
      AppendRows(&store, 1024, 13, DType::kBF16);
      IndexConfig cfg = SmallConfig();
      cfg.host_tiles = tiles;
      cfg.cluster.rescore = m.rescore;
      cfg.cluster.rescore_bits = m.bits;
      cfg.cluster.value_bits = m.value_bits;
      auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
      ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
      ApplyOrder(index.get(), &store, 0, 1024);
      for (int nq : {4, 6}) {  // 6: the four-query passes' second pass is partial
        const std::vector<float> qs = RandomQueries(nq, 20);
        SearchParams p;
        p.k = 64;
        std::vector<SearchResult> g(nq);
        ASSERT_TRUE(index->SearchGroup(store, qs.data(), nq, p, g.data()).ok());
        for (int i = 0; i < nq; ++i) {
          SearchResult r;
          ASSERT_TRUE(index->Search(store, qs.data() + i * kDim, p, &r).ok());
          EXPECT_EQ(r.ids, g[i].ids);
          EXPECT_EQ(r.scanned, g[i].scanned);
          EXPECT_NEAR(r.est_lse, g[i].est_lse, 1e-4);
          EXPECT_EQ(r.est_o, g[i].est_o);
        }
      }
    }
  }
}

// A group selection's result r for query q (the group's rows, sorted: `rows`) holds q's own
// estimate: EstimateUnselected over the clusters none of the rows belong to, from q's densities
// computed here one cluster at a time.
void ExpectOwnEstimate(const ClusterSummary& s, const IndexConfig& cfg, const float* q,
                       const std::vector<int64_t>& rows, const SearchResult& r, int query) {
  std::vector<int32_t> sel;
  for (int64_t j = 0; j < s.num_clusters(); ++j)
    if (std::binary_search(rows.begin(), rows.end(), s.begin[j])) sel.push_back(j);
  std::vector<float> scores(s.num_clusters()), dens(s.num_clusters());
  float qn2 = 0;
  for (int t = 0; t < kDim; ++t) qn2 += q[t] * q[t];
  for (int64_t j = 0; j < s.num_clusters(); ++j) {
    float a = 0;
    for (int t = 0; t < kDim; ++t) a += q[t] * Bf16ToF32(s.centroid[j * kDim + t]);
    scores[j] = a;
  }
  ClusterDensity(s, scores.data(), qn2,
                 cfg.cluster.scale != 0.f ? cfg.cluster.scale : 1.f / std::sqrt(float(kDim)),
                 cfg.cluster.spread_weight, dens.data());
  std::vector<float> eo(kDim);
  float lse;
  EstimateUnselected(s, dens.data(), sel, eo.data(), &lse);
  EXPECT_NEAR(lse, r.est_lse, 1e-3) << "query " << query;
  ASSERT_EQ(r.est_o.size(), static_cast<std::size_t>(kDim)) << "query " << query;
  for (int t = 0; t < kDim; ++t) EXPECT_NEAR(eo[t], r.est_o[t], 1e-3) << "query " << query;
}

// group_select: one list of rows for the group (the same outliers, the same clusters), at most
// the budget plus one cluster; each query's estimate is its own (the exact formula over the
// clusters it did not get); a group of one searches as Search does; a budget covering every
// cluster leaves no estimate.
TEST(ClusterIndex, GroupSelectionSharesOneSelection) {
  HeadStore store(kDim, DType::kBF16);
  AppendRows(&store, 1024, 13, DType::kBF16);
  IndexConfig cfg = SmallConfig();
  cfg.cluster.group_select = true;
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  ApplyOrder(index.get(), &store, 0, 1024);
  const std::vector<float> qs = RandomQueries(4, 30);
  SearchParams p;
  p.k = 64;
  std::vector<SearchResult> g(4);
  ASSERT_TRUE(index->SearchGroup(store, qs.data(), 4, p, g.data()).ok());
  const ClusterSummary& s = *GetClusterSummary(*index);
  std::vector<int64_t> sorted0 = g[0].ids;
  std::sort(sorted0.begin(), sorted0.end());
  for (int i = 1; i < 4; ++i) {
    std::vector<int64_t> si = g[i].ids;
    std::sort(si.begin(), si.end());
    EXPECT_EQ(si, sorted0) << "query " << i;
  }
  const int64_t cluster_rows = static_cast<int64_t>(g[0].ids.size() - s.outliers.size());
  int max_size = 0;
  for (int32_t n : s.size) max_size = std::max(max_size, n);
  EXPECT_GE(cluster_rows, 64);
  EXPECT_LT(cluster_rows, 64 + max_size);
  // Each query's estimate: EstimateUnselected over the clusters none of the rows belong to.
  for (int i = 0; i < 4; ++i) ExpectOwnEstimate(s, cfg, qs.data() + i * kDim, sorted0, g[i], i);
  // A group of one: Search's result.
  SearchResult one, alone;
  ASSERT_TRUE(index->SearchGroup(store, qs.data(), 1, p, &one).ok());
  ASSERT_TRUE(index->Search(store, qs.data(), p, &alone).ok());
  EXPECT_EQ(one.ids, alone.ids);
  // Every cluster selected: every row, no estimate.
  p.k = 1 << 20;
  ASSERT_TRUE(index->SearchGroup(store, qs.data(), 4, p, g.data()).ok());
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(g[i].ids.size(), 1024u);
    EXPECT_EQ(g[i].est_lse, -std::numeric_limits<float>::infinity());
  }
}

// A wide group (an MQA model's 48 queries over one kv head, the step's only unit) is searched in
// parallel over chunks of clusters and over its queries: without group_select each query's result
// is its own Search's; with it every query holds the group's rows and its own estimate, and a
// second search gives the same results.
TEST(ClusterIndex, WideGroupSearchMatchesItsSerialForm) {
  for (bool group : {false, true}) {
    SCOPED_TRACE(group ? "group_select" : "per query");
    HeadStore store(kDim, DType::kBF16);
    AppendRows(&store, 8192, 17, DType::kBF16);
    IndexConfig cfg = SmallConfig();
    cfg.cluster.group_select = group;
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
    ApplyOrder(index.get(), &store, 0, 8192);
    const ClusterSummary& s = *GetClusterSummary(*index);
    ASSERT_GT(s.num_clusters(), 512);  // more than one chunk of clusters
    const int nq = 48;
    const std::vector<float> qs = RandomQueries(nq, 40);
    SearchParams p;
    p.k = 256;
    std::vector<SearchResult> g(nq), again(nq);
    ASSERT_TRUE(index->SearchGroup(store, qs.data(), nq, p, g.data()).ok());
    ASSERT_TRUE(index->SearchGroup(store, qs.data(), nq, p, again.data()).ok());
    std::vector<int64_t> rows0 = g[0].ids;
    std::sort(rows0.begin(), rows0.end());
    for (int i = 0; i < nq; ++i) {
      EXPECT_EQ(g[i].ids, again[i].ids) << i;
      EXPECT_EQ(g[i].est_o, again[i].est_o) << i;
      if (!group) {
        SearchResult r;
        ASSERT_TRUE(index->Search(store, qs.data() + i * kDim, p, &r).ok());
        EXPECT_EQ(r.ids, g[i].ids) << i;
        EXPECT_EQ(r.scanned, g[i].scanned) << i;
        EXPECT_NEAR(r.est_lse, g[i].est_lse, 1e-4) << i;
        EXPECT_EQ(r.est_o, g[i].est_o) << i;
      } else {
        std::vector<int64_t> rows = g[i].ids;
        std::sort(rows.begin(), rows.end());
        EXPECT_EQ(rows, rows0) << i;
        ExpectOwnEstimate(s, cfg, qs.data() + i * kDim, rows0, g[i], i);
      }
    }
  }
}

// scale x q . key(row), in double (the brute-force side of the two-stage tests).
double ScaledScore(const HeadStore& store, const std::vector<float>& q, int64_t row, double scale) {
  const auto k = KeyRow(store, row);
  double a = 0;
  for (int j = 0; j < kDim; ++j) a += double(q[j]) * k[j];
  return scale * a;
}

// A cluster index of cfg over 1024 rows (seed 21) appended to *store, built, and its row order
// applied to the store (the two-stage tests compare an index with a plain one on the same rows).
std::unique_ptr<KeyIndex> BuildOrdered(const IndexConfig& cfg, HeadStore* store) {
  AppendRows(store, 1024, 21);
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  EXPECT_TRUE(index->Build(*store, nullptr, 0).ok());
  ApplyOrder(index.get(), store, 0, 1024);
  return index;
}

// Two-stage selection (ClusterConfig::rescore): the kept rows are the budget's best by exact score
// among the candidate clusters' rows, and the estimate is the unselected clusters' merged with the
// candidates' rest, whose mass is exact.
TEST(ClusterIndex, RescoreKeepsTheBestCandidateRowsAndTheRestsExactMass) {
  IndexConfig cfg = SmallConfig();
  cfg.cluster.rescore = 3.f;
  cfg.cluster.scale = 0.2f;
  HeadStore store(kDim, DType::kF32);
  auto index = BuildOrdered(cfg, &store);
  const ClusterSummary& s = *GetClusterSummary(*index);
  const auto q = RandomQuery(23, 0.7f);
  SearchParams p;
  p.k = 40;
  SearchResult r;
  ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
  const std::size_t no = s.outliers.size();
  ASSERT_EQ(r.ids.size(), no + 40);  // the budget exactly: rows, not whole clusters
  const std::set<int64_t> outliers(s.outliers.begin(), s.outliers.end());
  // The candidates: the clusters that the plain selection takes at 3 x the budget.
  IndexConfig plain_cfg = cfg;
  plain_cfg.cluster.rescore = 0.f;
  HeadStore plain_store(kDim, DType::kF32);
  auto plain = BuildOrdered(plain_cfg, &plain_store);
  SearchParams p3 = p;
  p3.k = 120;
  SearchResult cand;
  ASSERT_TRUE(plain->Search(plain_store, q.data(), p3, &cand).ok());
  std::vector<int64_t> cand_rows;
  for (int64_t id : cand.ids)
    if (!outliers.count(id)) cand_rows.push_back(id);
  ASSERT_GE(cand_rows.size(), 120u);
  EXPECT_EQ(r.scanned,
            s.num_clusters() + static_cast<int64_t>(no) + static_cast<int64_t>(cand_rows.size()));
  auto score = [&](int64_t row) { return ScaledScore(store, q, row, 0.2); };
  std::sort(cand_rows.begin(), cand_rows.end(), [&](int64_t a, int64_t b) {
    return score(a) > score(b) || (score(a) == score(b) && a < b);
  });
  const std::vector<int64_t> want(cand_rows.begin(), cand_rows.begin() + 40);
  const std::vector<int64_t> got(r.ids.begin() + static_cast<std::ptrdiff_t>(no), r.ids.end());
  EXPECT_EQ(got, want);  // best first
  // The estimate: the clusters outside the candidates (plain's estimate at 3 x the budget) merged
  // with the rest of the candidates at its exact mass.
  double m = -INFINITY;
  for (std::size_t i = 40; i < cand_rows.size(); ++i) m = std::max(m, score(cand_rows[i]));
  double l = 0;
  for (std::size_t i = 40; i < cand_rows.size(); ++i) l += std::exp(score(cand_rows[i]) - m);
  const double rest_lse = m + std::log(l);
  const double want_lse = std::log(std::exp(double(cand.est_lse)) + std::exp(rest_lse));
  EXPECT_NEAR(r.est_lse, want_lse, 1e-4 * (1 + std::fabs(want_lse)));
  // Its value: each candidate's rest at its exact mass with the rest's mean value (the method
  // derives that mean from the bf16 value mean, hence the tolerance).
  std::vector<float> want_o(cand.est_o.begin(), cand.est_o.end());
  float want_l = cand.est_lse;
  const std::set<int64_t> kept(want.begin(), want.end());
  for (int64_t c = 0; c < s.num_clusters(); ++c) {
    std::vector<int64_t> rest;
    for (int64_t row = s.begin[c]; row < s.begin[c] + s.size[c]; ++row)
      if (std::count(cand_rows.begin(), cand_rows.end(), row) && !kept.count(row))
        rest.push_back(row);
    if (rest.empty()) continue;
    std::vector<float> mean(kDim, 0.f), v(kDim);
    double lm = -INFINITY, ll = 0;
    for (int64_t row : rest) {
      ConvertToF32(store.value(row), DType::kF32, kDim, v.data());
      for (int j = 0; j < kDim; ++j) mean[j] += v[j] / rest.size();
      lm = std::max(lm, score(row));
    }
    for (int64_t row : rest) ll += std::exp(score(row) - lm);
    MergeInto(want_o.data(), &want_l, mean.data(), static_cast<float>(lm + std::log(ll)), kDim);
  }
  EXPECT_NEAR(want_l, want_lse, 1e-4 * (1 + std::fabs(want_lse)));
  ASSERT_EQ(r.est_o.size(), static_cast<std::size_t>(kDim));
  for (int j = 0; j < kDim; ++j) EXPECT_NEAR(r.est_o[j], want_o[j], 0.02) << j;
}

// The second stage at the granularity of clusters (ClusterConfig::rescore_clusters): whole
// candidate clusters by exact mass per row until the budget's rows, the other candidates in the
// estimate at their exact mass.
TEST(ClusterIndex, RescoreClustersKeepsWholeCandidatesByExactMassPerRow) {
  IndexConfig cfg = SmallConfig();
  cfg.cluster.rescore = 3.f;
  cfg.cluster.rescore_clusters = true;
  cfg.cluster.scale = 0.2f;
  HeadStore store(kDim, DType::kF32), plain_store(kDim, DType::kF32);
  auto index = BuildOrdered(cfg, &store);
  const ClusterSummary& s = *GetClusterSummary(*index);
  IndexConfig plain_cfg = cfg;
  plain_cfg.cluster.rescore = 0.f;
  auto plain = BuildOrdered(plain_cfg, &plain_store);  // the same rows: the same clusters
  const auto q = RandomQuery(23, 0.7f);
  SearchParams p;
  p.k = 40;
  SearchResult r, cand;
  ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
  SearchParams p3 = p;
  p3.k = 120;
  ASSERT_TRUE(plain->Search(plain_store, q.data(), p3, &cand).ok());
  auto score = [&](int64_t row) { return ScaledScore(store, q, row, 0.2); };
  // The candidate clusters and each one's exact log-sum-exp.
  const std::set<int64_t> cand_rows(cand.ids.begin(), cand.ids.end());
  std::vector<std::pair<double, int64_t>> by_density;  // (lse - log size, cluster)
  std::vector<double> lse(s.num_clusters(), -INFINITY);
  for (int64_t c = 0; c < s.num_clusters(); ++c) {
    if (s.size[c] == 0 || !cand_rows.count(s.begin[c])) continue;
    double l = 0;
    for (int64_t row = s.begin[c]; row < s.begin[c] + s.size[c]; ++row) l += std::exp(score(row));
    lse[c] = std::log(l);
    by_density.push_back({lse[c] - std::log(double(s.size[c])), c});
  }
  std::sort(by_density.begin(), by_density.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<int64_t> want;
  std::set<int64_t> kept;
  for (const auto& [density, c] : by_density) {
    if (static_cast<int64_t>(want.size()) >= 40) break;
    kept.insert(c);
    for (int64_t row = s.begin[c]; row < s.begin[c] + s.size[c]; ++row) want.push_back(row);
  }
  const std::size_t no = s.outliers.size();
  const std::vector<int64_t> got(r.ids.begin() + static_cast<std::ptrdiff_t>(no), r.ids.end());
  EXPECT_EQ(got, want);
  double want_l = std::exp(double(cand.est_lse));
  for (const auto& [density, c] : by_density)
    if (!kept.count(c)) want_l += std::exp(lse[c]);
  EXPECT_NEAR(r.est_lse, std::log(want_l), 1e-4 * (1 + std::fabs(std::log(want_l))));
}

TEST(ClusterIndex, RescoreIsExactAtTheMaximalBudgetAndSharedByAGroup) {
  HeadStore store(kDim, DType::kBF16);
  AppendRows(&store, 1024, 25, DType::kBF16);
  IndexConfig cfg = SmallConfig();
  cfg.cluster.rescore = 4.f;
  cfg.cluster.group_select = true;
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  ApplyOrder(index.get(), &store, 0, 1024);
  const std::vector<float> qs = RandomQueries(4, 40);
  SearchParams p;
  p.k = 50;
  std::vector<SearchResult> g(4);
  ASSERT_TRUE(index->SearchGroup(store, qs.data(), 4, p, g.data()).ok());
  const std::size_t no = GetClusterSummary(*index)->outliers.size();
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(g[i].ids, g[0].ids) << "query " << i;  // one set, in one order
    EXPECT_EQ(g[i].ids.size(), no + 50);
    EXPECT_GT(g[i].est_lse, kNegInf);
  }
  // Every row kept: exact attention over the store, no estimate.
  p.k = 1 << 20;
  ASSERT_TRUE(index->SearchGroup(store, qs.data(), 4, p, g.data()).ok());
  const float scale = 1.f / std::sqrt(float(kDim));
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(g[i].ids.size(), 1024u);
    EXPECT_EQ(g[i].est_lse, kNegInf);
    std::vector<float> o(kDim), ref(kDim);
    float lse, lse_ref;
    AttendStoreRows(qs.data() + i * kDim, scale, store, g[i].ids.data(), g[i].ids.size(),
                    o.data(), &lse);
    AttendStoreAll(qs.data() + i * kDim, scale, store, ref.data(), &lse_ref);
    EXPECT_NEAR(lse, lse_ref, 1e-4);
    for (int j = 0; j < kDim; ++j) EXPECT_NEAR(o[j], ref[j], 1e-4);
  }
}

TEST(ClusterIndex, EmptyAndTinyInputs) {
  auto index = MakeIndex(IndexKind::kCluster, SmallConfig(), kDim).value();
  HeadStore empty(kDim, DType::kF32);
  EXPECT_FALSE(index->Build(empty, nullptr, 0).ok());
  const auto q = RandomQuery(1);
  SearchResult r;
  EXPECT_FALSE(index->Search(empty, q.data(), {}, &r).ok());  // not built
  EXPECT_FALSE(index->Add(empty).ok());

  HeadStore small(kDim, DType::kF32);  // less than a segment: nothing covered
  AppendRows(&small, 100, 14);
  ASSERT_TRUE(index->Build(small, nullptr, 0).ok());
  EXPECT_EQ(index->size(), 0);
  int64_t b;
  std::vector<int64_t> order;
  EXPECT_FALSE(index->TakeRowOrder(&b, &order));
  ASSERT_TRUE(index->Search(small, q.data(), {}, &r).ok());
  EXPECT_TRUE(r.ids.empty());
  EXPECT_EQ(r.scanned, 0);
  EXPECT_EQ(r.est_lse, kNegInf);

  // A segment of exactly one cluster, no outliers.
  IndexConfig tiny = SmallConfig();
  tiny.cluster.segment_tokens = 4;
  tiny.cluster.cluster_size = 4;
  tiny.cluster.outlier_fraction = 0.f;
  auto t = MakeIndex(IndexKind::kCluster, tiny, kDim).value();
  HeadStore four(kDim, DType::kF32);
  AppendRows(&four, 4, 15);
  ASSERT_TRUE(t->Build(four, nullptr, 0).ok());
  ApplyOrder(t.get(), &four, 0, 4);
  SearchParams p;
  p.k = 1;
  ASSERT_TRUE(t->Search(four, q.data(), p, &r).ok());
  EXPECT_EQ(r.ids.size(), 4u);
  EXPECT_EQ(r.est_lse, kNegInf);

  IndexConfig bad = SmallConfig();
  bad.cluster.cluster_size = 0;
  auto bi = MakeIndex(IndexKind::kCluster, bad, kDim).value();
  EXPECT_FALSE(bi->Build(four, nullptr, 0).ok());
}

TEST(ClusterIndex, QueryMetricFactorIsACholeskyFactor) {
  const std::vector<float> qs = RandomQueries(300, 200);
  const auto l = QueryMetricFactor(qs.data(), 300, kDim, 4096);
  double tr = 0;
  for (int i = 0; i < kDim; ++i) {
    for (int j = i + 1; j < kDim; ++j) EXPECT_EQ(l[i * kDim + j], 0.f);
    for (int j = 0; j <= i; ++j) tr += double(l[i * kDim + j]) * l[i * kDim + j];
  }
  EXPECT_NEAR(tr, kDim, 1e-2 * kDim);
  const auto id = QueryMetricFactor(nullptr, 0, kDim, 4096);
  for (int i = 0; i < kDim; ++i) EXPECT_EQ(id[i * kDim + i], 1.f);
  // Fewer queries than MinMetricQueries (a short prompt's) leave the metric the identity; as
  // many shape it. max_queries counts: a cap below the minimum uses none either.
  const int enough = MinMetricQueries(kDim);
  EXPECT_EQ(QueryMetricFactor(qs.data(), enough - 1, kDim, 4096), id);
  EXPECT_NE(QueryMetricFactor(qs.data(), enough, kDim, 4096), id);
  EXPECT_EQ(QueryMetricFactor(qs.data(), 300, kDim, enough - 1), id);
}

// log mean_{k in cluster} exp(scale q.k) over the m rows of the cluster starting at `off` of
// part's order, in double precision key by key (the quantity CalibrateSpreads fits).
double ExactLogMeanExp(const std::vector<float>& k, const SegmentClustering& part, int64_t off,
                       int32_t m, const float* q, float scale) {
  double mx = -INFINITY, l_sum = 0;
  std::vector<double> sc(m);
  for (int32_t r = 0; r < m; ++r) {
    const float* row = k.data() + part.order[off + r] * kDim;
    double a = 0;
    for (int j = 0; j < kDim; ++j) a += double(q[j]) * row[j];
    sc[r] = scale * a;
    mx = std::max(mx, sc[r]);
  }
  for (double x : sc) l_sum += std::exp(x - mx);
  return mx + std::log(l_sum / m);
}

// CalibrateSpreads with several queries and outliers in the segment: each cluster's spread is the
// least-squares fit of the formula in cluster.h, computed here in double precision key by key.
TEST(ClusterIndex, CalibratedSpreadIsTheLeastSquaresFitOverTheQueries) {
  const int64_t n = 900, nq = 7;
  std::mt19937_64 rng(9);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(static_cast<std::size_t>(n) * kDim), v(k.size()), q(nq * kDim);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = 2.f * nd(rng);
  ClusterConfig cfg;
  cfg.cluster_size = 12;
  cfg.outlier_fraction = 0.02f;
  SegmentClustering part;
  const auto l = QueryMetricFactor(q.data(), nq, kDim, 4096);
  ClusterSegment(k.data(), v.data(), n, kDim, l.data(), cfg, 3, &part);
  ASSERT_GT(part.num_outliers, 0);
  const float scale = 0.125f, weight = 0.7f;
  CalibrateSpreads(k.data(), n, kDim, q.data(), nq, scale, weight, &part);
  const double coef = 0.5 * weight * double(scale) * scale;
  int64_t off = 0;
  int clamped = 0;
  for (std::size_t c = 0; c < part.size.size(); ++c) {
    const int32_t m = part.size[c];
    double num = 0, den = 0;
    for (int64_t i = 0; i < nq; ++i) {
      const float* qi = q.data() + i * kDim;
      double qn2 = 0, qmu = 0;
      for (int j = 0; j < kDim; ++j) {
        qn2 += double(qi[j]) * qi[j];
        qmu += double(qi[j]) * part.centroid[c * kDim + j];
      }
      num += (ExactLogMeanExp(k, part, off, m, qi, scale) - scale * qmu) * qn2;
      den += qn2 * qn2;
    }
    const double want = std::max(0.0, num / den) / coef;
    clamped += want == 0.0;
    EXPECT_NEAR(part.spread[c], want, 1e-4 * (1 + want)) << "cluster " << c;
    off += m;
  }
  EXPECT_LT(clamped, static_cast<int>(part.size.size()));  // the fit is not all clamped at 0
}

// CalibrateSpreads: with one query the calibrated density is that query's exact log mean exp over
// the cluster's keys; identical keys get no spread; no queries (or spread_weight 0) change nothing.
TEST(ClusterIndex, CalibratedSpreadMatchesTheExactLogMeanExp) {
  const int64_t n = 600;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(static_cast<std::size_t>(n) * kDim), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (int j = 0; j < kDim; ++j) k[599 * kDim + j] = k[598 * kDim + j];  // rows 598, 599 alike
  ClusterConfig cfg;
  cfg.cluster_size = 8;
  cfg.outlier_fraction = 0.f;
  SegmentClustering part;
  const auto l = QueryMetricFactor(nullptr, 0, kDim, 1);
  ClusterSegment(k.data(), v.data(), n, kDim, l.data(), cfg, 3, &part);
  const float scale = 0.125f;
  const auto q = RandomQuery(11);
  SegmentClustering uncal = part;
  CalibrateSpreads(k.data(), n, kDim, q.data(), 0, scale, 1.f, &part);
  EXPECT_EQ(part.spread, uncal.spread);
  CalibrateSpreads(k.data(), n, kDim, q.data(), 1, scale, 0.f, &part);
  EXPECT_EQ(part.spread, uncal.spread);
  CalibrateSpreads(k.data(), n, kDim, q.data(), 1, scale, 1.f, &part);
  double qn2 = 0;
  for (float x : q) qn2 += double(x) * x;
  int64_t off = 0;
  for (std::size_t c = 0; c < part.size.size(); ++c) {
    const int32_t m = part.size[c];
    double qmu = 0;
    for (int j = 0; j < kDim; ++j) qmu += double(q[j]) * part.centroid[c * kDim + j];
    const double exact = ExactLogMeanExp(k, part, off, m, q.data(), scale);
    const double density = scale * qmu + 0.5 * scale * scale * qn2 * part.spread[c];
    EXPECT_GE(part.spread[c], 0.f) << c;
    // Jensen: the exact value is at least the mean key's, so the fit is never clamped here.
    EXPECT_NEAR(density, exact, 1e-4 * (1 + std::fabs(exact))) << "cluster " << c;
    bool alike = true;
    for (int32_t r = 1; r < m && alike; ++r)
      for (int j = 0; j < kDim; ++j)
        alike = alike && k[part.order[off + r] * kDim + j] == k[part.order[off] * kDim + j];
    if (alike) {
      EXPECT_NEAR(part.spread[c], 0.f, 1e-3) << "cluster " << c;
    }
    off += m;
  }
}

}  // namespace
}  // namespace kvrt::cpu_index

namespace kvrt::cpu_index {
namespace {

// A padded head_dim (the GPU backend pads 96 to 128 with zeros): with active_dim, the metric factor
// is the active dims' one embedded in zeros, and a segment of padded rows clusters as the
// unpadded rows do (same order and sizes, the same spreads and centroids in the active dims),
// with the identity metric and with the prompt queries' one.
TEST(ClusterSegment, PaddedRowsClusterAsTheUnpaddedOnes) {
  const int a = 48, d = 64;
  const int64_t n = 512, nq = 300;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n * a), v(n * a), q(nq * a);
  for (auto* x : {&k, &v, &q})
    for (auto& e : *x) e = nd(rng);
  auto pad = [&](const std::vector<float>& x, int64_t rows) {
    std::vector<float> y(rows * d, 0.f);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(x.data() + r * a, a, y.data() + r * d);
    return y;
  };
  const std::vector<float> kp = pad(k, n), vp = pad(v, n), qp = pad(q, nq);
  ClusterConfig cfg;
  cfg.cluster_size = 8;
  for (bool queries : {false, true}) {
    SCOPED_TRACE(queries ? "query metric" : "identity");
    const auto la = QueryMetricFactor(queries ? q.data() : nullptr, queries ? nq : 0, a, 4096);
    const auto lp = QueryMetricFactor(queries ? qp.data() : nullptr, queries ? nq : 0, d, 4096, a);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) {
        const float want = i < a && j < a ? la[i * a + j] : 0.f;
        ASSERT_NEAR(lp[i * d + j], want, 1e-5f * (1 + std::fabs(want))) << i << " " << j;
      }
    SegmentClustering sa, sp;
    ClusterSegment(k.data(), v.data(), n, a, la.data(), cfg, 11, &sa);
    ClusterSegment(kp.data(), vp.data(), n, d, lp.data(), cfg, 11, &sp);
    EXPECT_EQ(sp.order, sa.order);
    EXPECT_EQ(sp.size, sa.size);
    ASSERT_EQ(sp.spread.size(), sa.spread.size());
    for (std::size_t j = 0; j < sa.spread.size(); ++j)
      EXPECT_NEAR(sp.spread[j], sa.spread[j], 1e-4f * (1 + std::fabs(sa.spread[j]))) << j;
    for (std::size_t j = 0; j < sa.size.size(); ++j)
      for (int t = 0; t < d; ++t)
        EXPECT_NEAR(sp.centroid[j * d + t], t < a ? sa.centroid[j * a + t] : 0.f, 1e-4f);
  }
}

}  // namespace
}  // namespace kvrt::cpu_index
