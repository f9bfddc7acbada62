// cluster kind, decode side: densities, selection by token budget / top-p, and the estimated
// partial state of the unselected clusters (formulas in cluster.h).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/dot.h"
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
constexpr int64_t kKeyClusterGrain = 1024;

// Cluster j's group key from the queries' log totals lse (see GroupSelectionKey).
float GroupKeyOf(const ClusterSummary& s, const float* density, int nq, int64_t c,
                 const double* lse, int64_t j) {
  if (s.size[j] <= 0) return -INFINITY;
  double m = -INFINITY;
  for (int i = 0; i < nq; ++i)
    if (lse[i] > -INFINITY) m = std::max<double>(m, density[i * c + j] - lse[i]);
  if (m == -INFINITY) return -INFINITY;
  double l = 0;
  for (int i = 0; i < nq; ++i)
    if (lse[i] > -INFINITY) l += std::exp(density[i * c + j] - lse[i] - m);
  return static_cast<float>(m + std::log(l));
}
}  // namespace

void GroupSelectionKey(const ClusterSummary& s, const float* density, int nq, float* key) {
  const int64_t c = s.num_clusters();
  std::vector<double> lse(nq, -INFINITY);
  // The sizes' logs once for every query and pass (2 * nq logs per cluster before).
  std::vector<double> log_size(c, 0.0);
  for (int64_t j = 0; j < c; ++j)
    if (s.size[j] > 0) log_size[j] = std::log(double(s.size[j]));
  // Two passes of nq x c exps in double: a wide group's queries (first pass) and clusters (second)
  // in parallel.
  const bool wide = nq >= kParallelQueries;
  internal::ParallelRange(nq, wide ? 1 : nq, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* di = density + static_cast<std::size_t>(i) * c;
      double m = -INFINITY;
      for (int64_t j = 0; j < c; ++j)
        if (s.size[j] > 0) m = std::max<double>(m, di[j] + log_size[j]);
      if (m == -INFINITY) continue;
      double l = 0;
      for (int64_t j = 0; j < c; ++j)
        if (s.size[j] > 0) l += std::exp(di[j] + log_size[j] - m);
      lse[i] = m + std::log(l);
    }
  });
  internal::ParallelRange(c, wide ? kKeyClusterGrain : c, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) key[j] = GroupKeyOf(s, density, nq, c, lse.data(), j);
  });
}

std::vector<float> LogSizes(const ClusterSummary& s) {
  std::vector<float> out(s.size.size());
  for (std::size_t j = 0; j < out.size(); ++j) out[j] = std::log(static_cast<float>(s.size[j]));
  return out;
}

void EstimateUnselected(const ClusterSummary& s, const float* density,
                        const std::vector<int32_t>& selected, float* o, float* lse) {
  const std::vector<float> log_size = LogSizes(s);
  EstimateUnselectedGroup(s, density, 1, selected, log_size.data(), o, lse);
}

void EstimateUnselectedGroup(const ClusterSummary& s, const float* density, int nq,
                             const std::vector<int32_t>& selected, const float* log_size, float* o,
                             float* lse) {
  const int d = s.dim;
  const int64_t c = s.num_clusters();
  std::fill(o, o + static_cast<std::size_t>(nq) * d, 0.f);
  std::fill(lse, lse + nq, -INFINITY);
  // Per query: the log masses, the selected ones out, the max.
  std::vector<float> lm(static_cast<std::size_t>(nq) * c), m(nq, -INFINITY);
  std::vector<int> live;
  for (int h = 0; h < nq; ++h) {
    float* lh = lm.data() + static_cast<std::size_t>(h) * c;
    const float* dh = density + static_cast<std::size_t>(h) * c;
    for (int64_t j = 0; j < c; ++j) lh[j] = dh[j] + log_size[j];
    for (int32_t j : selected) lh[j] = -INFINITY;
    for (int64_t j = 0; j < c; ++j) m[h] = std::max(m[h], lh[j]);
    if (m[h] != -INFINITY) live.push_back(h);
  }
  if (live.empty()) return;
  const int nl = static_cast<int>(live.size());
  // NOTE: f32 accumulation of max-subtracted weights (each <= 1) in blocks, summed in double:
  // 5-10x faster than double throughout, relative error ~1e-6.
  constexpr int64_t kBlock = 256;
  std::vector<double> acc(static_cast<std::size_t>(nl) * d, 0.0), l(nl, 0.0);
  std::vector<float> part(static_cast<std::size_t>(nl) * d), row(d), lb(nl), w(nl);
  for (int64_t b = 0; b < c; b += kBlock) {
    std::fill(part.begin(), part.end(), 0.f);
    std::fill(lb.begin(), lb.end(), 0.f);
    for (int64_t j = b; j < std::min(c, b + kBlock); ++j) {
      bool all = true, any = false;
      for (int k = 0; k < nl; ++k) {
        const float x = lm[static_cast<std::size_t>(live[k]) * c + j];
        all = all && x != -INFINITY;
        any = any || x != -INFINITY;
      }
      if (!any) continue;
      ConvertToF32(s.value_mean.data() + static_cast<std::size_t>(j) * d, DType::kBF16, d,
                   row.data());
      for (int k = 0; k < nl; ++k) {
        const int h = live[k];
        const float x = lm[static_cast<std::size_t>(h) * c + j];
        if (x == -INFINITY) continue;
        w[k] = std::exp(x - m[h]);
        lb[k] += w[k];
        // A query that skips this cluster (its own -inf) adds nothing, as alone.
        if (!all)
          AddScaledRow(&w[k], 0, 1, row.data(), part.data() + static_cast<std::size_t>(k) * d, d);
      }
      if (all) AddScaledRow(w.data(), 1, nl, row.data(), part.data(), d);
    }
    for (int k = 0; k < nl; ++k) {
      l[k] += lb[k];
      for (int t = 0; t < d; ++t)
        acc[static_cast<std::size_t>(k) * d + t] += part[static_cast<std::size_t>(k) * d + t];
    }
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
