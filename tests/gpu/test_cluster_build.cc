// K-means build (cluster_build.h): the host references on synthetic data with known answers (run
// everywhere), each kernel against its host reference (skipped without a device), and a timing
// of the 128K shape on the device (printed, not asserted).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_build.h"
#include "kvrt_gpu/kernels.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvrt::gpu {
namespace {

// Named tolerances.
// MapToMetric: the kernel is 3xTF32 on tensor cores (~2^-21 of sum |k_i L_ij|) against a double
// reference; the bound is relative to that sum, the scale of a dot product's rounding.
[[maybe_unused]] constexpr double kMapTol = 1e-5;
// AssignClusters scores in bf16 (inputs rounded to 2^-9 each): a score is off by at most
// ~2^-8 |x||c|, so the device's choice is within 1e-2 |x| max|c| of the best.
[[maybe_unused]] constexpr double kAssignScoreTol = 1e-2;
// Update / Summarize: f32 sums (the kernel) against f32 in the same order (Update) or double
// (Summarize); means of O(1) values.
constexpr double kMeanTol = 1e-5;

KMeansShape Shape(int kv, int d, int segs, int s_rows, int c) {
  KMeansShape s;
  s.kv_heads = kv;
  s.head_dim = d;
  s.segments = segs;
  s.segment_rows = s_rows;
  s.clusters = c;
  return s;
}

std::vector<float> RandNormal(std::size_t n, uint32_t seed, float sd = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Storage of f32 values in dtype t, and the f32 values that storage holds.
std::vector<unsigned char> Store(const std::vector<float>& f, DType t) {
  std::vector<unsigned char> out(f.size() * DTypeSize(t));
  ConvertFromF32(f.data(), f.size(), t, out.data());
  return out;
}
std::vector<float> Load(const std::vector<unsigned char>& s, DType t) {
  std::vector<float> f(s.size() / DTypeSize(t));
  ConvertToF32(s.data(), t, f.size(), f.data());
  return f;
}

// Lower-triangular L [kv, d, d]: diagonal in [0.5, 1.5], N(0, 0.3 / sqrt(d)) below it.
std::vector<float> RandMetric(int kv, int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> diag(0.5f, 1.5f);
  std::normal_distribution<float> off(0.f, 0.3f / std::sqrt(float(d)));
  std::vector<float> l(static_cast<std::size_t>(kv) * d * d, 0.f);
  for (int g = 0; g < kv; ++g)
    for (int i = 0; i < d; ++i)
      for (int j = 0; j <= i; ++j)
        l[(static_cast<std::size_t>(g) * d + i) * d + j] = i == j ? diag(rng) : off(rng);
  return l;
}

// tr(L L^T) per head.
std::vector<float> Traces(const std::vector<float>& l, int kv, int d) {
  std::vector<float> t(kv);
  for (int g = 0; g < kv; ++g) {
    double a = 0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(d) * d; ++i) {
      const double v = l[static_cast<std::size_t>(g) * d * d + i];
      a += v * v;
    }
    t[g] = static_cast<float>(a);
  }
  return t;
}

// |x_r|^2 of f32 rows [n, d].
std::vector<float> RowNorms2(const std::vector<float>& x, int d) {
  std::vector<float> n2(x.size() / d);
  for (std::size_t r = 0; r < n2.size(); ++r) {
    double a = 0;
    for (int t = 0; t < d; ++t) a += double(x[r * d + t]) * x[r * d + t];
    n2[r] = static_cast<float>(a);
  }
  return n2;
}

// C distinct segment-local rows per (kv head, segment), deterministic.
[[maybe_unused]] std::vector<int32_t> RandSeeds(const KMeansShape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> perm(s.segment_rows), out;
  for (int gs = 0; gs < s.kv_heads * s.segments; ++gs) {
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = 0; i < s.clusters; ++i) {
      std::uniform_int_distribution<int> u(i, s.segment_rows - 1);
      std::swap(perm[i], perm[u(rng)]);
      out.push_back(perm[i]);
    }
  }
  return out;
}

// Assignments with structure: mostly uniform, a few hot clusters (large members lists), a band of
// clusters never used (empty), and outliers (-1) when `outliers`.
[[maybe_unused]] std::vector<int32_t> RandAssign(const KMeansShape& s, uint32_t seed,
                                                 bool outliers) {
  std::mt19937 rng(seed);
  const int c = s.clusters;
  std::uniform_int_distribution<int> any(0, c - 1), hot(0, std::min(c, 3) - 1);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  const int empty_lo = c / 2, empty_hi = c / 2 + c / 8;  // [lo, hi) stay empty
  std::vector<int32_t> a(static_cast<std::size_t>(s.kv_heads) * s.rows());
  for (auto& v : a) {
    const float p = u01(rng);
    if (outliers && p < 0.05f) {
      v = -1;
    } else if (p < 0.15f) {
      v = hot(rng);
    } else {
      do v = any(rng);
      while (c > 8 && v >= empty_lo && v < empty_hi);
    }
  }
  return a;
}

// Well-separated synthetic clusters: per (kv head, segment) C true clusters of S / C rows each,
// centres N(0, 4^2) per dim, members centre + N(0, 0.05^2), rows shuffled within the segment.
// keys: f32 [rows, kv, d] (before storage rounding); label: [kv, rows], the true cluster.
struct Separated {
  std::vector<float> keys;
  std::vector<int32_t> label;
  std::vector<int32_t> seed;  // the first row of each true cluster: cluster j seeds centroid j
};
Separated MakeSeparated(const KMeansShape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> centre(0.f, 4.f), noise(0.f, 0.05f);
  const int d = s.head_dim, c = s.clusters, sr = s.segment_rows;
  const int64_t rows = s.rows();
  Separated out;
  out.keys.resize(static_cast<std::size_t>(rows) * s.kv_heads * d);
  out.label.resize(static_cast<std::size_t>(s.kv_heads) * rows);
  out.seed.resize(static_cast<std::size_t>(s.kv_heads) * s.segments * c, -1);
  std::vector<int32_t> perm(sr);
  std::vector<float> cen(static_cast<std::size_t>(c) * d);
  for (int g = 0; g < s.kv_heads; ++g) {
    for (int sg = 0; sg < s.segments; ++sg) {
      for (auto& v : cen) v = centre(rng);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int i = 0; i < sr; ++i) {
        const int r = perm[i];  // local row of the i-th member in cluster order
        const int t = i / (sr / c);
        const int64_t row = static_cast<int64_t>(sg) * sr + r;
        out.label[static_cast<std::size_t>(g) * rows + row] = t;
        for (int e = 0; e < d; ++e) {
          out.keys[(static_cast<std::size_t>(row) * s.kv_heads + g) * d + e] =
              cen[static_cast<std::size_t>(t) * d + e] + noise(rng);
        }
      }
      for (int r = sr - 1; r >= 0; --r) {  // lowest row of each true cluster
        const int t = out.label[static_cast<std::size_t>(g) * rows + sg * sr + r];
        out.seed[(static_cast<std::size_t>(g) * s.segments + sg) * c + t] = r;
      }
    }
  }
  return out;
}

