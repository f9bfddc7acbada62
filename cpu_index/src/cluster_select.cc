// cluster kind, decode side: densities, selection by token budget / top-p, and the estimated
// partial state of the unselected clusters (formulas in cluster.h).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "bf16_tiles.h"
#include "kvrt_common/multiversion.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/dot.h"
#include "kvrt_cpu_index/exp_sum.h"
#include "parallel_range.h"

namespace kvrt::cpu_index {

std::size_t ClusterSummary::Bytes() const {
  const std::size_t c = size.size();
  return c * (2 * static_cast<std::size_t>(dim) * sizeof(uint16_t) + sizeof(int32_t) +
              sizeof(float) + sizeof(int64_t)) +
         outliers.size() * (sizeof(int64_t) + static_cast<std::size_t>(dim) * sizeof(uint16_t));
}

void ClusterDensity(const ClusterSummary& s, const float* scores, float q_norm2, float scale,
                    float spread_weight, float* density) {
  const int64_t c = s.num_clusters();
  const float a = spread_weight * 0.5f * scale * scale * q_norm2;
  for (int64_t j = 0; j < c; ++j) density[j] = scale * scores[j] + a * s.spread[j];
}

int64_t SelectClusters(const ClusterSummary& s, const float* density, int64_t budget_tokens,
                       float top_p, std::vector<int32_t>* selected) {
  selected->clear();
  const int64_t c = s.num_clusters();
  if (c == 0 || budget_tokens <= 0) return 0;
  auto before = [density](int32_t a, int32_t b) {
    return density[a] > density[b] || (density[a] == density[b] && a < b);
  };
  std::vector<int32_t> idx(c);
  std::iota(idx.begin(), idx.end(), 0);
  double total_mass = 0, mmax = -INFINITY;
  if (top_p > 0) {
    for (int64_t j = 0; j < c; ++j)
      mmax = std::max<double>(mmax, density[j] + std::log(double(s.size[j])));
    for (int64_t j = 0; j < c; ++j)
      total_mass += std::exp(density[j] + std::log(double(s.size[j])) - mmax);
  }
  // Sort a prefix that likely holds the selection (a quarter of the budget's rows in clusters of
  // 8 or more); extend to a full sort if it does not. budget_tokens may be INT64_MAX (every
  // cluster a candidate): no product of it.
  int64_t sorted = std::min<int64_t>(c, budget_tokens / 4 + 64);
  if (sorted < c) std::nth_element(idx.begin(), idx.begin() + sorted, idx.end(), before);
  std::sort(idx.begin(), idx.begin() + sorted, before);
  int64_t tokens = 0;
  double mass = 0;
  for (int64_t p = 0; p < c; ++p) {
    if (p == sorted) {
      std::sort(idx.begin() + sorted, idx.end(), before);
      sorted = c;
    }
    const int32_t j = idx[p];
    selected->push_back(j);
    tokens += s.size[j];
    if (tokens >= budget_tokens) break;
    if (top_p > 0) {
      mass += std::exp(density[j] + std::log(double(s.size[j])) - mmax);
      if (mass >= top_p * total_mass) break;
    }
  }
  return tokens;
}

namespace {
// A group this wide or wider computes its selection key in parallel, kKeyClusterGrain clusters a
// task (narrower groups are one unit of the runtime's loop over kv heads among several).
constexpr int kParallelQueries = 8;
constexpr int64_t kKeyClusterGrain = 256;

// Clusters [j0, j1)'s group keys from the live queries' log totals lse (see GroupSelectionKey):
// per cluster the max over the queries, then the sum of their exps, both in passes over the
// queries with the clusters in the inner loop (ExpNonPositive vectorises there).
KVRT_MULTIVERSION void GroupKeys(const ClusterSummary& s, const float* density, int64_t c,
                                 const std::vector<int>& live, const std::vector<float>& lse,
                                 int64_t j0, int64_t j1, float* key) {
  const int64_t n = j1 - j0;
  std::vector<float> m(n, -INFINITY), l(n, 0.f);
  for (int i : live) {
    const float* di = density + static_cast<std::size_t>(i) * c + j0;
    const float li = lse[i];
    for (int64_t j = 0; j < n; ++j) m[j] = std::max(m[j], di[j] - li);
  }
  for (int i : live) {
    const float* di = density + static_cast<std::size_t>(i) * c + j0;
    const float li = lse[i];
    for (int64_t j = 0; j < n; ++j) l[j] += ExpNonPositive((di[j] - li) - m[j]);
  }
  for (int64_t j = 0; j < n; ++j)
    key[j0 + j] = s.size[j0 + j] <= 0 || m[j] == -INFINITY ? -INFINITY : m[j] + std::log(l[j]);
}
}  // namespace

void GroupSelectionKey(const ClusterSummary& s, const float* density, int nq, float* key) {
  const std::vector<float> log_size = LogSizes(s);
  GroupSelectionKey(s, density, nq, log_size.data(), key);
}

void GroupSelectionKey(const ClusterSummary& s, const float* density, int nq, const float* log_size,
                       float* key) {
  const int64_t c = s.num_clusters();
  // Each query's log total over the clusters (its density plus the log size), in f32 exps
  // (ExpSum, vectorised; libm's double exps stood out in a wide group's step) summed in double.
  // A query whose total is not a number (a NaN density, an infinite one) or has no cluster takes
  // no part in the key.
  std::vector<float> lse(nq, -INFINITY);
  const bool wide = nq >= kParallelQueries;
  internal::ParallelRange(nq, wide ? 1 : nq, [&](int64_t i0, int64_t i1) {
    std::vector<float> x(c);
    for (int64_t i = i0; i < i1; ++i) {
      const float* di = density + static_cast<std::size_t>(i) * c;
      float m = -INFINITY;
      bool nan = false;
      for (int64_t j = 0; j < c; ++j) {
        x[j] = s.size[j] > 0 ? di[j] + log_size[j] : -INFINITY;
        nan |= std::isnan(x[j]);  // (no short cut: the loop vectorises)
        m = std::max(m, x[j]);
      }
      if (m == -INFINITY) continue;
      lse[i] = nan || !std::isfinite(m)
                   ? NAN
                   : m + static_cast<float>(std::log(ExpSum(x.data(), c, m, nullptr)));
    }
  });
  std::vector<int> live;
  for (int i = 0; i < nq; ++i)
    if (lse[i] > -INFINITY) live.push_back(i);  // false for NaN
  if (live.empty()) {
    std::fill(key, key + c, -INFINITY);
    return;
  }
  internal::ParallelRange(c, wide ? kKeyClusterGrain : c, [&](int64_t j0, int64_t j1) {
    GroupKeys(s, density, c, live, lse, j0, j1, key);
  });
}

std::vector<float> LogSizes(const ClusterSummary& s) {
  std::vector<float> out(s.size.size());
  for (std::size_t j = 0; j < out.size(); ++j) out[j] = std::log(static_cast<float>(s.size[j]));
  return out;
}

namespace {
// The estimate's clusters per block (f32 sums within, double across) and blocks per parallel
// wave (bounds the partial sums held: a wave's blocks x queries x dim floats).
constexpr int64_t kEstimateBlock = 256;
static_assert(kEstimateBlock <= internal::kTileRows, "a block is one product on the tiles");
constexpr int64_t kEstimateWave = 64;
constexpr int64_t kEstimateTaskMacs = int64_t{1} << 18;  // multiply-adds a task at least

// Block [j0, j0 + kEstimateBlock) of EstimateUnselectedGroup: the live queries' weighted value
// means part [nl, d] (f32) and weights lb [nl], from their log masses lm [nq, c] and maxima m;
// w: scratch [nl, kEstimateBlock]. A cluster a query skips (its own -inf) weighs 0 for it.
void EstimateBlock(const ClusterSummary& s, const float* lm, int64_t c,
                   const std::vector<int>& live, const float* m, int64_t j0, bool tiles, float* w,
                   float* part, double* lb) {
  const int d = s.dim;
  const int nl = static_cast<int>(live.size());
  const int64_t n = std::min(c, j0 + kEstimateBlock) - j0;
  std::fill(part, part + static_cast<std::size_t>(nl) * d, 0.f);
  for (int k = 0; k < nl; ++k) {
    const int h = live[k];
    const float* x = lm + static_cast<std::size_t>(h) * c + j0;
    // ExpSum: exp(-inf) is 0, a vectorised exp (libm's scalar one was most of the estimate).
    lb[k] = ExpSum(x, n, m[h], w + static_cast<std::size_t>(k) * kEstimateBlock);
  }
  const uint16_t* means = s.value_mean.data() + static_cast<std::size_t>(j0) * d;
  if (tiles && internal::TileWeightedSums(w, kEstimateBlock, nl,
                                          internal::TileRows::Strided(means, d), n, d, part))
    return;
  std::fill(part, part + static_cast<std::size_t>(nl) * d, 0.f);  // a failed product's leftovers
  AddWeightedRows(w, kEstimateBlock, nl, means, DType::kBF16, n, d, part);
}
}  // namespace

void EstimateUnselected(const ClusterSummary& s, const float* density,
                        const std::vector<int32_t>& selected, float* o, float* lse, bool tiles) {
  const std::vector<float> log_size = LogSizes(s);
  EstimateUnselectedGroup(s, density, 1, selected, log_size.data(), o, lse, tiles);
}

void EstimateUnselectedGroup(const ClusterSummary& s, const float* density, int nq,
                             const std::vector<int32_t>& selected, const float* log_size, float* o,
                             float* lse, bool tiles) {
  const int d = s.dim;
  const int64_t c = s.num_clusters();
  std::fill(o, o + static_cast<std::size_t>(nq) * d, 0.f);
  std::fill(lse, lse + nq, -INFINITY);
  // Per query: the log masses, the selected ones out, the max.
  // (In parallel over the queries, as the sums over the blocks below: with a wide group's
  // products on the tiles these passes would otherwise run on one core.)
  std::vector<float> lm(static_cast<std::size_t>(nq) * c), m(nq, -INFINITY);
  internal::ParallelRange(nq, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      float* lh = lm.data() + static_cast<std::size_t>(h) * c;
      const float* dh = density + static_cast<std::size_t>(h) * c;
      for (int64_t j = 0; j < c; ++j) lh[j] = dh[j] + log_size[j];
      for (int32_t j : selected) lh[j] = -INFINITY;
      for (int64_t j = 0; j < c; ++j) m[h] = std::max(m[h], lh[j]);
    }
  });
  std::vector<int> live;
  for (int h = 0; h < nq; ++h)
    if (m[h] != -INFINITY) live.push_back(h);
  if (live.empty()) return;
  const int nl = static_cast<int>(live.size());
  // NOTE: f32 sums of max-subtracted weights (each <= 1) times value means within a block, the
  // blocks summed in double: 5-10x faster than double throughout, relative error ~1e-6. A wave's
  // blocks are computed in parallel (a wide group's pass is one of few tasks: 4 for 16 heads over
  // one kv head) and summed in block order, so the result does not depend on the thread count.
  const std::size_t width = static_cast<std::size_t>(nl) * d;
  const int64_t blocks = (c + kEstimateBlock - 1) / kEstimateBlock;
  const int64_t wave = std::min<int64_t>(blocks, kEstimateWave);
  // Blocks per task: a task of at least kEstimateTaskMacs multiply-adds (one query's block at
  // head_dim 128 is an eighth of that: a task of one would cost more to schedule than to run).
  const int64_t grain = std::max<int64_t>(1, kEstimateTaskMacs / (kEstimateBlock * nl * d));
  std::vector<double> acc(width, 0.0), l(nl, 0.0);
  std::vector<float> parts(static_cast<std::size_t>(wave) * width);
  std::vector<double> lbs(static_cast<std::size_t>(wave) * nl);
  for (int64_t b0 = 0; b0 < blocks; b0 += wave) {
    const int64_t nb = std::min(wave, blocks - b0);
    internal::ParallelRange(nb, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> w(static_cast<std::size_t>(nl) * kEstimateBlock);
      for (int64_t i = i0; i < i1; ++i) {
        EstimateBlock(s, lm.data(), c, live, m.data(), (b0 + i) * kEstimateBlock, tiles, w.data(),
                      parts.data() + i * width, lbs.data() + i * nl);
      }
    });
    internal::ParallelRange(nl, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t i = 0; i < nb; ++i) {
          const float* part = parts.data() + i * width + static_cast<std::size_t>(k) * d;
          l[k] += lbs[i * nl + k];
          for (int t = 0; t < d; ++t) acc[static_cast<std::size_t>(k) * d + t] += part[t];
        }
    });
  }
  for (int k = 0; k < nl; ++k) {
    const int h = live[k];
    for (int t = 0; t < d; ++t)
      o[static_cast<std::size_t>(h) * d + t] =
          static_cast<float>(acc[static_cast<std::size_t>(k) * d + t] / l[k]);
    lse[h] = static_cast<float>(m[h] + std::log(l[k]));
  }
}

}  // namespace kvrt::cpu_index
