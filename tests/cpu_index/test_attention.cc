// HeadStore, dot products and host partial attention against double-precision references.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/exp_sum.h"
#include "kvrt_cpu_index/head_store.h"

namespace kvrt::cpu_index {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows stored in dtype t, plus their exact f32 values (what the store holds after rounding).
struct Rows {
  std::vector<uint16_t> raw16;
  std::vector<float> raw32;
  std::vector<float> exact;
  const void* data(DType t) const {
    return t == DType::kF32 ? static_cast<const void*>(raw32.data()) : raw16.data();
  }
};

Rows MakeRows(int64_t n, int d, DType t, float scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, scale);
  Rows r;
  r.exact.resize(n * d);
  for (auto& x : r.exact) x = g(rng);
  if (t == DType::kF32) {
    r.raw32 = r.exact;
  } else {
    r.raw16.resize(n * d);
    ConvertFromF32(r.exact.data(), r.exact.size(), t, r.raw16.data());
    ConvertToF32(r.raw16.data(), t, r.exact.size(), r.exact.data());
  }
  return r;
}

// Double-precision partial attention over the listed rows.
void Reference(const std::vector<float>& q, const Rows& k, const Rows& v, int d, float scale,
               const std::vector<int64_t>& ids, std::vector<double>* o, double* lse) {
  o->assign(d, 0.0);
  if (ids.empty()) {
    *lse = -std::numeric_limits<double>::infinity();
    return;
  }
  std::vector<double> s;
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i : ids) {
    double acc = 0;
    for (int j = 0; j < d; ++j) acc += static_cast<double>(q[j]) * k.exact[i * d + j];
    s.push_back(acc * scale);
    m = std::max(m, s.back());
  }
  double l = 0;
  for (double x : s) l += std::exp(x - m);
  *lse = m + std::log(l);
  for (std::size_t a = 0; a < ids.size(); ++a) {
    const double w = std::exp(s[a] - *lse);
    for (int j = 0; j < d; ++j) (*o)[j] += w * v.exact[ids[a] * d + j];
  }
}

class AttentionTest : public ::testing::TestWithParam<DType> {};