// Host buffers of one k-means problem.
struct HostRun {
  std::vector<float> x, xn2, centroid, dist, key_mean, value_mean, spread;
  std::vector<int32_t> assign, count;
  explicit HostRun(const KMeansShape& s) {
    const std::size_t rows = static_cast<std::size_t>(s.kv_heads) * s.rows();
    const std::size_t cl = static_cast<std::size_t>(s.kv_heads) * s.segments * s.clusters;
    x.resize(rows * s.head_dim);
    xn2.resize(rows);
    dist.resize(rows);
    assign.resize(rows);
    centroid.resize(cl * s.head_dim);
    key_mean.resize(cl * s.head_dim);
    value_mean.resize(cl * s.head_dim);
    spread.resize(cl);
    count.resize(cl);
  }
  ClusterStats Stats() { return {count.data(), key_mean.data(), value_mean.data(), spread.data()}; }
};

// ---------------------------------------------------------------------------------------------
// Host references (run everywhere).

TEST(KMeansBuildHost, RecoversSeparatedClusters) {
  const KMeansShape s = Shape(2, 64, 2, 256, 16);
  const Separated data = MakeSeparated(s, 1);
  const DType t = DType::kBF16;
  const auto keys = Store(data.keys, t);
  const auto values = Store(RandNormal(data.keys.size(), 2), t);
  const auto l = RandMetric(s.kv_heads, s.head_dim, 3);
  const auto trace = Traces(l, s.kv_heads, s.head_dim);
  HostRun h(s);
  ASSERT_TRUE(MapToMetricHost(s, keys.data(), t, l.data(), h.x.data(), h.xn2.data()).ok());
  ASSERT_TRUE(SeedCentroidsHost(s, h.x.data(), data.seed.data(), h.centroid.data()).ok());
  for (int it = 0; it < 3; ++it) {
    ASSERT_TRUE(AssignClustersHost(s, h.x.data(), h.xn2.data(), h.centroid.data(), h.assign.data(),
                                   h.dist.data())
                    .ok());
    ASSERT_TRUE(UpdateCentroidsHost(s, h.x.data(), h.assign.data(), h.centroid.data()).ok());
  }
  ASSERT_TRUE(AssignClustersHost(s, h.x.data(), h.xn2.data(), h.centroid.data(), h.assign.data(),
                                 h.dist.data())
                  .ok());
  EXPECT_EQ(h.assign, data.label);
  for (float dd : h.dist) {
    EXPECT_GE(dd, 0.f);
    EXPECT_LT(dd, 2.f);  // noise 0.05 per dim, |L| <= ~1.5: ~0.1 expected, centres ~50 apart
  }
  ASSERT_TRUE(SummarizeClustersHost(s, keys.data(), values.data(), t, h.x.data(), h.xn2.data(),
                                    h.assign.data(), trace.data(), h.Stats())
                  .ok());
  const std::vector<float> kf = Load(keys, t);
  const int d = s.head_dim, c = s.clusters;
  for (int g = 0; g < s.kv_heads; ++g) {
    for (int sg = 0; sg < s.segments; ++sg) {
      for (int j = 0; j < c; ++j) {
        const std::size_t idx = (static_cast<std::size_t>(g) * s.segments + sg) * c + j;
        EXPECT_EQ(h.count[idx], s.segment_rows / c);
        EXPECT_GE(h.spread[idx], 0.f);
        EXPECT_LT(h.spread[idx], 0.01f);  // tight clusters: ~0.05^2 * tr(M) / tr(M)
        std::vector<double> mean(d, 0.0);
        for (int r = sg * s.segment_rows; r < (sg + 1) * s.segment_rows; ++r) {
          if (data.label[static_cast<std::size_t>(g) * s.rows() + r] != j) continue;
          for (int e = 0; e < d; ++e)
            mean[e] += kf[(static_cast<std::size_t>(r) * s.kv_heads + g) * d + e];
        }
        for (int e = 0; e < d; ++e) {
          EXPECT_NEAR(h.key_mean[idx * d + e], mean[e] / h.count[idx], 1e-5);
        }
      }
    }
  }
}

TEST(KMeansBuildHost, MapToMetricIdentityKeepsStoredKeys) {
  const KMeansShape s = Shape(3, 128, 1, 64, 4);
  std::vector<float> l(static_cast<std::size_t>(3) * 128 * 128, 0.f);
  for (int g = 0; g < 3; ++g)
    for (int i = 0; i < 128; ++i) l[(static_cast<std::size_t>(g) * 128 + i) * 128 + i] = 1.f;
  const auto kf = RandNormal(static_cast<std::size_t>(64) * 3 * 128, 4);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    const auto keys = Store(kf, t);
    const auto stored = Load(keys, t);
    HostRun h(s);
    ASSERT_TRUE(MapToMetricHost(s, keys.data(), t, l.data(), h.x.data(), h.xn2.data()).ok());
    for (int g = 0; g < 3; ++g) {
      for (int r = 0; r < 64; ++r) {
        double n2 = 0;
        for (int e = 0; e < 128; ++e) {
          const float k = stored[(static_cast<std::size_t>(r) * 3 + g) * 128 + e];
          ASSERT_EQ(h.x[(static_cast<std::size_t>(g) * 64 + r) * 128 + e], k);
          n2 += double(k) * k;
        }
        EXPECT_NEAR(h.xn2[g * 64 + r], n2, 1e-6 * n2);
      }
    }
  }
}

