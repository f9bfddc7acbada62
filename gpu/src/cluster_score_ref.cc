// Host reference of the cluster step (cluster_kernels.h): the path without a GPU and the oracle
// of the kernels' tests. Double accumulation; the selection rule of cpu_index::SelectClusters.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_kernels.h"

namespace kvrt::gpu {

absl::Status ClusterStepHost(const ClusterSummaryView& s, const float* q,
                             const ClusterStepParams& p, const ClusterStepOutputs& out) {
  const int d = s.head_dim, c = s.num_clusters, no = s.num_outliers;
  if (s.kv_heads <= 0 || d <= 0 || c < 0 || no < 0 || p.q_heads <= 0 ||
      p.q_heads % s.kv_heads != 0) {
    return absl::InvalidArgumentError("ClusterStepHost: bad shapes");
  }
  const int g = p.q_heads / s.kv_heads;
  const double scale = p.scale != 0.f ? p.scale : 1.0 / std::sqrt(double(d));
  const bool grp = p.group_select && g > 1 && c > 0;
  if (grp && out.group_key == nullptr)
    return absl::InvalidArgumentError("ClusterStepHost: group_select needs outputs.group_key");
  // Densities, log masses (lm), each head's max and total; outlier scores.
  std::vector<double> lm(static_cast<std::size_t>(p.q_heads) * c, -INFINITY);
  std::vector<double> mmax(p.q_heads, -INFINITY), total(p.q_heads, 0.0);
  for (int qh = 0; qh < p.q_heads; ++qh) {
    const int h = qh / g;
    const float* qq = q + static_cast<std::size_t>(qh) * d;
    double qn2 = 0;
    for (int t = 0; t < d; ++t) qn2 += double(qq[t]) * qq[t];
    float* dens = out.density + static_cast<std::size_t>(qh) * c;
    double* lmh = lm.data() + static_cast<std::size_t>(qh) * c;
    for (int j = 0; j < c; ++j) {
      const std::size_t hc = static_cast<std::size_t>(h) * c + j;
      if (s.size[hc] <= 0) {
        dens[j] = -INFINITY;
        continue;
      }
      if (p.cluster_lse != nullptr) {
        lmh[j] = p.cluster_lse[static_cast<std::size_t>(qh) * c + j];
        dens[j] = static_cast<float>(lmh[j] - std::log(double(s.size[hc])));
      } else {
        const uint16_t* cen = s.centroid + hc * d;
        double dot = 0;
        for (int t = 0; t < d; ++t) dot += double(qq[t]) * Bf16ToF32(cen[t]);
        dens[j] = static_cast<float>(scale * dot +
                                     p.spread_weight * 0.5 * scale * scale * qn2 * s.spread[hc]);
        lmh[j] = dens[j] + std::log(double(s.size[hc]));
      }
      mmax[qh] = std::max(mmax[qh], lmh[j]);
    }
    for (int j = 0; j < no; ++j) {
      const uint16_t* k = s.outlier_key + (static_cast<std::size_t>(h) * no + j) * d;
      double dot = 0;
      for (int t = 0; t < d; ++t) dot += double(qq[t]) * Bf16ToF32(k[t]);
      out.outlier_score[static_cast<std::size_t>(qh) * no + j] = static_cast<float>(dot);
    }
    for (int j = 0; j < c; ++j)
      if (lmh[j] > -INFINITY) total[qh] += std::exp(lmh[j] - mmax[qh]);
  }
  // Group keys: log sum_h exp(density_h - lse_h).
  for (int h = 0; grp && h < s.kv_heads; ++h) {
    for (int j = 0; j < c; ++j) {
      float* key = out.group_key + static_cast<std::size_t>(h) * c + j;
      *key = -INFINITY;
      if (s.size[static_cast<std::size_t>(h) * c + j] <= 0) continue;
      double m = -INFINITY;
      std::vector<double> dv(g, -INFINITY);
      for (int i = 0; i < g; ++i) {
        const int qh = h * g + i;
        if (mmax[qh] == -INFINITY) continue;
        dv[i] =
            out.density[static_cast<std::size_t>(qh) * c + j] - (mmax[qh] + std::log(total[qh]));
        m = std::max(m, dv[i]);
      }
      if (m == -INFINITY) continue;
      double l = 0;
      for (int i = 0; i < g; ++i)
        if (dv[i] > -INFINITY) l += std::exp(dv[i] - m);
      *key = static_cast<float>(m + std::log(l));
      if (p.key_offset != nullptr) *key -= p.key_offset[static_cast<std::size_t>(h) * c + j];
    }
  }
  for (int qh = 0; qh < p.q_heads; ++qh) {
    const int h = qh / g;
    const double* lmh = lm.data() + static_cast<std::size_t>(qh) * c;
    const double m = mmax[qh];
    // Selection: by the head's densities and masses, or by the group's keys and their masses.
    const float* key = grp ? out.group_key + static_cast<std::size_t>(h) * c
                           : out.density + static_cast<std::size_t>(qh) * c;
    std::vector<double> smass(c, 0.0);
    double stotal = 0;
    for (int j = 0; j < c; ++j) {
      if (s.size[static_cast<std::size_t>(h) * c + j] <= 0) continue;
      smass[j] = grp ? std::exp(double(key[j]) +
                                std::log(double(s.size[static_cast<std::size_t>(h) * c + j])))
                     : (lmh[j] > -INFINITY ? std::exp(lmh[j] - m) : 0.0);
      stotal += smass[j];
    }
    std::vector<int32_t> idx;
    for (int j = 0; j < c; ++j)
      if (s.size[static_cast<std::size_t>(h) * c + j] > 0) idx.push_back(j);
    std::sort(idx.begin(), idx.end(), [key](int32_t a, int32_t b) {
      return key[a] > key[b] || (key[a] == key[b] && a < b);
    });
    std::vector<char> sel(c, 0);
    int64_t tokens = 0;
    double mass = 0;
    int count = 0;
    if (p.budget_tokens > 0) {
      for (int32_t j : idx) {
        sel[j] = 1;
        ++count;
        tokens += s.size[static_cast<std::size_t>(h) * c + j];
        mass += smass[j];
        if (tokens >= p.budget_tokens) break;
        if (p.top_p > 0 && mass >= p.top_p * stotal) break;
      }
    }
    int32_t* selected = out.selected + static_cast<std::size_t>(qh) * c;
    for (int j = 0, w = 0; j < c; ++j)
      if (sel[j]) selected[w++] = j;
    out.selected_count[qh] = count;
    out.selected_tokens[qh] = tokens;
    if (grp && out.group_mask != nullptr && qh % g == 0) {
      const uint32_t bits = g == 32 ? ~0u : (1u << g) - 1u;
      uint32_t* mask = out.group_mask + static_cast<std::size_t>(h) * c;
      for (int j = 0; j < c; ++j) mask[j] = sel[j] ? bits : 0u;
    }
    // Estimate over the unselected clusters.
    float* eo = out.est_o + static_cast<std::size_t>(qh) * d;
    std::fill(eo, eo + d, 0.f);
    out.est_lse[qh] = -INFINITY;
    double l = 0;
    std::vector<double> acc(d, 0.0);
    for (int j = 0; j < c; ++j) {
      if (sel[j] || lmh[j] == -INFINITY) continue;
      const double w = std::exp(lmh[j] - m);
      l += w;
      const uint16_t* v = s.value_mean + (static_cast<std::size_t>(h) * c + j) * d;
      for (int t = 0; t < d; ++t) acc[t] += w * Bf16ToF32(v[t]);
    }
    if (p.estimate && l > kEstMassFloor * total[qh]) {
      for (int t = 0; t < d; ++t) eo[t] = static_cast<float>(acc[t] / l);
      out.est_lse[qh] = static_cast<float>(m + std::log(l));
    }
  }
  return absl::OkStatus();
}

absl::Status ClusterStepBatchHost(const ClusterStepItem* items, int n, const ClusterStepParams& p) {
  if (n < 0 || (n > 0 && items == nullptr))
    return absl::InvalidArgumentError("ClusterStepBatchHost: n < 0 or null items");
  for (int i = 0; i < n; ++i) {
    ClusterStepParams pi = p;
    pi.budget_tokens = items[i].budget_tokens;
    pi.key_offset = items[i].key_offset;
    pi.cluster_lse = items[i].cluster_lse;
    pi.scored_event = nullptr;
    if (absl::Status st = ClusterStepHost(items[i].summary, items[i].q, pi, items[i].out); !st.ok())
      return st;
  }
  return absl::OkStatus();
}

}  // namespace kvrt::gpu