TEST_P(AttentionTest, StoreAppendDotAndStrides) {
  const DType t = GetParam();
  const int d = 48, heads = 3;
  const int64_t n = 37;
  // A [tokens, heads, d] tensor; the store takes head 1.
  Rows all = MakeRows(n * heads, d, t, 1.f, 1);
  HeadStore store(d, t);
  const std::size_t es = DTypeSize(t);
  const auto* base = static_cast<const unsigned char*>(all.data(t)) + 1 * d * es;
  ASSERT_TRUE(store.Append(base, base, 20, heads * d).ok());
  ASSERT_TRUE(
      store.Append(base + 20 * heads * d * es, base + 20 * heads * d * es, n - 20, heads * d).ok());
  ASSERT_EQ(store.size(), n);
  EXPECT_EQ(store.bytes(), 2 * n * d * es);
  std::vector<float> q(d), row(d), out(n);
  for (int j = 0; j < d; ++j) q[j] = 0.1f * (j % 7) - 0.3f;
  store.Dot(q.data(), 0, n, out.data());
  for (int64_t i = 0; i < n; ++i) {
    store.KeyF32(i, row.data());
    double ref = 0;
    for (int j = 0; j < d; ++j) {
      EXPECT_EQ(row[j], all.exact[(i * heads + 1) * d + j]);
      ref += static_cast<double>(q[j]) * row[j];
    }
    EXPECT_NEAR(out[i], ref, 1e-4 * (1 + std::abs(ref)));
    EXPECT_EQ(out[i], DotRow(q.data(), store.key(i), d, t));
  }
  const std::vector<int64_t> ids = {5, 0, 36, 5};
  std::vector<float> some(ids.size());
  store.DotIds(q.data(), ids.data(), ids.size(), some.data());
  for (std::size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(some[i], out[ids[i]]);
}

TEST_P(AttentionTest, PartialAttentionMatchesDoubleReference) {
  const DType t = GetParam();
  for (int d : {64, 128, 72}) {
    const int64_t n = 300;
    Rows k = MakeRows(n, d, t, 1.f, 2), v = MakeRows(n, d, t, 1.f, 3);
    HeadStore store(d, t);
    ASSERT_TRUE(store.Append(k.data(t), v.data(t), n, d).ok());
    std::vector<float> q(d);
    std::mt19937_64 rng(4);
    std::normal_distribution<float> g(0.f, 2.f);
    for (auto& x : q) x = g(rng);
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    std::vector<int64_t> all(n);
    for (int64_t i = 0; i < n; ++i) all[i] = i;
    std::vector<double> ro;
    double rlse;
    Reference(q, k, v, d, scale, all, &ro, &rlse);
    std::vector<float> o(d);
    float lse;
    AttendStoreAll(q.data(), scale, store, o.data(), &lse);
    EXPECT_NEAR(lse, rlse, 1e-4 * std::abs(rlse) + 1e-4);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(o[j], ro[j], 1e-4) << "d=" << d << " j=" << j;
    const std::vector<int64_t> some = {299, 3, 150, 7, 42};
    Reference(q, k, v, d, scale, some, &ro, &rlse);
    AttendStoreRows(q.data(), scale, store, some.data(), some.size(), o.data(), &lse);
    EXPECT_NEAR(lse, rlse, 1e-4 * std::abs(rlse) + 1e-4);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(o[j], ro[j], 1e-4);
  }
}

// A group's heads over the same rows in one pass: each head's state is AttendStoreRows's, bit for
// bit, over more rows than a scoring chunk and a value block, none, and a NaN value row; 6 heads
// of 72 dims (the value pass's blocks of 4 heads and 16 dims, and what is left of both).
TEST_P(AttentionTest, GroupPassEqualsOnePassPerHead) {
  const DType t = GetParam();
  const int d = 72, nq = 6;
  const int64_t n = 700;
  Rows k = MakeRows(n, d, t, 1.f, 8), v = MakeRows(n, d, t, 1.f, 9);
  HeadStore store(d, t);
  ASSERT_TRUE(store.Append(k.data(t), v.data(t), n, d).ok());
  std::mt19937_64 rng(10);
  std::normal_distribution<float> g(0.f, 2.f);
  std::vector<float> q(static_cast<std::size_t>(nq) * d);
  for (auto& x : q) x = g(rng);
  std::vector<int64_t> ids;
  for (int64_t i = n - 1; i >= 0; i -= 2) ids.push_back(i);  // 350 rows, not in store order
  for (const int64_t count : {int64_t{0}, int64_t{1}, static_cast<int64_t>(ids.size())}) {
    std::vector<float> o(static_cast<std::size_t>(nq) * d, 7.f), lse(nq, 7.f);
    AttendStoreRowsGroup(q.data(), nq, 0.125f, store, ids.data(), count, o.data(), lse.data());
    for (int h = 0; h < nq; ++h) {
      std::vector<float> o1(d, 5.f);
      float lse1 = 5.f;
      AttendStoreRows(q.data() + h * d, 0.125f, store, ids.data(), count, o1.data(), &lse1);
      EXPECT_EQ(std::vector<float>(o.begin() + h * d, o.begin() + (h + 1) * d), o1)
          << "count " << count << " head " << h;
      EXPECT_EQ(std::memcmp(&lse[h], &lse1, sizeof(float)), 0) << "count " << count;
    }
  }
  // A NaN value row reaches every head's output, as in the pass per head.
  HeadStore nan_store(d, DType::kF32);
  std::vector<float> kf(k.exact), vf(v.exact);
  vf[5 * d + 3] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_TRUE(nan_store.Append(kf.data(), vf.data(), n, d).ok());
  std::vector<float> o(static_cast<std::size_t>(nq) * d), lse(nq);
  AttendStoreRowsGroup(q.data(), nq, 0.125f, nan_store, ids.data(),
                       static_cast<int64_t>(ids.size()), o.data(), lse.data());
  for (int h = 0; h < nq; ++h) EXPECT_TRUE(std::isnan(o[h * d + 3])) << h;
}

// The tier's rows (kv heads interleaved, `stride` apart): a kv head's q heads in one pass equal
// one pass per head, bit for bit, at lengths around the pass's blocks (6 heads of 72 dims, as
// above).
TEST_P(AttentionTest, DenseGroupEqualsOnePassPerHead) {
  const DType t = GetParam();
  const int d = 72, nq = 6, kv = 3;
  const int64_t rows = 600;
  Rows k = MakeRows(rows * kv, d, t, 1.f, 11), v = MakeRows(rows * kv, d, t, 1.f, 12);
  std::mt19937_64 rng(13);
  std::normal_distribution<float> g(0.f, 2.f);
  std::vector<float> q(static_cast<std::size_t>(nq) * d);
  for (auto& x : q) x = g(rng);
  const std::size_t stride = static_cast<std::size_t>(kv) * d, esz = DTypeSize(t);
  const auto* kb = static_cast<const unsigned char*>(k.data(t)) + d * esz;  // kv head 1
  const auto* vb = static_cast<const unsigned char*>(v.data(t)) + d * esz;
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{255}, int64_t{256}, int64_t{257}, rows}) {
    std::vector<float> o(static_cast<std::size_t>(nq) * d, 7.f), lse(nq, 7.f);
    AttendDenseGroup(q.data(), nq, d, 0.125f, kb, vb, stride, t, n, o.data(), lse.data());
    for (int h = 0; h < nq; ++h) {
      std::vector<float> o1(d, 5.f);
      float lse1 = 5.f;
      AttendDense(q.data() + h * d, d, 0.125f, kb, vb, stride, t, n, o1.data(), &lse1);
      EXPECT_EQ(std::vector<float>(o.begin() + h * d, o.begin() + (h + 1) * d), o1)
          << "n " << n << " head " << h;
      EXPECT_EQ(std::memcmp(&lse[h], &lse1, sizeof(float)), 0) << "n " << n;
    }
  }
}