TEST(KMeansBuildHost, AssignTiesGoToTheLowestClusterAndDistIsTheSquaredDistance) {
  const KMeansShape s = Shape(1, 64, 2, 64, 5);
  const int d = 64, c = 5;
  HostRun h(s);
  h.x = RandNormal(h.x.size(), 5);
  h.xn2 = RowNorms2(h.x, d);
  h.centroid = RandNormal(h.centroid.size(), 6, 0.5f);
  for (int sg = 0; sg < 2; ++sg)  // cluster 3 duplicates cluster 1
    std::copy_n(h.centroid.begin() + (sg * c + 1) * d, d, h.centroid.begin() + (sg * c + 3) * d);
  ASSERT_TRUE(AssignClustersHost(s, h.x.data(), h.xn2.data(), h.centroid.data(), h.assign.data(),
                                 h.dist.data())
                  .ok());
  int ones = 0;
  for (int r = 0; r < 128; ++r) {
    const int sg = r / 64;
    EXPECT_NE(h.assign[r], 3);
    ones += h.assign[r] == 1;
    double best = INFINITY;
    int bj = -1;
    for (int j = 0; j < c; ++j) {
      double dd = 0;
      for (int e = 0; e < d; ++e) {
        const double v = double(h.x[r * d + e]) - h.centroid[(sg * c + j) * d + e];
        dd += v * v;
      }
      if (dd < best) {
        best = dd;
        bj = j;
      }
    }
    EXPECT_EQ(h.assign[r], bj);
    EXPECT_NEAR(h.dist[r], best, 1e-4 * (1 + best));
  }
  EXPECT_GT(ones, 0);  // the duplicated centroid does win rows
}

TEST(KMeansBuildHost, UpdateLeavesEmptyClustersUntouched) {
  const KMeansShape s = Shape(1, 64, 2, 64, 8);
  const int d = 64, c = 8;
  HostRun h(s);
  h.x = RandNormal(h.x.size(), 7);
  std::fill(h.centroid.begin(), h.centroid.end(), 123.f);
  const int used0[] = {0, 2, 5};
  for (int r = 0; r < 64; ++r) h.assign[r] = r % 7 == 3 ? -1 : used0[r % 3];
  for (int r = 64; r < 128; ++r) h.assign[r] = r % 7;  // cluster 7 empty
  ASSERT_TRUE(UpdateCentroidsHost(s, h.x.data(), h.assign.data(), h.centroid.data()).ok());
  for (int sg = 0; sg < 2; ++sg) {
    for (int j = 0; j < c; ++j) {
      std::vector<double> sum(d, 0.0);
      int n = 0;
      for (int r = sg * 64; r < sg * 64 + 64; ++r) {
        if (h.assign[r] != j) continue;
        ++n;
        for (int e = 0; e < d; ++e) sum[e] += h.x[r * d + e];
      }
      for (int e = 0; e < d; ++e) {
        const float got = h.centroid[(sg * c + j) * d + e];
        if (n == 0) {
          ASSERT_EQ(got, 123.f) << "segment " << sg << " cluster " << j;
        } else {
          ASSERT_NEAR(got, sum[e] / n, kMeanTol) << "segment " << sg << " cluster " << j;
        }
      }
    }
  }
}

TEST(KMeansBuildHost, SummarizeExcludesOutliersAndSpreadIsTheMeanSquaredDistance) {
  const KMeansShape s = Shape(2, 128, 1, 128, 5);
  const int d = 128, c = 5, kv = 2, n = 128;
  const DType t = DType::kF16;
  const auto keys = Store(RandNormal(static_cast<std::size_t>(n) * kv * d, 8), t);
  const auto values = Store(RandNormal(static_cast<std::size_t>(n) * kv * d, 9), t);
  const auto l = RandMetric(kv, d, 10);
  const auto trace = Traces(l, kv, d);
  HostRun h(s);
  ASSERT_TRUE(MapToMetricHost(s, keys.data(), t, l.data(), h.x.data(), h.xn2.data()).ok());
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> u(-1, c - 1);
  for (auto& a : h.assign) {
    do a = u(rng);
    while (a == 3);  // cluster 3 empty; -1 are outliers
  }
  ASSERT_TRUE(SummarizeClustersHost(s, keys.data(), values.data(), t, h.x.data(), h.xn2.data(),
                                    h.assign.data(), trace.data(), h.Stats())
                  .ok());
  const auto kf = Load(keys, t), vf = Load(values, t);
  for (int g = 0; g < kv; ++g) {
    for (int j = 0; j < c; ++j) {
      const std::size_t idx = static_cast<std::size_t>(g) * c + j;
      std::vector<int> members;
      for (int r = 0; r < n; ++r)
        if (h.assign[g * n + r] == j) members.push_back(r);
      ASSERT_EQ(h.count[idx], static_cast<int>(members.size()));
      if (members.empty()) {
        EXPECT_EQ(j, 3);
        EXPECT_EQ(h.spread[idx], 0.f);
        for (int e = 0; e < d; ++e) {
          EXPECT_EQ(h.key_mean[idx * d + e], 0.f);
          EXPECT_EQ(h.value_mean[idx * d + e], 0.f);
        }
        continue;
      }
      std::vector<double> km(d, 0.0), vm(d, 0.0), xm(d, 0.0);
      for (int r : members) {
        for (int e = 0; e < d; ++e) {
          km[e] += kf[(static_cast<std::size_t>(r) * kv + g) * d + e];
          vm[e] += vf[(static_cast<std::size_t>(r) * kv + g) * d + e];
          xm[e] += h.x[(static_cast<std::size_t>(g) * n + r) * d + e];
        }
      }
      const double cnt = static_cast<double>(members.size());
      for (int e = 0; e < d; ++e) {
        km[e] /= cnt;
        vm[e] /= cnt;
        xm[e] /= cnt;
        EXPECT_NEAR(h.key_mean[idx * d + e], km[e], kMeanTol);
        EXPECT_NEAR(h.value_mean[idx * d + e], vm[e], kMeanTol);
      }
      double msd = 0;  // mean squared distance to the mean, in the metric
      for (int r : members) {
        for (int e = 0; e < d; ++e) {
          const double v = h.x[(static_cast<std::size_t>(g) * n + r) * d + e] - xm[e];
          msd += v * v;
        }
      }
      const double want = msd / cnt / trace[g];
      EXPECT_NEAR(h.spread[idx], want, 1e-5 * want + 1e-7);
    }
  }
}

