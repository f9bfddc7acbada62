// Host references of the k-means build (cluster_build.h): plain loops, the oracle of the kernels'
// tests. MapToMetric, AssignClusters and SummarizeClusters accumulate in double; UpdateCentroids
// sums in f32 in ascending row order, the order the kernel uses, so that both round alike.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cluster_build_check.h"
#include "kvrt_common/dtype.h"
#include "kvrt_gpu/cluster_build.h"

namespace kvrt::gpu {
namespace {

// Row r of kv head g of a [rows, kv_heads, d] array of dtype t, as f32.
void KeyRow(const void* base, DType t, int kv_heads, int d, int64_t r, int g, float* out) {
  const std::size_t off = (static_cast<std::size_t>(r) * kv_heads + g) * d;
  ConvertToF32(static_cast<const char*>(base) + off * DTypeSize(t), t, d, out);
}

}  // namespace

absl::Status MapToMetricHost(const KMeansShape& s, const void* keys, DType dtype,
                             const float* metric_l, float* x, float* xn2) {
  constexpr const char* kFn = "MapToMetricHost";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckDType(dtype, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({keys, metric_l, x, xn2}, kFn); !st.ok()) return st;
  const int d = s.head_dim;
  const int64_t rows = s.rows();
  std::vector<float> k(d);
  std::vector<double> acc(d);
  for (int g = 0; g < s.kv_heads; ++g) {
    const float* l = metric_l + static_cast<std::size_t>(g) * d * d;
    for (int64_t r = 0; r < rows; ++r) {
      KeyRow(keys, dtype, s.kv_heads, d, r, g, k.data());
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int i = 0; i < d; ++i) {
        const double ki = k[i];
        const float* li = l + static_cast<std::size_t>(i) * d;
        for (int j = 0; j < d; ++j) acc[j] += ki * li[j];
      }
      float* xr = x + (static_cast<std::size_t>(g) * rows + r) * d;
      double n2 = 0;
      for (int j = 0; j < d; ++j) {
        xr[j] = static_cast<float>(acc[j]);
        n2 += double(xr[j]) * xr[j];
      }
      xn2[static_cast<std::size_t>(g) * rows + r] = static_cast<float>(n2);
    }
  }
  return absl::OkStatus();
}

absl::Status SeedCentroidsHost(const KMeansShape& s, const float* x, const int32_t* seed,
                               float* centroid) {
  constexpr const char* kFn = "SeedCentroidsHost";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, seed, centroid}, kFn); !st.ok()) return st;
  const int d = s.head_dim, c = s.clusters, sr = s.segment_rows;
  const int64_t n = static_cast<int64_t>(s.kv_heads) * s.segments * c;
  for (int64_t i = 0; i < n; ++i) {
    if (seed[i] < 0 || seed[i] >= sr) {
      return absl::InvalidArgumentError(
          absl::StrCat(kFn, ": seed ", seed[i], " outside [0, segment_rows)"));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t gs = i / c, g = gs / s.segments, sg = gs % s.segments;
    const float* src = x + (g * s.rows() + sg * sr + seed[i]) * d;
    std::copy_n(src, d, centroid + i * d);
  }
  return absl::OkStatus();
}