TEST_P(AttentionTest, MergeOfAnySplitEqualsWhole) {
  const DType t = GetParam();
  const int d = 64;
  const int64_t n = 200;
  Rows k = MakeRows(n, d, t, 1.5f, 5), v = MakeRows(n, d, t, 1.f, 6);
  HeadStore store(d, t);
  ASSERT_TRUE(store.Append(k.data(t), v.data(t), n, d).ok());
  std::vector<float> q(d, 0.2f), whole(d);
  float whole_lse;
  AttendStoreAll(q.data(), 0.125f, store, whole.data(), &whole_lse);
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    // Random partition into 1..5 parts (some possibly empty), merged in random order.
    const int parts = 1 + trial % 5;
    std::vector<std::vector<int64_t>> part(parts);
    for (int64_t i = 0; i < n; ++i) part[rng() % parts].push_back(i);
    std::vector<float> acc(d, 0.f), o(d);
    float acc_lse = kNegInf, lse;
    for (const auto& p : part) {
      AttendStoreRows(q.data(), 0.125f, store, p.data(), p.size(), o.data(), &lse);
      MergeInto(acc.data(), &acc_lse, o.data(), lse, d);
    }
    EXPECT_NEAR(acc_lse, whole_lse, 1e-5f * std::abs(whole_lse) + 1e-5f);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(acc[j], whole[j], 1e-5f);
  }
  // Dense path over the same rows agrees with the store path.
  std::vector<float> dense(d);
  float dense_lse;
  AttendDense(q.data(), d, 0.125f, k.data(t), v.data(t), d, t, n, dense.data(), &dense_lse);
  EXPECT_FLOAT_EQ(dense_lse, whole_lse);
  for (int j = 0; j < d; ++j) EXPECT_FLOAT_EQ(dense[j], whole[j]);
}