TEST(KMeansBuild, BadArgumentsAreInvalid) {
  const KMeansShape ok = Shape(1, 64, 1, 64, 4);
  HostRun h(ok);
  std::vector<float> l(64 * 64, 0.f), tr(1, 64.f);
  std::vector<unsigned char> kv(static_cast<std::size_t>(64) * 64 * 4);
  std::vector<int32_t> seed(4, 0);
  const auto inv = absl::StatusCode::kInvalidArgument;
  std::vector<KMeansShape> bad = {Shape(1, 96, 1, 64, 4),  Shape(1, 64, 1, 100, 4),
                                  Shape(1, 64, 1, 0, 4),   Shape(1, 64, 1, 64, 0),
                                  Shape(1, 64, 1, 64, 65), Shape(0, 64, 1, 64, 4),
                                  Shape(1, 64, 0, 64, 4),  Shape(1, 64, -1, 64, 4)};
  for (const KMeansShape& s : bad) {
    SCOPED_TRACE(::testing::Message()
                 << "kv " << s.kv_heads << " d " << s.head_dim << " segs " << s.segments << " S "
                 << s.segment_rows << " C " << s.clusters);
    float* x = h.x.data();
    float* xn2 = h.xn2.data();
    float* cen = h.centroid.data();
    int32_t* as = h.assign.data();
    float* di = h.dist.data();
    EXPECT_EQ(MapToMetricHost(s, kv.data(), DType::kF32, l.data(), x, xn2).code(), inv);
    EXPECT_EQ(MapToMetric(s, kv.data(), DType::kF32, l.data(), x, xn2, nullptr).code(), inv);
    EXPECT_EQ(SeedCentroidsHost(s, x, seed.data(), cen).code(), inv);
    EXPECT_EQ(SeedCentroids(s, x, seed.data(), cen, nullptr).code(), inv);
    EXPECT_EQ(AssignClustersHost(s, x, xn2, cen, as, di).code(), inv);
    EXPECT_EQ(AssignClusters(s, x, xn2, cen, as, di, nullptr).code(), inv);
    EXPECT_EQ(UpdateCentroidsHost(s, x, as, cen).code(), inv);
    EXPECT_EQ(UpdateCentroids(s, x, as, cen, nullptr).code(), inv);
    EXPECT_EQ(SummarizeClustersHost(s, kv.data(), kv.data(), DType::kF32, x, xn2, as, tr.data(),
                                    h.Stats())
                  .code(),
              inv);
    EXPECT_EQ(SummarizeClusters(s, kv.data(), kv.data(), DType::kF32, x, xn2, as, tr.data(),
                                h.Stats(), nullptr)
                  .code(),
              inv);
  }
  // Null pointers, a bad dtype, a seed out of range, a misaligned row array.
  EXPECT_EQ(MapToMetricHost(ok, nullptr, DType::kF32, l.data(), h.x.data(), h.xn2.data()).code(),
            inv);
  EXPECT_EQ(
      MapToMetric(ok, kv.data(), DType::kF32, nullptr, h.x.data(), h.xn2.data(), nullptr).code(),
      inv);
  EXPECT_EQ(
      MapToMetricHost(ok, kv.data(), static_cast<DType>(7), l.data(), h.x.data(), h.xn2.data())
          .code(),
      inv);
  EXPECT_EQ(
      MapToMetric(ok, kv.data(), static_cast<DType>(7), l.data(), h.x.data(), h.xn2.data(), nullptr)
          .code(),
      inv);
  EXPECT_EQ(AssignClusters(ok, h.x.data(), h.xn2.data(), h.centroid.data(), nullptr, h.dist.data(),
                           nullptr)
                .code(),
            inv);
  EXPECT_EQ(UpdateCentroidsHost(ok, h.x.data(), h.assign.data(), nullptr).code(), inv);
  ClusterStats no_spread = h.Stats();
  no_spread.spread = nullptr;
  EXPECT_EQ(SummarizeClusters(ok, kv.data(), kv.data(), DType::kF32, h.x.data(), h.xn2.data(),
                              h.assign.data(), tr.data(), no_spread, nullptr)
                .code(),
            inv);
  seed[2] = 64;
  EXPECT_EQ(SeedCentroidsHost(ok, h.x.data(), seed.data(), h.centroid.data()).code(), inv);
  seed[2] = 0;
  const float* misaligned = h.x.data() + 1;
  EXPECT_EQ(UpdateCentroids(ok, misaligned, h.assign.data(), h.centroid.data(), nullptr).code(),
            inv);
#if !KVRT_WITH_CUDA
  const auto pre = absl::StatusCode::kFailedPrecondition;
  EXPECT_EQ(
      MapToMetric(ok, kv.data(), DType::kF32, l.data(), h.x.data(), h.xn2.data(), nullptr).code(),
      pre);
  EXPECT_EQ(SeedCentroids(ok, h.x.data(), seed.data(), h.centroid.data(), nullptr).code(), pre);
  EXPECT_EQ(AssignClusters(ok, h.x.data(), h.xn2.data(), h.centroid.data(), h.assign.data(),
                           h.dist.data(), nullptr)
                .code(),
            pre);
  EXPECT_EQ(UpdateCentroids(ok, h.x.data(), h.assign.data(), h.centroid.data(), nullptr).code(),
            pre);
  EXPECT_EQ(SummarizeClusters(ok, kv.data(), kv.data(), DType::kF32, h.x.data(), h.xn2.data(),
                              h.assign.data(), tr.data(), h.Stats(), nullptr)
                .code(),
            pre);
#endif
}

