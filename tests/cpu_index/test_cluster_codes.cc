// cluster kind, the second stage on codes (ClusterConfig::rescore_bits, cluster.h): the codes
// decode to within half a step of each residual, CodeScorer equals a decoded dot product, and a
// two-stage search on codes keeps the candidate rows that the decoded keys rank best.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "tests/cpu_index/normal_vector.h"

namespace kvrt::cpu_index {
namespace {

constexpr int kDim = 64;
constexpr int64_t kRows = 512;

// Keys around a few directions, channels of unequal spread (as real keys have).
std::vector<float> Keys(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<std::vector<float>> dirs(6, std::vector<float>(kDim));
  for (auto& d : dirs)
    for (auto& x : d) x = 2.f * nd(rng);
  std::vector<float> k(static_cast<std::size_t>(kRows) * kDim);
  for (int64_t i = 0; i < kRows; ++i) {
    const auto& d = dirs[rng() % dirs.size()];
    for (int j = 0; j < kDim; ++j) k[i * kDim + j] = d[j] + (0.2f + 0.02f * j) * nd(rng);
  }
  return k;
}

ClusterConfig SmallCluster() {
  ClusterConfig c;
  c.cluster_size = 8;
  c.segment_tokens = kRows;
  c.budget_fraction = 0.f;
  c.min_budget_tokens = 0;
  c.outlier_fraction = 0.02f;
  c.calibrate_queries = 0;
  return c;
}

struct Coded {
  std::vector<float> keys;
  SegmentClustering part;
  std::vector<uint16_t> centroid;  // bf16
  SegmentCodes codes;
};

Coded Encode(int bits) {
  Coded c;
  c.keys = Keys(5);
  std::vector<float> values(c.keys.size(), 0.f);
  const std::vector<float> identity = QueryMetricFactor(nullptr, 0, kDim, 0);
  ClusterSegment(c.keys.data(), values.data(), kRows, kDim, identity.data(), SmallCluster(), 7,
                 &c.part);
  c.centroid.resize(c.part.centroid.size());
  ConvertFromF32(c.part.centroid.data(), c.centroid.size(), DType::kBF16, c.centroid.data());
  EncodeResiduals(c.keys.data(), c.part, c.centroid.data(), kDim, bits, &c.codes);
  return c;
}

std::vector<float> RandomQuery(uint64_t seed, float sd = 1.f) {
  return testing::NormalVector(kDim, seed, sd);
}

// CodeScorer's scores of every clustered row of c for q, in layout order.
std::vector<float> ScoreClusteredRows(const Coded& c, const std::vector<float>& q, int bits) {
  const int64_t rb = CodeRowBytes(kDim, bits);
  const CodeScorer scorer(q.data(), kDim, bits, c.codes.offset.data(), c.codes.step.data());
  std::vector<float> out;
  int64_t row = 0;
  for (std::size_t j = 0; j < c.part.size.size(); ++j) {
    std::vector<float> got(c.part.size[j]);
    scorer.Score(c.centroid.data() + j * kDim, c.codes.code.data() + row * rb, c.part.size[j],
                 got.data());
    out.insert(out.end(), got.begin(), got.end());
    row += c.part.size[j];
  }
  return out;
}

TEST(ClusterCodes, DecodeToWithinHalfAStepOfTheResidualInsideTheGrid) {
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(bits);
    const Coded c = Encode(bits);
    const int64_t rb = CodeRowBytes(kDim, bits);
    ASSERT_EQ(c.codes.code.size(), static_cast<std::size_t>(kRows * rb));
    const int top = (1 << bits) - 1;
    int64_t row = 0, inside = 0, total = 0;
    for (std::size_t j = 0; j < c.part.size.size(); ++j)
      for (int32_t m = 0; m < c.part.size[j]; ++m, ++row) {
        const uint8_t* code = c.codes.code.data() + row * rb;
        for (int t = 0; t < kDim; ++t) {
          const float r =
              c.keys[c.part.order[row] * kDim + t] - Bf16ToF32(c.centroid[j * kDim + t]);
          const float lo = c.codes.offset[t], step = c.codes.step[t];
          const unsigned q = CodeAt(code, t, bits);
          const float decoded = lo + step * static_cast<float>(q);
          ++total;
          if (r < lo - 0.5f * step) {
            EXPECT_EQ(q, 0u);  // below the grid: its lowest level
          } else if (r > lo + (top + 0.5f) * step) {
            EXPECT_EQ(q, static_cast<unsigned>(top));
          } else {
            ++inside;
            EXPECT_LE(std::fabs(decoded - r), 0.5f * step * (1 + 1e-4f) + 1e-6f);
          }
        }
      }
    // The grid spans the bulk of each channel's residuals (more of it the more levels).
    EXPECT_GT(static_cast<double>(inside) / total, bits == 1 ? 0.5 : 0.9);
    for (int64_t i = row; i < kRows; ++i)  // the outliers' rows
      for (int64_t b = 0; b < rb; ++b) EXPECT_EQ(c.codes.code[i * rb + b], 0);
  }
}

// A channel that is constant over the segment (a padding dim, say) decodes to its value
// exactly, whatever the width: a grid step there would shift every score of the segment.
TEST(ClusterCodes, AConstantChannelDecodesToItsValue) {
  std::vector<float> keys = Keys(6);
  for (int64_t i = 0; i < kRows; ++i) keys[i * kDim + 5] = 0.75f;  // bf16-exact
  std::vector<float> values(keys.size(), 0.f);
  const std::vector<float> identity = QueryMetricFactor(nullptr, 0, kDim, 0);
  SegmentClustering part;
  ClusterSegment(keys.data(), values.data(), kRows, kDim, identity.data(), SmallCluster(), 7,
                 &part);
  std::vector<uint16_t> centroid(part.centroid.size());
  ConvertFromF32(part.centroid.data(), centroid.size(), DType::kBF16, centroid.data());
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(bits);
    SegmentCodes codes;
    EncodeResiduals(keys.data(), part, centroid.data(), kDim, bits, &codes);
    EXPECT_EQ(codes.step[5], 0.f);
    const int64_t rb = CodeRowBytes(kDim, bits);
    int64_t row = 0;
    for (std::size_t j = 0; j < part.size.size(); ++j)
      for (int32_t m = 0; m < part.size[j]; ++m, ++row) {
        const float decoded = Bf16ToF32(centroid[j * kDim + 5]) + codes.offset[5] +
                              codes.step[5] * CodeAt(codes.code.data() + row * rb, 5, bits);
        ASSERT_NEAR(decoded, 0.75f, 1e-6f) << "row " << row;
      }
  }
}

