// The GPU build of the cluster kind (runtime/src/segment_build.h), run here through the kernels'
// host references (the flow is the same on the device; tests/runtime_gpu runs it there): every
// segment laid out as the index expects, the means and spreads those of the members, and
// well-separated clusters found again.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt_cpu_index/cluster.h"
#include "runtime/src/segment_build.h"

namespace kvrt::runtime {
namespace {

constexpr int kG = 2, kD = 64, kS = 256;

RuntimeConfig Config() {
  RuntimeConfig c;
  c.num_kv_heads = kG;
  c.num_q_heads = 2 * kG;
  c.head_dim = kD;
  c.dtype = DType::kF32;
  c.index_kind = cpu_index::IndexKind::kCluster;
  c.index.cluster.segment_tokens = kS;
  c.index.cluster.cluster_size = 16;
  return c;
}

// rows x [kv_heads, d] f32 keys around `centers` centers per head (label[g][r]), values random.
struct Data {
  std::vector<float> k, v;
  std::vector<std::vector<int>> label;
};

Data MakeData(int64_t rows, uint32_t seed, int kTrue = 16) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  Data d;
  d.k.resize(static_cast<std::size_t>(rows) * kG * kD);
  d.v.resize(d.k.size());
  d.label.assign(kG, std::vector<int>(rows));
  for (int g = 0; g < kG; ++g) {
    std::vector<float> centers(static_cast<std::size_t>(kTrue) * kD);
    for (float& x : centers) x = 4.f * n01(rng);
    for (int64_t r = 0; r < rows; ++r) {
      const int c = static_cast<int>(rng() % kTrue);
      d.label[g][r] = c;
      float* kr = d.k.data() + (static_cast<std::size_t>(r) * kG + g) * kD;
      float* vr = d.v.data() + (static_cast<std::size_t>(r) * kG + g) * kD;
      for (int e = 0; e < kD; ++e) {
        kr[e] = centers[static_cast<std::size_t>(c) * kD + e] + 0.1f * n01(rng);
        vr[e] = n01(rng);
      }
    }
  }
  return d;
}

std::vector<std::vector<float>> Identity() {
  std::vector<float> l(static_cast<std::size_t>(kD) * kD, 0.f);
  for (int i = 0; i < kD; ++i) l[static_cast<std::size_t>(i) * kD + i] = 1.f;
  return std::vector<std::vector<float>>(kG, l);
}

TEST(SegmentBuild, LaysOutEveryWholeSegmentWithTheMembersMeans) {
  const RuntimeConfig cfg = Config();
  const int64_t rows = 3 * kS + 100;  // the last 100 rows are no whole segment: not built
  const Data data = MakeData(rows, 3);
  const auto metric = Identity();
  SegmentBuildInput in{data.k.data(), data.v.data(), false, rows, &metric};
  auto parts = BuildSegments(cfg, in, /*on_gpu=*/false, nullptr);
  ASSERT_TRUE(parts.ok()) << parts.status();
  ASSERT_EQ(parts->size(), static_cast<std::size_t>(kG));
  const int64_t n_out = cpu_index::SegmentOutliers(kS, cfg.index.cluster);
  for (int g = 0; g < kG; ++g) {
    ASSERT_EQ((*parts)[g].size(), 3u);
    for (int s = 0; s < 3; ++s) {
      const cpu_index::SegmentClustering& p = (*parts)[g][s];
      std::vector<int64_t> sorted = p.order;
      std::sort(sorted.begin(), sorted.end());
      std::vector<int64_t> all(kS);
      std::iota(all.begin(), all.end(), 0);
      ASSERT_EQ(sorted, all) << "order is a permutation of the segment's rows";
      EXPECT_EQ(p.num_outliers, n_out);
      int64_t members = 0;
      for (int32_t n : p.size) {
        EXPECT_GT(n, 0) << "empty clusters are dropped";
        members += n;
      }
      EXPECT_EQ(members + p.num_outliers, kS);
      // Each cluster's means are those of its rows (the order's ranges).
      int64_t at = 0;
      for (std::size_t j = 0; j < p.size.size(); ++j) {
        for (int e = 0; e < kD; ++e) {
          double km = 0, vm = 0;
          for (int64_t i = at; i < at + p.size[j]; ++i) {
            const std::size_t r = static_cast<std::size_t>(s) * kS + p.order[i];
            km += data.k[(r * kG + g) * kD + e];
            vm += data.v[(r * kG + g) * kD + e];
          }
          EXPECT_NEAR(p.centroid[j * kD + e], km / p.size[j], 1e-4);
          EXPECT_NEAR(p.value_mean[j * kD + e], vm / p.size[j], 1e-4);
        }
        EXPECT_GE(p.spread[j], 0.f);
        at += p.size[j];
      }
    }
  }
}

TEST(SegmentBuild, FindsWellSeparatedClustersAgain) {
  const RuntimeConfig cfg = Config();
  // 4 true clusters, 16 found (split, not merged: every true one draws a seed).
  const Data data = MakeData(kS, 11, 4);
  const auto metric = Identity();
  SegmentBuildInput in{data.k.data(), data.v.data(), false, kS, &metric};
  auto parts = BuildSegments(cfg, in, false, nullptr);
  ASSERT_TRUE(parts.ok()) << parts.status();
  for (int g = 0; g < kG; ++g) {
    const cpu_index::SegmentClustering& p = (*parts)[g][0];
    // Purity: the share of rows whose found cluster's majority true label is their own.
    int64_t pure = 0, at = 0;
    for (int32_t n : p.size) {
      std::map<int, int> votes;
      for (int64_t i = at; i < at + n; ++i) ++votes[data.label[g][p.order[i]]];
      int best = 0;
      for (const auto& [label, count] : votes) best = std::max(best, count);
      pure += best;
      at += n;
    }
    EXPECT_GE(pure, (kS - p.num_outliers) * 99 / 100) << "kv head " << g;
  }
}

TEST(SegmentBuild, RefusesWhatItDoesNotSupport) {
  RuntimeConfig cfg = Config();
  const Data data = MakeData(kS, 1);
  const auto metric = Identity();
  SegmentBuildInput in{data.k.data(), data.v.data(), false, kS, &metric};
  cfg.head_dim = 96;
  EXPECT_FALSE(SegmentBuildSupported(cfg));
  EXPECT_EQ(BuildSegments(cfg, in, false, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  cfg = Config();
  cfg.index_kind = cpu_index::IndexKind::kLandmark;
  EXPECT_FALSE(SegmentBuildSupported(cfg));
  cfg = Config();
  const std::vector<std::vector<float>> short_metric(kG, std::vector<float>(3));
  in.metric_l = &short_metric;
  EXPECT_EQ(BuildSegments(cfg, in, false, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvrt::runtime