// ---------------------------------------------------------------------------------------------
// Kernels vs host references (skip without a GPU).

#if KVRT_WITH_CUDA
#define CUDA_OK(expr) ASSERT_EQ(cudaSuccess, (expr)) << #expr

// Device buffer, poisoned (0xff bytes: NaN floats, -1 ints) unless copied from host data.
struct Dev {
  void* p = nullptr;
  std::size_t bytes = 0;
  explicit Dev(std::size_t n) : bytes(n) {
    if (cudaMalloc(&p, std::max<std::size_t>(n, 16)) != cudaSuccess) p = nullptr;
    if (p != nullptr) cudaMemset(p, 0xff, std::max<std::size_t>(n, 16));
  }
  template <class V>
  static Dev From(const V& v) {
    Dev d(v.size() * sizeof(v[0]));
    if (d.p != nullptr) cudaMemcpy(d.p, v.data(), d.bytes, cudaMemcpyHostToDevice);
    return d;
  }
  template <class T>
  std::vector<T> Get(std::size_t n) const {
    std::vector<T> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
  ~Dev() {
    if (p != nullptr) cudaFree(p);
  }
  Dev(Dev&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Dev(const Dev&) = delete;
};

class KMeansKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DeviceAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

std::string Describe(const KMeansShape& s) {
  return "kv " + std::to_string(s.kv_heads) + " d " + std::to_string(s.head_dim) + " segs " +
         std::to_string(s.segments) + " S " + std::to_string(s.segment_rows) + " C " +
         std::to_string(s.clusters);
}

TEST_F(KMeansKernels, MapToMetricMatchesHost) {
  struct Case {
    KMeansShape s;
    DType t;
  };
  // Includes row counts that leave the last CTA's tile partial (64 rows of a 128-row tile).
  const std::vector<Case> cases = {{Shape(2, 64, 1, 64, 1), DType::kF32},
                                   {Shape(3, 128, 2, 192, 1), DType::kBF16},
                                   {Shape(1, 256, 3, 64, 1), DType::kF16},
                                   {Shape(2, 128, 1, 320, 1), DType::kF32},
                                   {Shape(2, 64, 3, 128, 1), DType::kBF16}};
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c.s) + " " + std::string(DTypeName(c.t)));
    const KMeansShape& s = c.s;
    const int d = s.head_dim, kv = s.kv_heads;
    const int64_t rows = s.rows();
    const auto keys = Store(RandNormal(static_cast<std::size_t>(rows) * kv * d, 20 + d), c.t);
    const auto kf = Load(keys, c.t);
    const auto l = RandMetric(kv, d, 21 + d);
    HostRun h(s);
    ASSERT_TRUE(MapToMetricHost(s, keys.data(), c.t, l.data(), h.x.data(), h.xn2.data()).ok());
    Dev dk = Dev::From(keys), dl = Dev::From(l), dx(h.x.size() * 4), dn(h.xn2.size() * 4);
    ASSERT_TRUE(
        MapToMetric(s, dk.p, c.t, dl.as<float>(), dx.as<float>(), dn.as<float>(), nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const auto x = dx.Get<float>(h.x.size());
    const auto xn2 = dn.Get<float>(h.xn2.size());
    for (int g = 0; g < kv; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const std::size_t hr = static_cast<std::size_t>(g) * rows + r;
        for (int j = 0; j < d; ++j) {
          double scale = 0;  // sum_i |k_i L_ij|
          for (int i = 0; i < d; ++i) {
            scale += std::fabs(double(kf[(static_cast<std::size_t>(r) * kv + g) * d + i]) *
                               l[(static_cast<std::size_t>(g) * d + i) * d + j]);
          }
          ASSERT_NEAR(x[hr * d + j], h.x[hr * d + j], kMapTol * scale + 1e-7)
              << "head " << g << " row " << r << " col " << j;
        }
        ASSERT_NEAR(xn2[hr], h.xn2[hr], 3 * kMapTol * h.xn2[hr] + 1e-6)
            << "head " << g << " row " << r;
      }
    }
  }
}