TEST(ClusterCodes, ScorerEqualsTheDecodedDotProduct) {
  const std::vector<float> q = RandomQuery(3);
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(bits);
    const Coded c = Encode(bits);
    const int64_t rb = CodeRowBytes(kDim, bits);
    const std::vector<float> got = ScoreClusteredRows(c, q, bits);
    int64_t row = 0;
    for (std::size_t j = 0; j < c.part.size.size(); ++j)
      for (int32_t m = 0; m < c.part.size[j]; ++m, ++row) {
        double want = 0;
        for (int t = 0; t < kDim; ++t) {
          const float k = Bf16ToF32(c.centroid[j * kDim + t]) + c.codes.offset[t] +
                          c.codes.step[t] * CodeAt(c.codes.code.data() + row * rb, t, bits);
          want += double(q[t]) * k;
        }
        ASSERT_NEAR(got[row], want, 1e-4 * (1 + std::fabs(want))) << "row " << row;
      }
  }
}

// More bits, closer scores: the mean absolute error of the codes' scores against the keys'
// falls with each doubling of the width (and at 8 bits is a small fraction of the scores' own
// deviation).
// A scorer of several queries (a GQA group's heads) gives each query the scores of a scorer of it
// alone, bit for bit, whatever the group size (not a multiple of the vector width, too) and the
// row width (an odd byte count leaves a tail nibble pair).
TEST(ClusterCodes, AGroupScorerGivesEachQueryItsOwnScorersScores) {
  std::mt19937_64 rng(11);
  for (int bits : {1, 2, 4, 8})
    for (int dim : {64, 36, 20})
      for (int nq : {1, 3, 4, 6, 9}) {
        SCOPED_TRACE(::testing::Message() << bits << " bits, dim " << dim << ", " << nq << " q");
        const int64_t rows = 13, rb = CodeRowBytes(dim, bits), stride = rows + 5;
        std::vector<uint8_t> code(static_cast<std::size_t>(rows * rb));
        for (auto& b : code) b = static_cast<uint8_t>(rng());
        const std::vector<float> offset = testing::NormalVector(dim, rng(), 0.3f);
        std::vector<float> step = testing::NormalVector(dim, rng(), 0.1f);
        for (auto& x : step) x = std::fabs(x);
        const std::vector<float> cf = testing::NormalVector(dim, rng());
        std::vector<uint16_t> centroid(dim);
        ConvertFromF32(cf.data(), dim, DType::kBF16, centroid.data());
        const std::vector<float> qs = testing::NormalVector(nq * dim, rng());
        const CodeScorer group(qs.data(), nq, dim, bits, offset.data(), step.data());
        std::vector<float> got(static_cast<std::size_t>(nq) * stride, -1.f);
        group.Score(centroid.data(), code.data(), rows, got.data(), stride);
        for (int j = 0; j < nq; ++j) {
          const CodeScorer alone(qs.data() + j * dim, dim, bits, offset.data(), step.data());
          std::vector<float> want(rows);
          alone.Score(centroid.data(), code.data(), rows, want.data());
          for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(got[j * stride + r], want[r]) << j << r;
          for (int64_t r = rows; r < stride; ++r) ASSERT_EQ(got[j * stride + r], -1.f);
        }
      }
}