INSTANTIATE_TEST_SUITE_P(DTypes, AttentionTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// A row scored by a group's queries at once equals DotRow's score for each, bit for bit, in every
// dtype, at widths with a tail after the 16-lane blocks and at group sizes that take the bf16
// kernel's blocks of 8 and 4 queries and its single ones (the bf16 row is widened once a block).
TEST(Dot, RowMultiEqualsDotRowBitForBit) {
  std::mt19937_64 rng(12);
  std::normal_distribution<float> g(0.f, 3.f);
  for (const DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (const int d : {64, 72, 128, 256, 600, 1024, 1030})
      for (const int nq : {1, 5, 16, 23}) {
        Rows row = MakeRows(1, d, t, 1.f, 13 + d);
        std::vector<float> qs(static_cast<std::size_t>(nq) * d);
        for (auto& x : qs) x = g(rng);
        std::vector<float> multi(nq);
        DotRowMulti(qs.data(), nq, row.data(t), d, t, multi.data());
        for (int j = 0; j < nq; ++j) {
          const float one = DotRow(qs.data() + static_cast<std::size_t>(j) * d, row.data(t), d, t);
          EXPECT_EQ(std::memcmp(&multi[j], &one, sizeof(float)), 0)
              << DTypeName(t) << " d " << d << " nq " << nq << " query " << j << ": " << multi[j]
              << " vs " << one;
        }
      }
  }
}

// A run of rows' weighted shares (AddWeightedRows) equals AddScaledRow row by row, bit for bit,
// for every head of 1 to 6 (past the bf16 kernel's 4), with zero weights, and at widths with a
// tail after the 16-lane chunks.
TEST(Dot, WeightedRowsEqualScaledRowByRow) {
  std::mt19937_64 rng(21);
  std::normal_distribution<float> g(0.f, 1.f);
  for (const DType t : {DType::kBF16, DType::kF32})
    for (const int d : {16, 72, 576})
      for (const int nh : {1, 4, 6}) {
        const int n = 37;
        Rows rows = MakeRows(n, d, t, 1.f, 3 + d);
        std::vector<float> w(static_cast<std::size_t>(nh) * n);
        for (std::size_t i = 0; i < w.size(); ++i) w[i] = i % 5 == 2 ? 0.f : std::abs(g(rng));
        std::vector<float> y(static_cast<std::size_t>(nh) * d), want(y.size());
        for (std::size_t i = 0; i < y.size(); ++i) y[i] = want[i] = g(rng);
        AddWeightedRows(w.data(), n, nh, rows.data(t), t, n, d, y.data());
        std::vector<float> x(d);
        for (int j = 0; j < n; ++j) {
          ConvertToF32(static_cast<const unsigned char*>(rows.data(t)) + j * d * DTypeSize(t), t, d,
                       x.data());
          AddScaledRow(w.data() + j, n, nh, x.data(), want.data(), d);
        }
        EXPECT_EQ(std::memcmp(y.data(), want.data(), y.size() * sizeof(float)), 0)
            << DTypeName(t) << " d " << d << " heads " << nh;
      }
}

// The masses' exp (ExpNonPositive, ExpSum): within 2^-21 of the double exp over float's range,
// exactly 1 at 0, 0 below -87 and for NaN; ExpSum's terms are ExpNonPositive's (up to the fused
// multiply-adds of the ISA it dispatched to) and its sum their double sum, whatever the length's
// remainder modulo its 16 lanes.
TEST(ExpSum, MatchesTheDoubleExpAndSumsItsTerms) {
  EXPECT_EQ(ExpNonPositive(0.f), 1.f);
  EXPECT_EQ(ExpNonPositive(-88.f), 0.f);
  EXPECT_EQ(ExpNonPositive(-std::numeric_limits<float>::infinity()), 0.f);
  EXPECT_EQ(ExpNonPositive(std::numeric_limits<float>::quiet_NaN()), 0.f);
  for (float x = -87.f; x <= 0.f; x += 0.0037f) {
    const double want = std::exp(static_cast<double>(x));
    ASSERT_NEAR(ExpNonPositive(x), want, want * 0x1p-21) << x;
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 6.f);
  for (int n : {0, 1, 15, 16, 17, 100, 1000}) {
    std::vector<float> x(n), w(n, -1.f);
    float m = -std::numeric_limits<float>::infinity();
    for (float& v : x) m = std::max(m, v = dist(rng));
    double want = 0;
    for (float v : x) want += static_cast<double>(ExpNonPositive(v - m));
    EXPECT_NEAR(ExpSum(x.data(), n, m, w.data()), want, 1e-6 * want) << n;
    EXPECT_NEAR(ExpSum(x.data(), n, m, nullptr), want, 1e-6 * want) << n;
    for (int i = 0; i < n; ++i) {
      const float e = ExpNonPositive(x[i] - m);
      ASSERT_NEAR(w[i], e, e * 0x1p-21) << n << " " << i;
    }
  }
}

TEST(Attention, EmptySetAndInfinities) {
  const int d = 8;
  HeadStore store(d, DType::kF32);
  std::vector<float> q(d, 1.f), o(d, 123.f);
  float lse = 0.f;
  AttendStoreAll(q.data(), 1.f, store, o.data(), &lse);  // empty store
  EXPECT_EQ(lse, kNegInf);
  for (float x : o) EXPECT_EQ(x, 0.f);
  AttendStoreRows(q.data(), 1.f, store, nullptr, 0, o.data(), &lse);
  EXPECT_EQ(lse, kNegInf);

  // Empty + empty stays empty, no NaN.
  std::vector<float> a(d, 0.f), b(d, 0.f);
  float la = kNegInf;
  MergeInto(a.data(), &la, b.data(), kNegInf, d);
  EXPECT_EQ(la, kNegInf);
  for (float x : a) EXPECT_EQ(x, 0.f);
  // Empty into non-empty and non-empty into empty: the non-empty state, unchanged.
  std::vector<float> c(d, 0.5f);
  float lc = 2.f;
  MergeInto(c.data(), &lc, a.data(), kNegInf, d);
  EXPECT_EQ(lc, 2.f);
  for (float x : c) EXPECT_EQ(x, 0.5f);
  MergeInto(a.data(), &la, c.data(), lc, d);
  EXPECT_EQ(la, 2.f);
  for (float x : a) EXPECT_EQ(x, 0.5f);
  // Equal states merge to the same output with lse + log 2.
  MergeInto(a.data(), &la, c.data(), lc, d);
  EXPECT_NEAR(la, 2.f + std::log(2.f), 1e-6f);
  for (float x : a) EXPECT_NEAR(x, 0.5f, 1e-6f);

  // Keys so large the scores overflow f32 are the caller's problem; very negative but finite
  // scores must not underflow the whole set to NaN.
  std::vector<float> kk(2 * d, -1e3f), vv(2 * d, 1.f);
  ASSERT_TRUE(store.Append(kk.data(), vv.data(), 2, d).ok());
  AttendStoreAll(q.data(), 1.f, store, o.data(), &lse);
  EXPECT_NEAR(lse, -8e3f + std::log(2.f), 1e-2f);
  for (float x : o) EXPECT_NEAR(x, 1.f, 1e-6f);
}

TEST(HeadStore, PermuteRowsMovesKeysAndValuesTogether) {
  const int d = 8;
  HeadStore store(d, DType::kF32);
  std::vector<float> k(6 * d), v(6 * d);
  for (int i = 0; i < 6 * d; ++i) {
    k[i] = static_cast<float>(i / d);
    v[i] = static_cast<float>(100 + i / d);
  }
  ASSERT_TRUE(store.Append(k.data(), v.data(), 6, d).ok());
  ASSERT_TRUE(store.PermuteRows(2, {3, 0, 2, 1}).ok());  // rows 2..5 <- old 5, 2, 4, 3
  const float want[6] = {0, 1, 5, 2, 4, 3};
  for (int r = 0; r < 6; ++r) {
    std::vector<float> kr(d);
    store.KeyF32(r, kr.data());
    EXPECT_EQ(kr[0], want[r]);
    EXPECT_EQ(static_cast<const float*>(store.value(r))[d - 1], 100 + want[r]);
  }
  EXPECT_FALSE(store.PermuteRows(2, {0, 0, 1, 2}).ok());  // not a permutation
  EXPECT_FALSE(store.PermuteRows(4, {0, 1, 2}).ok());     // past the end
}

// Past one block of the permutation's parallel copies (1024 rows), with a partial last block and
// rows left in place before the range: every row lands where the order says, keys with values.
TEST(HeadStore, PermuteRowsOverManyBlocks) {
  const int d = 4;
  const int64_t n = 2600, begin = 7;
  HeadStore store(d, DType::kF32);
  std::vector<float> k((begin + n) * d), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i / d);
    v[i] = -static_cast<float>(i / d);
  }
  ASSERT_TRUE(store.Append(k.data(), v.data(), begin + n, d).ok());
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = (i * 1181) % n;  // 1181 is prime to 2600
  ASSERT_TRUE(store.PermuteRows(begin, order).ok());
  for (int64_t r = 0; r < begin + n; ++r) {
    const float want = static_cast<float>(r < begin ? r : begin + order[r - begin]);
    const auto* kr = static_cast<const float*>(store.key(r));
    const auto* vr = static_cast<const float*>(store.value(r));
    ASSERT_EQ(kr[0], want) << r;
    ASSERT_EQ(kr[d - 1], want) << r;
    ASSERT_EQ(vr[0], -want) << r;
  }
}