TEST_F(KMeansKernels, SeedMatchesHostExactly) {
  for (const KMeansShape& s :
       {Shape(2, 64, 2, 64, 64), Shape(3, 128, 2, 256, 37), Shape(1, 256, 1, 128, 1)}) {
    SCOPED_TRACE(Describe(s));
    HostRun h(s);
    h.x = RandNormal(h.x.size(), 30);
    const auto seed = RandSeeds(s, 31);
    ASSERT_TRUE(SeedCentroidsHost(s, h.x.data(), seed.data(), h.centroid.data()).ok());
    Dev dx = Dev::From(h.x), ds = Dev::From(seed), dc(h.centroid.size() * 4);
    ASSERT_TRUE(SeedCentroids(s, dx.as<float>(), ds.as<int32_t>(), dc.as<float>(), nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const auto cen = dc.Get<float>(h.centroid.size());
    ASSERT_EQ(std::memcmp(cen.data(), h.centroid.data(), cen.size() * 4), 0);
  }
}

TEST_F(KMeansKernels, AssignMatchesHostWithinBf16) {
  // C = 1, partial centroid tiles (37, 100, 200), whole tiles, C = S, and S % 128 != 0.
  const std::vector<KMeansShape> shapes = {Shape(1, 64, 1, 64, 1),     Shape(2, 128, 2, 256, 37),
                                           Shape(1, 256, 2, 192, 100), Shape(2, 64, 3, 128, 64),
                                           Shape(1, 128, 1, 512, 512), Shape(2, 128, 1, 1024, 200),
                                           Shape(1, 256, 1, 64, 64),   Shape(1, 128, 2, 192, 3)};
  for (const KMeansShape& s : shapes) {
    SCOPED_TRACE(Describe(s));
    const int d = s.head_dim, c = s.clusters;
    const int64_t rows = s.rows();
    HostRun h(s);
    h.x = RandNormal(h.x.size(), 40 + c);
    h.xn2 = RowNorms2(h.x, d);
    // Centroids: seed rows plus noise; the last one duplicates the first (an exact tie that
    // must go to the lower index on the device as well).
    const auto seed = RandSeeds(s, 41 + c);
    ASSERT_TRUE(SeedCentroidsHost(s, h.x.data(), seed.data(), h.centroid.data()).ok());
    const auto noise = RandNormal(h.centroid.size(), 42 + c, 0.3f);
    for (std::size_t i = 0; i < noise.size(); ++i) h.centroid[i] += noise[i];
    const int segs_all = s.kv_heads * s.segments;
    if (c >= 3) {
      for (int gs = 0; gs < segs_all; ++gs) {
        std::copy_n(h.centroid.begin() + static_cast<std::size_t>(gs) * c * d, d,
                    h.centroid.begin() + (static_cast<std::size_t>(gs) * c + c - 1) * d);
      }
    }
    ASSERT_TRUE(AssignClustersHost(s, h.x.data(), h.xn2.data(), h.centroid.data(), h.assign.data(),
                                   h.dist.data())
                    .ok());
    Dev dx = Dev::From(h.x), dn = Dev::From(h.xn2), dc = Dev::From(h.centroid);
    Dev da(h.assign.size() * 4), dd(h.dist.size() * 4);
    ASSERT_TRUE(AssignClusters(s, dx.as<float>(), dn.as<float>(), dc.as<float>(), da.as<int32_t>(),
                               dd.as<float>(), nullptr)
                    .ok());
    CUDA_OK(cudaDeviceSynchronize());
    const auto as = da.Get<int32_t>(h.assign.size());
    const auto di = dd.Get<float>(h.dist.size());
    int64_t mismatches = 0;
    for (int g = 0; g < s.kv_heads; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const std::size_t hr = static_cast<std::size_t>(g) * rows + r;
        const int sg = static_cast<int>(r / s.segment_rows);
        const float* cen =
            h.centroid.data() + (static_cast<std::size_t>(g) * s.segments + sg) * c * d;
        const float* xr = h.x.data() + hr * d;
        auto score = [&](int j, double* cnorm) {
          double dot = 0, n2 = 0;
          for (int e = 0; e < d; ++e) {
            dot += double(xr[e]) * cen[static_cast<std::size_t>(j) * d + e];
            n2 += double(cen[static_cast<std::size_t>(j) * d + e]) *
                  cen[static_cast<std::size_t>(j) * d + e];
          }
          *cnorm = std::sqrt(n2);
          return dot - 0.5 * n2;
        };
        const int jd = as[hr], jr = h.assign[hr];
        ASSERT_TRUE(jd >= 0 && jd < c) << "head " << g << " row " << r << " assign " << jd;
        if (c >= 3) {
          ASSERT_NE(jd, c - 1) << "a tie must go to the lower index";
        }
        double nd = 0, nr = 0;
        const double sd = score(jd, &nd), sr = score(jr, &nr);
        const double tol = kAssignScoreTol * std::sqrt(double(h.xn2[hr])) * std::max(nd, nr);
        ASSERT_GE(sd, sr - tol) << "head " << g << " row " << r << " device " << jd << " ref "
                                << jr;
        const double want = std::max(0.0, double(h.xn2[hr]) - 2 * sd);
        ASSERT_NEAR(di[hr], want, 2 * tol + 1e-4 * h.xn2[hr]) << "head " << g << " row " << r;
        mismatches += jd != jr;
      }
    }
    const int64_t total = rows * s.kv_heads;
    std::printf("[assign %s] %lld of %lld rows chose another (near-tied) centroid\n",
                Describe(s).c_str(), static_cast<long long>(mismatches),
                static_cast<long long>(total));
    EXPECT_LE(mismatches, total / 5 + 1);  // a gross check: near-ties only
  }
}

TEST_F(KMeansKernels, UpdateMatchesHost) {
  // Includes S > the kernel's 4096-row shared-memory stage (4160 = 4096 + 64), C = S, C = 1.
  const std::vector<KMeansShape> shapes = {Shape(1, 64, 1, 64, 1),    Shape(2, 128, 2, 4160, 300),
                                           Shape(1, 256, 2, 192, 37), Shape(2, 128, 1, 8192, 512),
                                           Shape(1, 64, 2, 128, 128), Shape(1, 256, 1, 256, 70)};
  for (const KMeansShape& s : shapes) {
    SCOPED_TRACE(Describe(s));
    HostRun h(s);
    h.x = RandNormal(h.x.size(), 50 + s.clusters);
    h.assign = RandAssign(s, 51 + s.clusters, /*outliers=*/true);
    h.centroid = RandNormal(h.centroid.size(), 52 + s.clusters);
    Dev dx = Dev::From(h.x), da = Dev::From(h.assign), dc = Dev::From(h.centroid);
    ASSERT_TRUE(UpdateCentroidsHost(s, h.x.data(), h.assign.data(), h.centroid.data()).ok());
    ASSERT_TRUE(UpdateCentroids(s, dx.as<float>(), da.as<int32_t>(), dc.as<float>(), nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const auto cen = dc.Get<float>(h.centroid.size());
    for (std::size_t i = 0; i < cen.size(); ++i) {
      ASSERT_NEAR(cen[i], h.centroid[i], kMeanTol * (1 + std::fabs(h.centroid[i])))
          << "cluster " << i / s.head_dim << " dim " << i % s.head_dim;
    }
  }
}

TEST_F(KMeansKernels, SummarizeMatchesHost) {
  struct Case {
    KMeansShape s;
    DType t;
  };
  const std::vector<Case> cases = {{Shape(2, 128, 2, 256, 37), DType::kBF16},
                                   {Shape(1, 64, 1, 4160, 300), DType::kF16},
                                   {Shape(1, 256, 2, 128, 20), DType::kF32},
                                   {Shape(2, 128, 1, 8192, 512), DType::kBF16},
                                   {Shape(1, 256, 1, 64, 1), DType::kF16}};
  for (const Case& cs : cases) {
    const KMeansShape& s = cs.s;
    SCOPED_TRACE(Describe(s) + " " + std::string(DTypeName(cs.t)));
    const int d = s.head_dim, c = s.clusters, kv = s.kv_heads;
    const int64_t rows = s.rows();
    const auto keys = Store(RandNormal(static_cast<std::size_t>(rows) * kv * d, 60 + c), cs.t);
    const auto values = Store(RandNormal(static_cast<std::size_t>(rows) * kv * d, 61 + c), cs.t);
    const auto l = RandMetric(kv, d, 62 + c);
    const auto trace = Traces(l, kv, d);
    HostRun h(s);
    h.x = RandNormal(h.x.size(), 63 + c);  // any x will do: the sums do not need x = k L
    h.xn2 = RowNorms2(h.x, d);
    h.assign = RandAssign(s, 64 + c, /*outliers=*/true);
    ASSERT_TRUE(SummarizeClustersHost(s, keys.data(), values.data(), cs.t, h.x.data(), h.xn2.data(),
                                      h.assign.data(), trace.data(), h.Stats())
                    .ok());
    Dev dk = Dev::From(keys), dv = Dev::From(values), dx = Dev::From(h.x), dn = Dev::From(h.xn2);
    Dev da = Dev::From(h.assign), dt = Dev::From(trace);
    const std::size_t cl = h.count.size();
    Dev dcount(cl * 4), dkm(cl * d * 4), dvm(cl * d * 4), dsp(cl * 4);
    const ClusterStats out{dcount.as<int32_t>(), dkm.as<float>(), dvm.as<float>(), dsp.as<float>()};
    ASSERT_TRUE(SummarizeClusters(s, dk.p, dv.p, cs.t, dx.as<float>(), dn.as<float>(),
                                  da.as<int32_t>(), dt.as<float>(), out, nullptr)
                    .ok());
    CUDA_OK(cudaDeviceSynchronize());
    const auto count = dcount.Get<int32_t>(cl);
    const auto km = dkm.Get<float>(cl * d), vm = dvm.Get<float>(cl * d);
    const auto sp = dsp.Get<float>(cl);
    // Mean |x|^2 of each cluster's members: the scale of the spread's rounding (it is a
    // difference of two such terms).
    std::vector<double> q(cl, 0.0);
    for (int g = 0; g < kv; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const int a = h.assign[static_cast<std::size_t>(g) * rows + r];
        if (a < 0) continue;
        const std::size_t idx =
            (static_cast<std::size_t>(g) * s.segments + r / s.segment_rows) * c + a;
        q[idx] += h.xn2[static_cast<std::size_t>(g) * rows + r];
      }
    }
    int empty = 0;
    for (std::size_t i = 0; i < cl; ++i) {
      ASSERT_EQ(count[i], h.count[i]) << "cluster " << i;
      empty += count[i] == 0;
      for (int e = 0; e < d; ++e) {
        ASSERT_NEAR(km[i * d + e], h.key_mean[i * d + e],
                    kMeanTol * (1 + std::fabs(h.key_mean[i * d + e])))
            << "cluster " << i << " dim " << e;
        ASSERT_NEAR(vm[i * d + e], h.value_mean[i * d + e],
                    kMeanTol * (1 + std::fabs(h.value_mean[i * d + e])))
            << "cluster " << i << " dim " << e;
      }
      const double qm = count[i] > 0 ? q[i] / count[i] : 0.0;
      const double tr = trace[i / (static_cast<std::size_t>(s.segments) * c)];
      ASSERT_NEAR(sp[i], h.spread[i], 1e-5 * qm / tr + 1e-5 * h.spread[i] + 1e-7)
          << "cluster " << i;
    }
    if (c > 8) {
      EXPECT_GT(empty, 0);  // RandAssign leaves a band of clusters empty
    }
  }
}

// The device pipeline recovers well-separated clusters, as the host one does.
TEST_F(KMeansKernels, PipelineRecoversSeparatedClusters) {
  const KMeansShape s = Shape(2, 128, 2, 512, 32);
  const Separated data = MakeSeparated(s, 70);
  const DType t = DType::kBF16;
  const auto keys = Store(data.keys, t);
  const auto values = Store(RandNormal(data.keys.size(), 71), t);
  const auto l = RandMetric(s.kv_heads, s.head_dim, 72);
  const auto trace = Traces(l, s.kv_heads, s.head_dim);
  HostRun h(s);
  Dev dk = Dev::From(keys), dv = Dev::From(values), dl = Dev::From(l), dt = Dev::From(trace);
  Dev dseed = Dev::From(data.seed);
  Dev dx(h.x.size() * 4), dn(h.xn2.size() * 4), dc(h.centroid.size() * 4);
  Dev da(h.assign.size() * 4), dd(h.dist.size() * 4);
  const std::size_t cl = h.count.size();
  Dev dcount(cl * 4), dkm(cl * s.head_dim * 4), dvm(cl * s.head_dim * 4), dsp(cl * 4);
  ASSERT_TRUE(
      MapToMetric(s, dk.p, t, dl.as<float>(), dx.as<float>(), dn.as<float>(), nullptr).ok());
  ASSERT_TRUE(SeedCentroids(s, dx.as<float>(), dseed.as<int32_t>(), dc.as<float>(), nullptr).ok());
  for (int it = 0; it < 3; ++it) {
    ASSERT_TRUE(AssignClusters(s, dx.as<float>(), dn.as<float>(), dc.as<float>(), da.as<int32_t>(),
                               dd.as<float>(), nullptr)
                    .ok());
    ASSERT_TRUE(UpdateCentroids(s, dx.as<float>(), da.as<int32_t>(), dc.as<float>(), nullptr).ok());
  }
  ASSERT_TRUE(AssignClusters(s, dx.as<float>(), dn.as<float>(), dc.as<float>(), da.as<int32_t>(),
                             dd.as<float>(), nullptr)
                  .ok());
  const ClusterStats out{dcount.as<int32_t>(), dkm.as<float>(), dvm.as<float>(), dsp.as<float>()};
  ASSERT_TRUE(SummarizeClusters(s, dk.p, dv.p, t, dx.as<float>(), dn.as<float>(), da.as<int32_t>(),
                                dt.as<float>(), out, nullptr)
                  .ok());
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(da.Get<int32_t>(h.assign.size()), data.label);
  for (int32_t n : dcount.Get<int32_t>(cl)) EXPECT_EQ(n, s.segment_rows / s.clusters);
  for (float v : dsp.Get<float>(cl)) {
    EXPECT_GE(v, 0.f);
    EXPECT_LT(v, 0.01f);
  }
}

// One 128K-token layer of an 8B model: 8 kv heads, d = 128, 16 segments of 8192 rows, 512
// clusters each, bf16 keys; MapToMetric + Seed + 6 x (Assign, Update) + Assign + Summarize.
TEST_F(KMeansKernels, Timing128K) {
  const KMeansShape s = Shape(8, 128, 16, 8192, 512);
  const int kv = s.kv_heads, d = s.head_dim, iters = 6;
  const int64_t rows = s.rows();
  const DType t = DType::kBF16;
  // One segment of random keys, repeated in every segment (the work does not depend on it).
  const std::size_t seg_elems = static_cast<std::size_t>(s.segment_rows) * kv * d;
  const auto seg_keys = Store(RandNormal(seg_elems, 80), t);
  std::vector<unsigned char> keys(seg_keys.size() * s.segments);
  for (int sg = 0; sg < s.segments; ++sg)
    std::memcpy(keys.data() + sg * seg_keys.size(), seg_keys.data(), seg_keys.size());
  const auto l = RandMetric(kv, d, 81);
  const auto trace = Traces(l, kv, d);
  const auto seed = RandSeeds(s, 82);
  const std::size_t hrows = static_cast<std::size_t>(kv) * rows;
  const std::size_t cl = static_cast<std::size_t>(kv) * s.segments * s.clusters;
  Dev dk = Dev::From(keys), dl = Dev::From(l), dt = Dev::From(trace), dseed = Dev::From(seed);
  Dev dx(hrows * d * 4), dn(hrows * 4), dc(cl * d * 4), da(hrows * 4), dd(hrows * 4);
  Dev dcount(cl * 4), dkm(cl * d * 4), dvm(cl * d * 4), dsp(cl * 4);
  ASSERT_NE(dx.p, nullptr);
  const ClusterStats out{dcount.as<int32_t>(), dkm.as<float>(), dvm.as<float>(), dsp.as<float>()};
  std::vector<cudaEvent_t> ev(2 * iters + 5);
  for (auto& e : ev) CUDA_OK(cudaEventCreate(&e));
  float ms[6] = {0, 0, 0, 0, 0, 0};    // map, seed, assign, update, summarize, total
  for (int rep = 0; rep < 2; ++rep) {  // the first run warms up (pool growth, module load)
    int k = 0;
    CUDA_OK(cudaEventRecord(ev[k++]));
    ASSERT_TRUE(
        MapToMetric(s, dk.p, t, dl.as<float>(), dx.as<float>(), dn.as<float>(), nullptr).ok());
    CUDA_OK(cudaEventRecord(ev[k++]));
    ASSERT_TRUE(
        SeedCentroids(s, dx.as<float>(), dseed.as<int32_t>(), dc.as<float>(), nullptr).ok());
    CUDA_OK(cudaEventRecord(ev[k++]));
    for (int it = 0; it <= iters; ++it) {
      ASSERT_TRUE(AssignClusters(s, dx.as<float>(), dn.as<float>(), dc.as<float>(),
                                 da.as<int32_t>(), dd.as<float>(), nullptr)
                      .ok());
      CUDA_OK(cudaEventRecord(ev[k++]));
      if (it == iters) break;
      ASSERT_TRUE(
          UpdateCentroids(s, dx.as<float>(), da.as<int32_t>(), dc.as<float>(), nullptr).ok());
      CUDA_OK(cudaEventRecord(ev[k++]));
    }
    ASSERT_TRUE(SummarizeClusters(s, dk.p, dk.p, t, dx.as<float>(), dn.as<float>(),
                                  da.as<int32_t>(), dt.as<float>(), out, nullptr)
                    .ok());
    CUDA_OK(cudaEventRecord(ev[k++]));
    ASSERT_EQ(k, static_cast<int>(ev.size()));
    CUDA_OK(cudaEventSynchronize(ev[k - 1]));
    auto span = [&](int a, int b) {
      float v = 0;
      cudaEventElapsedTime(&v, ev[a], ev[b]);
      return v;
    };
    ms[0] = span(0, 1);
    ms[1] = span(1, 2);
    ms[2] = ms[3] = 0;
    for (int it = 0, e = 2; it <= iters; ++it) {  // events: after assign, after update, ...
      ms[2] += span(e, e + 1);
      ++e;
      if (it == iters) break;
      ms[3] += span(e, e + 1);
      ++e;
    }
    ms[4] = span(k - 2, k - 1);
    ms[5] = span(0, k - 1);
  }
  const double assign_flop = 2.0 * kv * rows * s.clusters * d;
  std::printf(
      "[kmeans build 128K: kv 8, d 128, 16 x 8192 rows, C 512, bf16 keys, %d iterations]\n"
      "  total %.3f ms: MapToMetric %.3f, Seed %.3f, Assign %.3f (x%d, %.3f each, %.0f TFLOP/s), "
      "Update %.3f (x%d, %.3f each), Summarize %.3f\n",
      iters, ms[5], ms[0], ms[1], ms[2], iters + 1, ms[2] / (iters + 1),
      assign_flop / (1e-3 * ms[2] / (iters + 1)) / 1e12, ms[3], iters, ms[3] / iters, ms[4]);
  // Sanity of the full-size run: every row in range, the counts add up to the rows.
  const auto as = da.Get<int32_t>(hrows);
  for (std::size_t i = 0; i < hrows; ++i) ASSERT_TRUE(as[i] >= 0 && as[i] < s.clusters) << i;
  const auto count = dcount.Get<int32_t>(cl);
  const int64_t total = std::accumulate(count.begin(), count.end(), int64_t{0});
  EXPECT_EQ(total, static_cast<int64_t>(hrows));
  for (auto& e : ev) cudaEventDestroy(e);
}
#endif

}  // namespace
}  // namespace kvrt::gpu
