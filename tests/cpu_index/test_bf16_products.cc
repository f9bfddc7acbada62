// The k-means' bf16 screen (cpu_index/src/bf16_products.h): its error bound holds, the nearest
// centroid in exact arithmetic is always among the candidates, and a segment clustered with the
// screen is the one clustered in f32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "cpu_index/src/bf16_products.h"
#include "kvrt_common/dtype.h"
#include "kvrt_cpu_index/cluster.h"

namespace kvrt::cpu_index {
namespace {

float RoundBf16(float f) { return Bf16ToF32(F32ToBf16(f)); }

double Dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int i = 0; i < d; ++i) s += double(a[i]) * b[i];
  return s;
}

struct Case {
  int64_t n, c;
  int d;
  std::vector<float> x, cent, cn2;
};

// Rows near the centroids (clustered data, whose nearest centroids are close calls), some rows
// of large norm, two centroids almost equal (a near-tie for the rows near them).
Case MakeCase(int64_t n, int64_t c, int d, uint32_t seed) {
  Case k{n, c, d, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  k.cent.resize(static_cast<std::size_t>(c) * d);
  for (auto& e : k.cent) e = nd(rng);
  for (int i = 0; i < d; ++i) k.cent[d + i] = k.cent[i] * (1.f + 1e-4f) + 1e-4f * nd(rng);
  k.x.resize(static_cast<std::size_t>(n) * d);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t j = r % 7 == 0 ? 0 : static_cast<int64_t>(rng() % c);
    const float scale = r % 11 == 0 ? 1e4f : 1.f;
    for (int i = 0; i < d; ++i) k.x[r * d + i] = scale * (k.cent[j * d + i] + 0.3f * nd(rng));
  }
  k.cn2.resize(c);
  for (int64_t j = 0; j < c; ++j)
    k.cn2[j] = static_cast<float>(Dot(&k.cent[j * d], &k.cent[j * d], d));
  return k;
}

int64_t ExactNearest(const Case& k, int64_t r) {
  double best = -std::numeric_limits<double>::infinity();
  int64_t bj = -1;
  for (int64_t j = 0; j < k.c; ++j) {
    const double s = Dot(&k.x[r * k.d], &k.cent[j * k.d], k.d) - 0.5 * k.cn2[j];
    if (s > best) {
      best = s;
      bj = j;
    }
  }
  return bj;
}