TEST(HeadStore, LargeStoresAreHugePageAlignedAndKeepTheirRowsWhenGrown) {
  // The direct step registers stores in chunks from row 0 (cudaHostRegister pins whole pages) and
  // a store of 2 MiB or more asks for transparent huge pages, which need 2 MiB alignment.
  const int d = 128;
  HeadStore store(d, DType::kF32);        // rows are given in the storage dtype
  ASSERT_TRUE(store.Reserve(1000).ok());  // 500 KB: page-aligned
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(store.keys()) % 4096, 0u);
  std::vector<float> k(1000 * d), v(1000 * d);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i % 251);
    v[i] = -static_cast<float>(i % 127);
  }
  ASSERT_TRUE(store.Append(k.data(), v.data(), 1000, d).ok());
  ASSERT_TRUE(store.Reserve(40000).ok());  // 20 MB each: moved into huge-page-aligned memory
  for (const void* p : {store.keys(), store.values()})
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % (std::size_t{2} << 20), 0u);
  EXPECT_GE(store.capacity(), 40000);
  for (int r : {0, 1, 500, 999}) {
    std::vector<float> kr(d);
    store.KeyF32(r, kr.data());
    const auto* vr = static_cast<const float*>(store.value(r));
    for (int j = 0; j < d; ++j) {
      EXPECT_EQ(kr[j], k[static_cast<std::size_t>(r) * d + j]);
      EXPECT_EQ(vr[j], v[static_cast<std::size_t>(r) * d + j]);
    }
  }
}