absl::Status AssignClustersHost(const KMeansShape& s, const float* x, const float* xn2,
                                const float* centroid, int32_t* assign, float* dist) {
  constexpr const char* kFn = "AssignClustersHost";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, xn2, centroid, assign, dist}, kFn); !st.ok()) return st;
  const int d = s.head_dim, c = s.clusters, sr = s.segment_rows;
  const int64_t rows = s.rows();
  std::vector<double> hn2(c);
  for (int g = 0; g < s.kv_heads; ++g) {
    for (int sg = 0; sg < s.segments; ++sg) {
      const float* cen = centroid + (static_cast<std::size_t>(g) * s.segments + sg) * c * d;
      for (int j = 0; j < c; ++j) {
        double a = 0;
        for (int t = 0; t < d; ++t) a += double(cen[j * d + t]) * cen[j * d + t];
        hn2[j] = 0.5 * a;
      }
      for (int64_t r = g * rows + static_cast<int64_t>(sg) * sr, e = r + sr; r < e; ++r) {
        const float* xr = x + r * d;
        double best = -INFINITY;
        int32_t bj = 0;
        for (int j = 0; j < c; ++j) {
          double dot = 0;
          for (int t = 0; t < d; ++t) dot += double(xr[t]) * cen[j * d + t];
          const double v = dot - hn2[j];
          if (v > best) {  // strict: the lowest j among equal scores
            best = v;
            bj = j;
          }
        }
        assign[r] = bj;
        dist[r] = static_cast<float>(std::max(0.0, double(xn2[r]) - 2 * best));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status UpdateCentroidsHost(const KMeansShape& s, const float* x, const int32_t* assign,
                                 float* centroid) {
  constexpr const char* kFn = "UpdateCentroidsHost";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, assign, centroid}, kFn); !st.ok()) return st;
  const int d = s.head_dim, c = s.clusters, sr = s.segment_rows;
  const int64_t rows = s.rows();
  std::vector<float> sum(static_cast<std::size_t>(c) * d);
  std::vector<int64_t> count(c);
  for (int g = 0; g < s.kv_heads; ++g) {
    for (int sg = 0; sg < s.segments; ++sg) {
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(count.begin(), count.end(), 0);
      for (int64_t r = g * rows + static_cast<int64_t>(sg) * sr, e = r + sr; r < e; ++r) {
        const int32_t a = assign[r];
        if (a < 0 || a >= c) continue;  // belongs to no cluster
        const float* xr = x + r * d;
        float* sa = sum.data() + static_cast<std::size_t>(a) * d;
        for (int t = 0; t < d; ++t) sa[t] += xr[t];
        ++count[a];
      }
      float* cen = centroid + (static_cast<std::size_t>(g) * s.segments + sg) * c * d;
      for (int j = 0; j < c; ++j) {
        if (count[j] == 0) continue;  // empty: left as it is
        const float n = static_cast<float>(count[j]);
        for (int t = 0; t < d; ++t) cen[j * d + t] = sum[static_cast<std::size_t>(j) * d + t] / n;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status SummarizeClustersHost(const KMeansShape& s, const void* keys, const void* values,
                                   DType dtype, const float* x, const float* xn2,
                                   const int32_t* assign, const float* metric_trace,
                                   const ClusterStats& out) {
  constexpr const char* kFn = "SummarizeClustersHost";
  if (auto st =
          detail::CheckSummarize(s, keys, values, dtype, x, xn2, assign, metric_trace, out, kFn);
      !st.ok())
    return st;
  const int d = s.head_dim, c = s.clusters, sr = s.segment_rows;
  const int64_t rows = s.rows();
  std::vector<double> ks(static_cast<std::size_t>(c) * d), vs(ks.size()), xs(ks.size()), q(c);
  std::vector<int64_t> count(c);
  std::vector<float> kr(d), vr(d);
  for (int g = 0; g < s.kv_heads; ++g) {
    for (int sg = 0; sg < s.segments; ++sg) {
      std::fill(ks.begin(), ks.end(), 0.0);
      std::fill(vs.begin(), vs.end(), 0.0);
      std::fill(xs.begin(), xs.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      std::fill(count.begin(), count.end(), 0);
      for (int64_t r = static_cast<int64_t>(sg) * sr; r < static_cast<int64_t>(sg + 1) * sr; ++r) {
        const int64_t hr = g * rows + r;
        const int32_t a = assign[hr];
        if (a < 0 || a >= c) continue;  // an outlier: in no cluster
        KeyRow(keys, dtype, s.kv_heads, d, r, g, kr.data());
        KeyRow(values, dtype, s.kv_heads, d, r, g, vr.data());
        const float* xr = x + hr * d;
        const std::size_t o = static_cast<std::size_t>(a) * d;
        for (int t = 0; t < d; ++t) {
          ks[o + t] += kr[t];
          vs[o + t] += vr[t];
          xs[o + t] += xr[t];
        }
        q[a] += xn2[hr];
        ++count[a];
      }
      const std::size_t base = (static_cast<std::size_t>(g) * s.segments + sg) * c;
      for (int j = 0; j < c; ++j) {
        const std::size_t idx = base + j;
        const int64_t n = count[j];
        out.count[idx] = static_cast<int32_t>(n);
        float* km = out.key_mean + idx * d;
        float* vm = out.value_mean + idx * d;
        if (n == 0) {
          std::fill(km, km + d, 0.f);
          std::fill(vm, vm + d, 0.f);
          out.spread[idx] = 0.f;
          continue;
        }
        double mx2 = 0;
        for (int t = 0; t < d; ++t) {
          const std::size_t o = static_cast<std::size_t>(j) * d + t;
          km[t] = static_cast<float>(ks[o] / n);
          vm[t] = static_cast<float>(vs[o] / n);
          mx2 += (xs[o] / n) * (xs[o] / n);
        }
        out.spread[idx] =
            static_cast<float>(std::max(0.0, q[j] / n - mx2) / double(metric_trace[g]));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrt::gpu