// The candidates from products of bf16-rounded inputs, as the tiles compute them (exact products,
// here summed in double), on every machine: the bounds' logic, with or without AMX.
TEST(Bf16Screen, CandidatesHoldTheExactNearestForRoundedProducts) {
  const Case k = MakeCase(700, 96, 576, 3);
  std::vector<float> xr(k.x.size()), cr(k.cent.size());
  std::transform(k.x.begin(), k.x.end(), xr.begin(), RoundBf16);
  std::transform(k.cent.begin(), k.cent.end(), cr.begin(), RoundBf16);
  const internal::CentroidBounds bounds(k.cn2);
  std::vector<float> g(k.c);
  std::vector<int32_t> cand(k.c);
  int64_t total = 0;
  for (int64_t r = 0; r < k.n; ++r) {
    for (int64_t j = 0; j < k.c; ++j)
      g[j] = static_cast<float>(Dot(&xr[r * k.d], &cr[j * k.d], k.d));
    const float norm = static_cast<float>(std::sqrt(Dot(&k.x[r * k.d], &k.x[r * k.d], k.d)));
    const int m =
        internal::NearestCandidates(g.data(), bounds.shift_lo.data(), bounds.shift_hi.data(),
                                    bounds.slack.data(), k.c, norm, cand.data());
    ASSERT_GE(m, 1);
    ASSERT_TRUE(std::is_sorted(cand.begin(), cand.begin() + m));
    const int64_t want = ExactNearest(k, r);
    EXPECT_NE(std::find(cand.begin(), cand.begin() + m, want), cand.begin() + m) << "row " << r;
    total += m;
  }
  // The screen must screen: the rows near the near-tied pair keep both, most rows one or two.
  EXPECT_LT(total, 3 * k.n);
  // A row that is not a number has no candidate (the caller keeps f32's answer for it).
  std::fill(g.begin(), g.end(), std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(internal::NearestCandidates(g.data(), bounds.shift_lo.data(), bounds.shift_hi.data(),
                                        bounds.slack.data(), k.c, 1.f, cand.data()),
            0);
}

// The products on the tiles are within the bound the screen assumes (AMX machines only).
TEST(Bf16Screen, TileProductsAreWithinTheBound) {
  if (!internal::Bf16ProductsAvailable()) GTEST_SKIP() << "no AMX here (or KVRT_KMEANS_BF16=0)";
  // One padded block; blocks of 1024; a column count that is no multiple of the tiles' 16.
  for (const auto& [n, c] : {std::pair<int64_t, int64_t>{40, 80}, {1500, 80}, {370, 23}}) {
    const Case k = MakeCase(n, c, 576, 5);
    const internal::Bf16Rows rows(k.x.data(), k.n, k.d, k.c);
    auto products = internal::Bf16Products::Make(k.cent.data(), k.c, k.d, rows.block_rows());
    ASSERT_TRUE(products.ok()) << products.status();
    std::vector<float> g(static_cast<std::size_t>(rows.block_rows()) * k.c);
    for (int64_t b = 0; b < rows.blocks(); ++b) {
      ASSERT_TRUE((*products)->Block(rows, b, g.data()).ok());
      for (int64_t i = 0; i < rows.block_rows() && b * rows.block_rows() + i < k.n; ++i) {
        const int64_t r = b * rows.block_rows() + i;
        const double xn = std::sqrt(Dot(&k.x[r * k.d], &k.x[r * k.d], k.d));
        for (int64_t j = 0; j < k.c; ++j) {
          const double exact = Dot(&k.x[r * k.d], &k.cent[j * k.d], k.d);
          const double bound = internal::kBf16ProductError * xn * std::sqrt(k.cn2[j]);
          ASSERT_LE(std::fabs(g[i * k.c + j] - exact), bound) << "row " << r << " centroid " << j;
        }
      }
    }
    // Rows of another block size are refused, not misread.
    const std::vector<float> zeros(static_cast<std::size_t>(3000) * k.d, 0.f);
    const internal::Bf16Rows other(zeros.data(), 3000, k.d, k.c);
    if (other.block_rows() != rows.block_rows()) {
      EXPECT_FALSE((*products)->Block(other, 0, g.data()).ok());
    }
  }
}

// Keys of a bf16 store mapped by an f32 matrix on the tiles: within the split's 2^-16 (and the
// sums' rounding) of the exact product; rows that are not bf16 values are refused.
TEST(Bf16Screen, MapOfBf16RowsIsTheF32Product) {
  if (!internal::Bf16ProductsAvailable()) GTEST_SKIP() << "no AMX here (or KVRT_KMEANS_BF16=0)";
  const int d = 96;
  const int64_t n = 1100;  // a block of 1024 and a padded one
  std::mt19937 rng(31);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> rows(n * d), m(static_cast<std::size_t>(d) * d), x(n * d);
  for (auto& e : rows) e = RoundBf16(nd(rng));
  for (auto& e : m) e = nd(rng);
  ASSERT_TRUE(internal::MultiplyBf16Rows(rows.data(), n, d, m.data(), x.data()));
  for (int64_t r = 0; r < n; ++r)
    for (int j = 0; j < d; ++j) {
      double exact = 0, mag = 0;
      for (int i = 0; i < d; ++i) {
        exact += double(rows[r * d + i]) * m[i * d + j];
        mag += std::fabs(double(rows[r * d + i]) * m[i * d + j]);
      }
      ASSERT_LE(std::fabs(x[r * d + j] - exact), mag / 16384) << "row " << r << " column " << j;
    }
  rows[5 * d + 7] = 0.1f;  // not a bf16 value
  EXPECT_FALSE(internal::MultiplyBf16Rows(rows.data(), n, d, m.data(), x.data()));
}

// A block's scores stay within kMaxBlockScores (a thread keeps them): many centroids, fewer rows.
TEST(Bf16Screen, BlocksShrinkForManyCentroids) {
  const std::vector<float> x(static_cast<std::size_t>(2000) * 8, 0.f);
  EXPECT_EQ(internal::Bf16Rows(x.data(), 2000, 8, 512).block_rows(), 1024);
  EXPECT_EQ(internal::Bf16Rows(x.data(), 2000, 8, 8192).block_rows(), 128);
  EXPECT_EQ(internal::Bf16Rows(x.data(), 40, 8, 512).block_rows(), 64);
  EXPECT_EQ(internal::Bf16Rows(x.data(), 2000, 8, 1 << 30).block_rows(), 32);
}

// A segment clustered with the screen (its refinement over all 128 clusters) is the segment
// clustered in f32: the same order, sizes and centroids' members.
TEST(Bf16Screen, SegmentClustersAsInF32) {
  if (!internal::Bf16ProductsAvailable()) GTEST_SKIP() << "no AMX here (or KVRT_KMEANS_BF16=0)";
  const int d = 576;
  const int64_t n = 2048;
  std::mt19937 rng(23);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n * d), v(n * d), centers(40 * d);
  for (auto& e : centers) e = 3.f * nd(rng);
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < d; ++i) k[r * d + i] = centers[(r % 40) * d + i] + nd(rng);
  for (auto& e : v) e = nd(rng);
  ClusterConfig cfg;
  cfg.cluster_size = 16;  // 128 clusters: the refinement is screened
  SegmentClustering f32, screened;
  cfg.bf16_screen = false;
  ClusterSegment(k.data(), v.data(), n, d, nullptr, cfg, 9, &f32);
  cfg.bf16_screen = true;
  ClusterSegment(k.data(), v.data(), n, d, nullptr, cfg, 9, &screened);
  EXPECT_EQ(screened.order, f32.order);
  EXPECT_EQ(screened.size, f32.size);
}

}  // namespace
}  // namespace kvrt::cpu_index
