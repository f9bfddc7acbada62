// The host attention's products on the AMX tiles (cpu_index/src/bf16_tiles.h): exact products
// summed in f32 (the three-term split of the f32 operand), a head's result independent of the
// heads beside it, of rows given by pointer or in place, and NaN where f32 would give it. Skipped
// where the tiles do not run (no AMX, KVRT_HOST_TILES=0): the callers keep their f32 loops there,
// which test_attention covers.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu_index/src/bf16_tiles.h"
#include "kvrt_common/dtype.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"

namespace kvrt::cpu_index {
namespace {

using internal::kTileRows;
using internal::TileRows;

struct Rows {
  int64_t n;
  int d;
  std::vector<uint16_t> bf16;
  std::vector<const void*> ptrs;
};

Rows MakeRows(int64_t n, int d, uint32_t seed) {
  Rows r{n, d, std::vector<uint16_t>(static_cast<std::size_t>(n) * d), {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  for (auto& x : r.bf16) x = F32ToBf16(g(rng));
  for (int64_t j = 0; j < n; ++j) r.ptrs.push_back(r.bf16.data() + j * d);
  return r;
}

TileRows InPlace(const Rows& r) {
  return TileRows::Strided(r.bf16.data(), static_cast<std::size_t>(r.d));
}

TileRows ByPointer(const Rows& r) { return TileRows::Listed(r.ptrs.data()); }

// A sum of products in double and the sum of their magnitudes (the bound of its f32 rounding).
struct Exact {
  double sum = 0, magnitude = 0;
  void Add(double a, double b) {
    sum += a * b;
    magnitude += std::abs(a * b);
  }
};

// f32 queries with every significant bit in use (a bf16 query would hide a dropped term) over
// three orders of magnitude.
std::vector<float> MakeQueries(int nq, int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> q(static_cast<std::size_t>(nq) * d);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = g(rng) * std::pow(10.f, float(i % 3) - 1.f);
  return q;
}

// Short rows too: there the f32 sums' bound is below what a term dropped from the split would
// cost, so the bound checks the split as well as the sums.
class Bf16TilesScores : public ::testing::TestWithParam<int> {};

TEST_P(Bf16TilesScores, AreTheExactProductsSummedInF32) {
  if (!internal::AttentionTilesAvailable()) GTEST_SKIP() << "no AMX tiles here";
  const int d = GetParam(), nq = 5;
  const int64_t n = kTileRows + 77;
  const Rows rows = MakeRows(n, d, 1);
  const std::vector<float> q = MakeQueries(nq, d, 2);
  std::vector<float> s(static_cast<std::size_t>(nq) * n);
  ASSERT_TRUE(internal::TileScores(q.data(), nq, d, InPlace(rows), n, s.data(), n));
  for (int h = 0; h < nq; ++h)
    for (int64_t j = 0; j < n; ++j) {
      Exact e;
      for (int i = 0; i < d; ++i) e.Add(q[h * d + i], Bf16ToF32(rows.bf16[j * d + i]));
      // f32 sums of d exact products, three terms' sums added: within (d + 3) * 2^-24 of their
      // magnitudes (a term dropped from the split costs about 2^-17 of them).
      ASSERT_NEAR(s[h * n + j], e.sum, e.magnitude * (d + 3) * 0x1p-24)
          << "head " << h << " row " << j;
    }
}

INSTANTIATE_TEST_SUITE_P(Dims, Bf16TilesScores, ::testing::Values(32, 576));

TEST(Bf16Tiles, WeightedSumsAreTheExactProductsSummedInF32) {
  if (!internal::AttentionTilesAvailable()) GTEST_SKIP() << "no AMX tiles here";
  const int d = 72, nq = 3;
  for (const int64_t n : {int64_t{1}, int64_t{100}, kTileRows}) {
    const Rows rows = MakeRows(n, d, 3);
    std::vector<float> w = MakeQueries(nq, static_cast<int>(n), 4);
    for (auto& x : w) x = std::abs(x);
    std::vector<float> y(static_cast<std::size_t>(nq) * d);
    ASSERT_TRUE(internal::TileWeightedSums(w.data(), n, nq, InPlace(rows), n, d, y.data()));
    for (int h = 0; h < nq; ++h)
      for (int i = 0; i < d; ++i) {
        Exact e;
        for (int64_t j = 0; j < n; ++j) e.Add(w[h * n + j], Bf16ToF32(rows.bf16[j * d + i]));
        ASSERT_NEAR(y[h * d + i], e.sum, e.magnitude * (n + 3) * 0x1p-24)
            << "n " << n << " head " << h;
      }
  }
}

// A head's scores and sums are the same bit for bit alone, in a group of 20 (two products), and
// with its rows by pointer instead of in place (a partial block is copied, a full one is not).
TEST(Bf16Tiles, AHeadsResultIsItsOwnWhateverItsGroupAndRows) {
  if (!internal::AttentionTilesAvailable()) GTEST_SKIP() << "no AMX tiles here";
  const int d = 128, nq = 20;
  const int64_t n = kTileRows + 40;
  const Rows rows = MakeRows(n, d, 5);
  const std::vector<float> q = MakeQueries(nq, d, 6);
  std::vector<float> all(static_cast<std::size_t>(nq) * n);
  ASSERT_TRUE(internal::TileScores(q.data(), nq, d, InPlace(rows), n, all.data(), n));
  for (int h : {0, 7, 16, 19}) {
    std::vector<float> one(n), listed(n);
    ASSERT_TRUE(internal::TileScores(q.data() + h * d, 1, d, InPlace(rows), n, one.data(), n));
    ASSERT_TRUE(internal::TileScores(q.data() + h * d, 1, d, ByPointer(rows), n, listed.data(), n));
    EXPECT_EQ(std::memcmp(one.data(), all.data() + h * n, n * sizeof(float)), 0) << "head " << h;
    EXPECT_EQ(std::memcmp(one.data(), listed.data(), n * sizeof(float)), 0) << "head " << h;
  }
  std::vector<float> w(static_cast<std::size_t>(nq) * kTileRows);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::abs(q[i % q.size()]);
  std::vector<float> y(static_cast<std::size_t>(nq) * d), y1(d), y2(d);
  ASSERT_TRUE(
      internal::TileWeightedSums(w.data(), kTileRows, nq, InPlace(rows), kTileRows, d, y.data()));
  for (int h : {0, 15, 19}) {
    ASSERT_TRUE(internal::TileWeightedSums(w.data() + h * kTileRows, kTileRows, 1, InPlace(rows),
                                           kTileRows, d, y1.data()));
    ASSERT_TRUE(internal::TileWeightedSums(w.data() + h * kTileRows, kTileRows, 1, ByPointer(rows),
                                           kTileRows, d, y2.data()));
    EXPECT_EQ(std::memcmp(y1.data(), y.data() + h * d, d * sizeof(float)), 0) << "head " << h;
    EXPECT_EQ(std::memcmp(y1.data(), y2.data(), d * sizeof(float)), 0) << "head " << h;
  }
}

// NaN where an f32 loop gives it: a NaN weight makes its own head's sums NaN and no other's; a NaN
// value row in a bf16 store reaches every head that attends it; a query holding Inf is refused
// (its split would not be exact) and the attention falls back to f32.
TEST(Bf16Tiles, NaNGoesWhereF32SendsIt) {
  if (!internal::AttentionTilesAvailable()) GTEST_SKIP() << "no AMX tiles here";
  const int d = 64, nq = 3;
  const int64_t n = 50;
  const Rows rows = MakeRows(n, d, 7);
  std::vector<float> w(static_cast<std::size_t>(nq) * n, 0.5f);
  w[1 * n + 9] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> y(static_cast<std::size_t>(nq) * d);
  ASSERT_TRUE(internal::TileWeightedSums(w.data(), n, nq, InPlace(rows), n, d, y.data()));
  for (int i = 0; i < d; ++i) {
    EXPECT_TRUE(std::isfinite(y[i]));
    EXPECT_TRUE(std::isnan(y[d + i]));
    EXPECT_TRUE(std::isfinite(y[2 * d + i]));
  }

  std::vector<uint16_t> k(rows.bf16), v(rows.bf16);
  v[11 * d + 5] = F32ToBf16(std::numeric_limits<float>::quiet_NaN());
  HeadStore store(d, DType::kBF16);
  ASSERT_TRUE(store.Append(k.data(), v.data(), n, d).ok());
  std::vector<int64_t> ids;
  for (int64_t j = 0; j < n; ++j) ids.push_back(n - 1 - j);
  std::vector<float> q = MakeQueries(nq, d, 8), o(static_cast<std::size_t>(nq) * d), lse(nq);
  AttendStoreRowsGroup(q.data(), nq, 0.125f, store, ids.data(), n, o.data(), lse.data(),
                       /*tiles=*/true);
  for (int h = 0; h < nq; ++h) {
    EXPECT_TRUE(std::isnan(o[h * d + 5])) << h;
    EXPECT_TRUE(std::isfinite(o[h * d + 4])) << h;
    EXPECT_TRUE(std::isfinite(lse[h])) << h;
  }

  q[3] = std::numeric_limits<float>::infinity();
  std::vector<float> s(static_cast<std::size_t>(nq) * n);
  EXPECT_FALSE(internal::TileScores(q.data(), nq, d, InPlace(rows), n, s.data(), n));
}

// The attention's group passes on the tiles: a head's state is its pass alone's, bit for bit, for
// the cold rows (by id, out of store order), the tier's interleaved rows and the summary's
// estimate, over more rows than a block, with a group of 20 (two products); and the attention is
// the f32 loops' within f32 rounding.
TEST(Bf16Tiles, GroupPassesOnTheTilesAreEachHeadsOwn) {
  if (!internal::AttentionTilesAvailable()) GTEST_SKIP() << "no AMX tiles here";
  const int d = 96, nq = 20, kv = 2;
  const int64_t n = kTileRows + 130;
  const Rows k = MakeRows(n * kv, d, 9), v = MakeRows(n * kv, d, 10);
  const std::vector<float> q = MakeQueries(nq, d, 11);
  HeadStore store(d, DType::kBF16);
  ASSERT_TRUE(store.Append(k.bf16.data(), v.bf16.data(), n, d).ok());
  std::vector<int64_t> ids;
  for (int64_t j = n - 1; j >= 0; j -= 1) ids.push_back(j);
  std::vector<float> o(static_cast<std::size_t>(nq) * d), lse(nq), f32o(o.size()), f32l(nq);
  AttendStoreRowsGroup(q.data(), nq, 0.1f, store, ids.data(), n, o.data(), lse.data(), true);
  AttendStoreRowsGroup(q.data(), nq, 0.1f, store, ids.data(), n, f32o.data(), f32l.data(), false);
  const std::size_t stride = static_cast<std::size_t>(kv) * d;
  std::vector<float> dense(o.size()), dense_lse(nq);
  AttendDenseGroup(q.data(), nq, d, 0.1f, k.bf16.data() + d, v.bf16.data() + d, stride,
                   DType::kBF16, n, dense.data(), dense_lse.data(), true);
  for (int h = 0; h < nq; ++h) {
    std::vector<float> o1(d);
    float l1 = 0.f;
    AttendStoreRows(q.data() + h * d, 0.1f, store, ids.data(), n, o1.data(), &l1, true);
    EXPECT_EQ(std::memcmp(o1.data(), o.data() + h * d, d * sizeof(float)), 0) << "head " << h;
    EXPECT_EQ(std::memcmp(&l1, &lse[h], sizeof(float)), 0) << "head " << h;
    AttendDense(q.data() + h * d, d, 0.1f, k.bf16.data() + d, v.bf16.data() + d, stride,
                DType::kBF16, n, o1.data(), &l1, true);
    EXPECT_EQ(std::memcmp(o1.data(), dense.data() + h * d, d * sizeof(float)), 0) << "head " << h;
    EXPECT_EQ(std::memcmp(&l1, &dense_lse[h], sizeof(float)), 0) << "head " << h;
    EXPECT_NEAR(lse[h], f32l[h], 1e-5f * std::abs(f32l[h]) + 1e-5f) << "head " << h;
    for (int i = 0; i < d; ++i) EXPECT_NEAR(o[h * d + i], f32o[h * d + i], 1e-5f) << "head " << h;
  }

  // The estimate over a summary of 600 clusters (three blocks), two of them selected.
  ClusterSummary sum;
  sum.dim = d;
  std::mt19937 rng(12);
  std::normal_distribution<float> g(0.f, 1.f);
  for (int j = 0; j < 600; ++j) {
    sum.begin.push_back(j * 4);
    sum.size.push_back(j % 50 == 7 ? 0 : 1 + j % 5);
    sum.spread.push_back(0.1f);
    for (int t = 0; t < d; ++t) {
      sum.centroid.push_back(F32ToBf16(g(rng)));
      sum.value_mean.push_back(F32ToBf16(g(rng)));
    }
  }
  std::vector<float> dens(static_cast<std::size_t>(nq) * 600);
  for (auto& x : dens) x = 2.f * g(rng);
  const std::vector<int32_t> sel = {3, 400};
  const std::vector<float> log_size = LogSizes(sum);
  std::vector<float> eo(static_cast<std::size_t>(nq) * d), el(nq);
  EstimateUnselectedGroup(sum, dens.data(), nq, sel, log_size.data(), eo.data(), el.data(), true);
  for (int h : {0, 13, 19}) {
    std::vector<float> o1(d);
    float l1 = 0.f;
    EstimateUnselected(sum, dens.data() + h * 600, sel, o1.data(), &l1, true);
    EXPECT_EQ(std::memcmp(o1.data(), eo.data() + h * d, d * sizeof(float)), 0) << "head " << h;
    EXPECT_EQ(std::memcmp(&l1, &el[h], sizeof(float)), 0) << "head " << h;
  }
}

}  // namespace
}  // namespace kvrt::cpu_index
