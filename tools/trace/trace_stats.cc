// Exact-attention statistics of a trace's decode queries (AttentionStats in trace.h): the
// measurement the generator is tuned against, usable on recorded traces too.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kvrt_common/status_macros.h"
#include "oneapi/tbb/parallel_for.h"
#include "tools/trace/trace.h"

namespace kvrt::trace {
namespace {

// Keys of kv head g over all positions (prompt then decode), as f32 [positions, d].
std::vector<float> LoadKeys(const TensorView& pk, const TensorView& dk, int g, int kv_heads,
                            int d) {
  const int64_t P = pk.shape[0], S = dk.shape[0];
  std::vector<float> out(static_cast<std::size_t>(P + S) * d);
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(pk.dtype);
  for (int64_t t = 0; t < P + S; ++t) {
    const TensorView& v = t < P ? pk : dk;
    const int64_t r = t < P ? t : t - P;
    const auto* src = static_cast<const uint8_t*>(v.data) + (r * kv_heads + g) * row_bytes;
    ConvertToF32(src, v.dtype, d, &out[static_cast<std::size_t>(t) * d]);
  }
  return out;
}

float Dot(const float* a, const float* b, int d) {
  float s = 0;
  for (int i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Indices of the k largest scores (ties by index, so the result is deterministic).
std::vector<int64_t> TopK(const std::vector<float>& scores, int64_t n, int k) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t kk = std::min<int64_t>(k, n);
  std::nth_element(idx.begin(), idx.begin() + kk, idx.end(), [&](int64_t a, int64_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  });
  idx.resize(kk);
  return idx;
}

// Plain k-means (Lloyd, deterministic init) on keys, then IVF-style probing by q . centroid.
struct KeyIvf {
  int clusters = 0;
  int d = 0;
  std::vector<float> centroids;
  std::vector<int> assign;
  std::vector<int64_t> sizes;

  void Build(const float* keys, int64_t n, int d_, int c) {
    d = d_;
    clusters = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(c, n)));
    centroids.assign(static_cast<std::size_t>(clusters) * d, 0.f);
    for (int j = 0; j < clusters; ++j)
      std::copy(keys + (n * j / clusters) * d, keys + (n * j / clusters + 1) * d,
                &centroids[static_cast<std::size_t>(j) * d]);
    assign.assign(n, 0);
    for (int iter = 0; iter < 6; ++iter) {
      tbb::parallel_for(int64_t{0}, n, [&](int64_t t) {
        float best = std::numeric_limits<float>::max();
        for (int j = 0; j < clusters; ++j) {
          const float* c = &centroids[static_cast<std::size_t>(j) * d];
          float dist = 0;
          for (int i = 0; i < d; ++i) {
            const float x = keys[t * d + i] - c[i];
            dist += x * x;
          }
          if (dist < best) best = dist, assign[t] = j;
        }
      });
      std::vector<double> sum(centroids.size(), 0.0);
      sizes.assign(clusters, 0);
      for (int64_t t = 0; t < n; ++t) {
        ++sizes[assign[t]];
        for (int i = 0; i < d; ++i)
          sum[static_cast<std::size_t>(assign[t]) * d + i] += keys[t * d + i];
      }
      for (int j = 0; j < clusters; ++j)
        if (sizes[j] > 0)
          for (int i = 0; i < d; ++i)
            centroids[static_cast<std::size_t>(j) * d + i] =
                static_cast<float>(sum[static_cast<std::size_t>(j) * d + i] / sizes[j]);
    }
  }
};

}  // namespace