// A prompt-sized append (past one block of 1024 rows, a partial last block) from rows strided
// over two kv heads: every row copied, the NaN/Inf rows of every block found, in row order.
TEST(HeadStore, ALargeStridedAppendCopiesEveryRowAndFindsItsNonFiniteOnes) {
  const int d = 4;
  const int64_t n = 3000;
  HeadStore store(d, DType::kF32);
  std::vector<float> first(3 * d, 1.f);
  ASSERT_TRUE(store.Append(first.data(), first.data(), 3, d).ok());
  std::vector<float> k(n * 2 * d), v(k.size());  // [n, 2 heads, d]: head 1 is appended
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i);
    v[i] = -static_cast<float>(i);
  }
  k[(5 * 2 + 1) * d + 2] = NAN;
  v[(1500 * 2 + 1) * d] = -INFINITY;
  k[(2999 * 2 + 1) * d + 3] = INFINITY;
  k[(2000 * 2) * d] = NAN;  // head 0: not appended
  ASSERT_TRUE(store.Append(k.data() + d, v.data() + d, n, 2 * d).ok());
  ASSERT_EQ(store.size(), 3 + n);
  EXPECT_EQ(store.nonfinite_rows(), (std::vector<int64_t>{3 + 5, 3 + 1500, 3 + 2999}));
  for (int64_t r = 0; r < n; ++r) {
    const std::size_t src = static_cast<std::size_t>(r * 2 + 1) * d;
    ASSERT_EQ(std::memcmp(store.key(3 + r), k.data() + src, d * sizeof(float)), 0) << r;
    ASSERT_EQ(std::memcmp(store.value(3 + r), v.data() + src, d * sizeof(float)), 0) << r;
  }
}

// A device copy writes a prompt's rows straight into the registered store, then AppendWritten
// appends them: the same store as Append's, NaN/Inf rows found, no room past capacity.
TEST(HeadStore, RowsWrittenInPlaceAppendLikeAppendedRows) {
  const int d = 8;
  HeadStore in_place(d, DType::kF32), appended(d, DType::kF32);
  std::vector<float> k(10 * d), v(10 * d);
  for (int i = 0; i < 10 * d; ++i) {
    k[i] = static_cast<float>(i);
    v[i] = static_cast<float>(-i);
  }
  k[7 * d + 3] = std::numeric_limits<float>::infinity();
  ASSERT_TRUE(appended.Append(k.data(), v.data(), 4, d).ok());
  ASSERT_TRUE(appended.Append(k.data() + 4 * d, v.data() + 4 * d, 6, d).ok());
  ASSERT_TRUE(in_place.Append(k.data(), v.data(), 4, d).ok());
  ASSERT_TRUE(in_place.Reserve(10).ok());
  std::memcpy(in_place.next_keys(), k.data() + 4 * d, 6 * d * sizeof(float));
  std::memcpy(in_place.next_values(), v.data() + 4 * d, 6 * d * sizeof(float));
  ASSERT_TRUE(in_place.AppendWritten(6).ok());
  ASSERT_EQ(in_place.size(), 10);
  EXPECT_EQ(in_place.nonfinite_rows(), appended.nonfinite_rows());
  EXPECT_EQ(in_place.nonfinite_rows(), std::vector<int64_t>{7});
  for (int r = 0; r < 10; ++r) {
    EXPECT_EQ(std::memcmp(in_place.key(r), appended.key(r), d * sizeof(float)), 0) << r;
    EXPECT_EQ(std::memcmp(in_place.value(r), appended.value(r), d * sizeof(float)), 0) << r;
  }
  const absl::Status past = in_place.AppendWritten(in_place.capacity() - in_place.size() + 1);
  EXPECT_EQ(past.code(), absl::StatusCode::kFailedPrecondition) << past;
  EXPECT_EQ(in_place.size(), 10) << "a refused call changes nothing";
}

}  // namespace
}  // namespace kvrt::cpu_index