TEST(ClusterCodes, ScoresApproachTheKeysWithMoreBits) {
  const std::vector<float> q = RandomQuery(4);
  double last = INFINITY;
  for (int bits : {1, 2, 4, 8}) {
    SCOPED_TRACE(bits);
    const Coded c = Encode(bits);
    const std::vector<float> got = ScoreClusteredRows(c, q, bits);
    double err = 0, sum = 0, sum2 = 0;
    const int64_t rows = static_cast<int64_t>(got.size());
    for (int64_t row = 0; row < rows; ++row) {
      double exact = 0;
      for (int t = 0; t < kDim; ++t) exact += double(q[t]) * c.keys[c.part.order[row] * kDim + t];
      err += std::fabs(got[row] - exact);
      sum += exact;
      sum2 += exact * exact;
    }
    err /= rows;
    const double sd = std::sqrt(sum2 / rows - (sum / rows) * (sum / rows));
    EXPECT_LT(err, 0.8 * last);
    last = err;
    if (bits == 8) {
      EXPECT_LT(err, 0.01 * sd);
    }
  }
}

// A two-stage search on codes ranks the candidates' rows by their decoded keys: the rows kept
// are the budget's best by the codes' scores, and MemoryBytes counts the codes.
TEST(ClusterCodes, RescoreOnCodesKeepsTheBestRowsByTheCodesScores) {
  IndexConfig cfg;
  cfg.cluster = SmallCluster();
  cfg.cluster.rescore = 3.f;
  cfg.cluster.rescore_bits = 2;
  cfg.cluster.scale = 0.2f;
  HeadStore store(kDim, DType::kF32);
  const std::vector<float> keys = Keys(9);
  std::vector<float> values(keys.size(), 0.5f);
  ASSERT_TRUE(store.Append(keys.data(), values.data(), kRows, kDim).ok());
  auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
  ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
  int64_t begin = -1;
  std::vector<int64_t> order;
  ASSERT_TRUE(index->TakeRowOrder(&begin, &order));
  ASSERT_TRUE(store.PermuteRows(begin, order).ok());
  const ClusterSummary& s = *GetClusterSummary(*index);
  const SegmentCodes* codes = GetClusterCodes(*index);
  ASSERT_NE(codes, nullptr);
  const int64_t rb = CodeRowBytes(kDim, 2);
  EXPECT_EQ(codes->code.size(), static_cast<std::size_t>(kRows * rb));
  EXPECT_GE(index->MemoryBytes(), s.Bytes() + codes->code.size());

  const std::vector<float> q = RandomQuery(11, 0.7f);
  SearchParams p;
  p.k = 30;
  SearchResult r;
  ASSERT_TRUE(index->Search(store, q.data(), p, &r).ok());
  // The candidates: the clusters of the densest prefix at 3 x the budget, which a plain index of
  // the same config selects (rescore off, the same rows, the same clusters).
  IndexConfig plain_cfg = cfg;
  plain_cfg.cluster.rescore = 0.f;
  HeadStore plain_store(kDim, DType::kF32);
  ASSERT_TRUE(plain_store.Append(keys.data(), values.data(), kRows, kDim).ok());
  auto plain = MakeIndex(IndexKind::kCluster, plain_cfg, kDim).value();
  ASSERT_TRUE(plain->Build(plain_store, nullptr, 0).ok());
  ASSERT_TRUE(plain->TakeRowOrder(&begin, &order));
  ASSERT_TRUE(plain_store.PermuteRows(begin, order).ok());
  SearchParams p3 = p;
  p3.k = 90;
  SearchResult cand;
  ASSERT_TRUE(plain->Search(plain_store, q.data(), p3, &cand).ok());
  const std::set<int64_t> outliers(s.outliers.begin(), s.outliers.end());
  std::vector<int64_t> cand_rows;
  for (int64_t id : cand.ids)
    if (!outliers.count(id)) cand_rows.push_back(id);
  // Each candidate row's score from its decoded key.
  std::vector<double> score(kRows, 0.0);
  for (int64_t c = 0; c < s.num_clusters(); ++c)
    for (int64_t row = s.begin[c]; row < s.begin[c] + s.size[c]; ++row) {
      double a = 0;
      for (int t = 0; t < kDim; ++t) {
        const float k = Bf16ToF32(s.centroid[c * kDim + t]) + codes->offset[t] +
                        codes->step[t] * CodeAt(codes->code.data() + row * rb, t, 2);
        a += double(q[t]) * k;
      }
      score[row] = a;
    }
  std::stable_sort(cand_rows.begin(), cand_rows.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  const std::size_t no = s.outliers.size();
  ASSERT_EQ(r.ids.size(), no + 30);
  const std::set<int64_t> got(r.ids.begin() + static_cast<std::ptrdiff_t>(no), r.ids.end());
  // Float against double scores may swap rows that tie to rounding at the budget's edge.
  int64_t agree = 0;
  for (int i = 0; i < 30; ++i) agree += got.count(cand_rows[i]);
  EXPECT_GE(agree, 29);
}

// The runtime budgets host memory by IndexBytesBound: with codes it must still bound what the
// index holds, built at once or grown segment by segment.
TEST(ClusterCodes, IndexBytesBoundCountsTheCodes) {
  IndexConfig cfg;
  cfg.cluster = SmallCluster();
  cfg.cluster.segment_tokens = 128;
  cfg.cluster.rescore = 4.f;
  std::vector<float> keys;
  for (uint64_t seed : {21, 22, 23, 24}) {
    const std::vector<float> k = Keys(seed);
    keys.insert(keys.end(), k.begin(), k.end());
  }
  const int64_t total = static_cast<int64_t>(keys.size()) / kDim;
  for (int bits : {0, 1, 2, 4, 8, -2}) {  // -2: 2-bit keys and 8-bit values in one stage
    SCOPED_TRACE(bits);
    cfg.cluster.rescore = bits < 0 ? 0.f : 4.f;
    cfg.cluster.rescore_bits = bits < 0 ? -bits : bits;
    cfg.cluster.value_bits = bits < 0 ? 8 : 0;
    bits = cfg.cluster.rescore_bits;
    HeadStore store(kDim, DType::kF32);
    ASSERT_TRUE(store.Append(keys.data(), keys.data(), 300, kDim).ok());
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
    EXPECT_LE(static_cast<int64_t>(index->MemoryBytes()),
              IndexBytesBound(IndexKind::kCluster, cfg, kDim, 300));
    for (int64_t n = 300; n < total;) {
      const int64_t add = std::min<int64_t>(total - n, 211);
      ASSERT_TRUE(store.Append(keys.data() + n * kDim, keys.data() + n * kDim, add, kDim).ok());
      n += add;
      ASSERT_TRUE(index->Add(store).ok());
      ASSERT_LE(static_cast<int64_t>(index->MemoryBytes()),
                IndexBytesBound(IndexKind::kCluster, cfg, kDim, n))
          << "grown to " << n;
    }
    const SegmentCodes* codes = GetClusterCodes(*index);
    ASSERT_EQ(codes != nullptr, bits > 0);
    if (codes != nullptr) {
      EXPECT_EQ(codes->code.size(),
                static_cast<std::size_t>(index->size() * CodeRowBytes(kDim, bits)));
    }
  }
}

// Segments clustered outside the index (the GPU build) arrive either over the store as it was
// (the index's order is then applied) or over a store already laid out in their order: the codes
// must be the same either way.
TEST(ClusterCodes, PresetSegmentsOverALaidOutStoreGetTheSameCodes) {
  const Coded c = Encode(2);  // a segment of kRows rows clustered as a preset would be
  IndexConfig cfg;
  cfg.cluster = SmallCluster();  // segment_tokens = kRows: one segment
  cfg.cluster.rescore = 4.f;
  cfg.cluster.rescore_bits = 2;
  std::vector<float> laid(c.keys.size());
  for (int64_t i = 0; i < kRows; ++i)
    std::copy_n(c.keys.data() + c.part.order[i] * kDim, kDim, laid.data() + i * kDim);
  std::vector<std::vector<uint8_t>> got;
  for (bool laid_out : {false, true}) {
    SCOPED_TRACE(laid_out);
    HeadStore store(kDim, DType::kF32);
    const std::vector<float>& rows = laid_out ? laid : c.keys;
    ASSERT_TRUE(store.Append(rows.data(), rows.data(), kRows, kDim).ok());
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    ASSERT_TRUE(PresetSegments(index.get(), 0, {c.part}, laid_out).ok());
    ASSERT_TRUE(index->Build(store, nullptr, 0).ok());
    const SegmentCodes* codes = GetClusterCodes(*index);
    ASSERT_NE(codes, nullptr);
    EXPECT_EQ(codes->code, c.codes.code);  // Encode's codes, from the keys in their first order
    EXPECT_EQ(codes->step, c.codes.step);
    got.push_back(codes->code);
  }
  EXPECT_EQ(got[0], got[1]);
}

// Selecting on codes with value_bits, the unselected clusters' state is the softmax of their rows'
// key-code scores over their decoded values: equal to a brute force over them (1e-4), its mass
// exactly the rows', its output within the codes' rounding of the exact values' (8 bits: close;
// 2 bits: looser) and well closer to it than the value means' estimate. For one query, and for a
// group of six selecting together (the rest's passes take four queries at a time: the second is
// partial).
TEST(ClusterCodes, ValueCodesEstimateTheRestFromItsRows) {
  // Values that vary within a cluster (independent of the keys): a cluster's mean says little.
  const std::vector<float> keys = Keys(31);
  const std::vector<float> values = testing::NormalVector(kRows * kDim, 32);
  for (int nq : {1, 6}) {
    SCOPED_TRACE(::testing::Message() << nq << " queries");
    const std::vector<float> qs = testing::NormalVector(nq * kDim, 33, 0.7f);
    auto search = [&](int value_bits, HeadStore* store, std::unique_ptr<KeyIndex>* index,
                      std::vector<SearchResult>* r) {
      IndexConfig cfg;
      cfg.cluster = SmallCluster();
      cfg.cluster.rescore_bits = 2;
      cfg.cluster.value_bits = value_bits;
      cfg.cluster.scale = 0.2f;
      cfg.cluster.group_select = nq > 1;
      ASSERT_TRUE(store->Append(keys.data(), values.data(), kRows, kDim).ok());
      *index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
      ASSERT_TRUE((*index)->Build(*store, nullptr, 0).ok());
      int64_t begin = -1;
      std::vector<int64_t> order;
      ASSERT_TRUE((*index)->TakeRowOrder(&begin, &order));
      ASSERT_TRUE(store->PermuteRows(begin, order).ok());
      SearchParams p;
      p.k = 40;
      r->resize(nq);
      ASSERT_TRUE((*index)->SearchGroup(*store, qs.data(), nq, p, r->data()).ok());
    };
    HeadStore store(kDim, DType::kF32);
    std::unique_ptr<KeyIndex> index;
    std::vector<SearchResult> means;
    search(0, &store, &index, &means);
    const ClusterSummary& s = *GetClusterSummary(*index);
    const SegmentCodes& kc = *GetClusterCodes(*index);
    // Per query, the rest's rows (not in the selection) with their scaled key-code scores, and
    // the brute force over them: the scores' softmax over their exact values (o), its log-sum-exp.
    struct RestRow {
      double score;
      int64_t row, cluster;
    };
    std::vector<std::vector<RestRow>> rest(nq);
    std::vector<std::vector<double>> o(nq, std::vector<double>(kDim, 0.0));
    std::vector<double> lse(nq);
    for (int j = 0; j < nq; ++j) {
      const std::set<int64_t> taken(means[j].ids.begin(), means[j].ids.end());
      const CodeScorer scorer(qs.data() + j * kDim, kDim, 2, kc.offset.data(), kc.step.data());
      double top = -INFINITY, z = 0;
      for (int64_t c = 0; c < s.num_clusters(); ++c) {
        if (taken.count(s.begin[c])) continue;
        std::vector<float> sc(s.size[c]);
        scorer.Score(s.centroid.data() + c * kDim,
                     kc.code.data() + s.begin[c] * CodeRowBytes(kDim, 2), s.size[c], sc.data());
        for (int32_t i = 0; i < s.size[c]; ++i) {
          rest[j].push_back({0.2 * sc[i], s.begin[c] + i, c});
          top = std::max(top, 0.2 * sc[i]);
        }
      }
      ASSERT_GT(rest[j].size(), 100u);
      std::vector<float> v(kDim);
      for (const RestRow& x : rest[j]) {
        const double w = std::exp(x.score - top);
        z += w;
        ConvertToF32(store.value(x.row), DType::kF32, kDim, v.data());
        for (int t = 0; t < kDim; ++t) o[j][t] += w * v[t];
      }
      for (double& x : o[j]) x /= z;
      lse[j] = top + std::log(z);
    }
    auto rel_err = [](const std::vector<float>& got, const std::vector<double>& want) {
      double num = 0, den = 0;
      for (int t = 0; t < kDim; ++t) {
        num += (got[t] - want[t]) * (got[t] - want[t]);
        den += want[t] * want[t];
      }
      return std::sqrt(num / den);
    };
    auto err = [&](const SearchResult& r, int j) { return rel_err(r.est_o, o[j]); };
    std::vector<double> last(nq, 0.0);
    for (int bits : {8, 2}) {
      SCOPED_TRACE(::testing::Message() << bits << "-bit values");
      HeadStore st(kDim, DType::kF32);
      std::unique_ptr<KeyIndex> idx;
      std::vector<SearchResult> r;
      search(bits, &st, &idx, &r);
      for (int j = 0; j < nq; ++j) {
        SCOPED_TRACE(j);
        EXPECT_EQ(r[j].ids, means[j].ids);  // the same selection: only the estimate changes
        ASSERT_EQ(r[j].est_o.size(), static_cast<std::size_t>(kDim));
        EXPECT_NEAR(r[j].est_lse, lse[j], 1e-4);
        const double e = err(r[j], j);
        EXPECT_LT(e, bits == 8 ? 0.03 : 0.45);  // rounding of white-noise values: ~0.01, ~0.3
        EXPECT_LT(e, 0.6 * err(means[j], j));
        EXPECT_GT(e, last[j]);
        last[j] = e;
        // And exactly the brute force over the decoded values (value mean + offset + step x code)
        // of the same rest (the selection is the same).
        const SegmentCodes& vc = *GetClusterValueCodes(*idx);
        std::vector<double> want(kDim, 0.0);
        std::vector<float> vm(kDim);
        for (const RestRow& x : rest[j]) {
          const double w = std::exp(x.score - lse[j]);  // sums to 1 over the rest
          ConvertToF32(s.value_mean.data() + x.cluster * kDim, DType::kBF16, kDim, vm.data());
          const uint8_t* row = vc.code.data() + x.row * CodeRowBytes(kDim, bits);
          for (int t = 0; t < kDim; ++t)
            want[t] += w * (vm[t] + vc.offset[t] + vc.step[t] * float(CodeAt(row, t, bits)));
        }
        EXPECT_LT(rel_err(r[j].est_o, want), 1e-4);
      }
    }
    std::printf("%d queries: rest estimate error, value means %.4f, 2-bit values %.4f (query 0)\n",
                nq, err(means[0], 0), last[0]);
  }
}

// value_bits needs the one-stage selection on codes and a width that divides a byte.
TEST(ClusterCodes, ValueCodesNeedTheSelectionOnCodes) {
  HeadStore store(kDim, DType::kF32);
  const std::vector<float> keys = Keys(9);
  ASSERT_TRUE(store.Append(keys.data(), keys.data(), kRows, kDim).ok());
  struct Case {
    float rescore;
    int key_bits, value_bits;
  };
  for (const Case c : {Case{0.f, 0, 2}, Case{4.f, 2, 2}, Case{0.f, 2, 3}, Case{0.f, 2, 16}}) {
    IndexConfig cfg;
    cfg.cluster = SmallCluster();
    cfg.cluster.rescore = c.rescore;
    cfg.cluster.rescore_bits = c.key_bits;
    cfg.cluster.value_bits = c.value_bits;
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    const absl::Status st = index->Build(store, nullptr, 0);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.key_bits << " " << c.value_bits;
    EXPECT_NE(st.message().find("value_bits"), std::string::npos);
  }
}

TEST(ClusterCodes, RejectsWidthsThatDoNotDivideAByte) {
  IndexConfig cfg;
  cfg.cluster = SmallCluster();
  cfg.cluster.rescore = 2.f;
  HeadStore store(kDim, DType::kF32);
  const std::vector<float> keys = Keys(9);
  ASSERT_TRUE(store.Append(keys.data(), keys.data(), kRows, kDim).ok());
  for (int bits : {-1, 3, 5, 16}) {
    cfg.cluster.rescore_bits = bits;
    auto index = MakeIndex(IndexKind::kCluster, cfg, kDim).value();
    const absl::Status st = index->Build(store, nullptr, 0);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bits;
    EXPECT_NE(st.message().find("rescore_bits"), std::string::npos);
  }
}

}  // namespace
}  // namespace kvrt::cpu_index