absl::StatusOr<AttentionStats> ComputeAttentionStats(const TraceReader& reader,
                                                     const AttentionStatsOptions& o) {
  const TraceMeta& m = reader.meta();
  if (o.top_k <= 0 || o.sink_tokens < 0 || o.window_tokens < 0)
    return absl::InvalidArgumentError(
        "attention stats: top_k must be positive, sinks and window >= 0");
  const int d = m.head_dim, group = m.num_q_heads / m.num_kv_heads;
  const float scale = m.scale > 0 ? m.scale : 1.f / std::sqrt(static_cast<float>(d));
  const int layers = o.max_layers > 0 ? std::min(o.max_layers, m.num_layers) : m.num_layers;
  std::vector<int64_t> steps;
  const int64_t S = m.decode_steps;
  const int64_t want = o.max_steps > 0 ? std::min<int64_t>(o.max_steps, S) : S;
  for (int64_t i = 0; i < want; ++i) steps.push_back(want == S ? i : i * S / want);
  AttentionStats st;
  double span_sum = 0;
  int64_t span_n = 0;
  double ivf_hits = 0, ivf_total = 0, ivf_scanned = 0, ivf_queries = 0;
  for (int layer = 0; layer < layers; ++layer) {
    KVRT_ASSIGN_OR_RETURN(TensorView pk, reader.Tensor(layer, "prefill.k"));
    KVRT_ASSIGN_OR_RETURN(TensorView dk, reader.Tensor(layer, "decode.k"));
    KVRT_ASSIGN_OR_RETURN(TensorView dq, reader.Tensor(layer, "decode.q"));
    const int64_t P = m.prompt_tokens;
    for (int g = 0; g < m.num_kv_heads; ++g) {
      const std::vector<float> keys = LoadKeys(pk, dk, g, m.num_kv_heads, d);
      KeyIvf ivf;
      const bool run_ivf =
          o.ivf_probe_fraction > 0 && layer == 0 && g < o.ivf_max_kv_heads && P > 0;
      if (run_ivf)
        ivf.Build(keys.data(), P, d,
                  static_cast<int>(std::max(1.0, std::sqrt(static_cast<double>(P)))));
      std::vector<float> q(d), scores;
      for (int64_t step : steps) {
        const int64_t n = P + step + 1;  // everything up to and including this step's token
        scores.resize(n);
        for (int h = 0; h < group; ++h) {
          const int qh = g * group + h;
          const auto* src = static_cast<const uint8_t*>(dq.data) + (step * m.num_q_heads + qh) *
                                                                       static_cast<int64_t>(d) *
                                                                       DTypeSize(m.dtype);
          ConvertToF32(src, m.dtype, d, q.data());
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < n; ++t) {
            scores[t] = Dot(q.data(), &keys[static_cast<std::size_t>(t) * d], d) * scale;
            if (!std::isfinite(scores[t]))
              return absl::InvalidArgumentError(absl::StrCat(
                  "layer ", layer, ", decode step ", step, ", q head ", qh, ": the score of token ",
                  t, " is not finite (a NaN or Inf in q or k, or q.k past f32's range)"));
            mx = std::max(mx, scores[t]);
          }
          double z = 0, sink = 0, window = 0, top = 0, wmax = 0;
          const int64_t win_begin = std::max<int64_t>(o.sink_tokens, n - o.window_tokens);
          for (int64_t t = 0; t < n; ++t) {
            const double w = std::exp(static_cast<double>(scores[t] - mx));
            z += w;
            if (t < o.sink_tokens)
              sink += w;
            else if (t >= win_begin)
              window += w;
            wmax = std::max(wmax, w);
          }
          const std::vector<int64_t> top_ids = TopK(scores, n, o.top_k);
          int64_t cold = 0, lo = n, hi = -1;
          for (int64_t t : top_ids) {
            top += std::exp(static_cast<double>(scores[t] - mx));
            if (t >= o.sink_tokens && t < win_begin) {
              ++cold;
              lo = std::min(lo, t);
              hi = std::max(hi, t);
            }
          }
          st.top_k_mass += top / z;
          st.sink_mass += sink / z;
          st.window_mass += window / z;
          st.top_k_cold_share += static_cast<double>(cold) / top_ids.size();
          st.max_weight += wmax / z;
          st.sharp_share += wmax / z >= 0.3 ? 1 : 0;
          if (cold > 1 && P > 0) {
            span_sum += static_cast<double>(hi - lo) / P;
            ++span_n;
          }
          ++st.queries;

          if (run_ivf) {
            // Exact top-k among the prompt keys vs the clusters a key-only IVF would probe.
            std::vector<float> prompt_scores(scores.begin(), scores.begin() + P);
            const std::vector<int64_t> truth = TopK(prompt_scores, P, o.top_k);
            std::vector<std::pair<float, int>> order(ivf.clusters);
            for (int j = 0; j < ivf.clusters; ++j)
              order[j] = {-Dot(q.data(), &ivf.centroids[static_cast<std::size_t>(j) * d], d), j};
            std::sort(order.begin(), order.end());
            std::vector<uint8_t> probed(ivf.clusters, 0);
            int64_t scanned = 0;
            for (auto& [neg, j] : order) {
              if (scanned >= o.ivf_probe_fraction * P) break;
              probed[j] = 1;
              scanned += ivf.sizes[j];
            }
            int64_t hits = 0;
            for (int64_t t : truth) hits += probed[ivf.assign[t]];
            ivf_hits += hits;
            ivf_total += truth.size();
            ivf_scanned += static_cast<double>(scanned) / P;
            ++ivf_queries;
          }
        }
      }
    }
  }
  if (st.queries > 0) {
    const double n = static_cast<double>(st.queries);
    st.top_k_mass /= n;
    st.sink_mass /= n;
    st.window_mass /= n;
    st.top_k_cold_share /= n;
    st.max_weight /= n;
    st.sharp_share /= n;
  }
  if (span_n > 0) st.top_k_span = span_sum / span_n;
  if (ivf_total > 0) {
    st.ivf_recall = ivf_hits / ivf_total;
    st.ivf_scanned = ivf_scanned / ivf_queries;
  }
  return st;
}

}  // namespace kvrt::trace
