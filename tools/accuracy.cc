#include "tools/accuracy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace kvrt::cli {

float Dot(const float* a, const float* b, int d) {
  float acc[8] = {};
  int i = 0;
  for (; i + 8 <= d; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < d; ++i) s += a[i] * b[i];
  for (float x : acc) s += x;
  return s;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double rank = std::ceil(p * static_cast<double>(v.size())) - 1.0;
  return v[static_cast<std::size_t>(std::clamp(rank, 0.0, static_cast<double>(v.size() - 1)))];
}

double Mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / v.size();
}

void ExactAttention(const float* q, int nq, const HeadRows& rows, int d, float scale, int top_k,
                    float* o, float* lse, int32_t* top) {
  // The q heads of one kv head in one pass over its rows: each key and value row is read once for
  // all of them (the reference is memory-bound per head); each head's arithmetic and its order are
  // those of a pass of its own.
  const int64_t n = rows.n;
  std::vector<float> s(static_cast<std::size_t>(nq) * n);
  std::vector<float> mx(nq, -INFINITY);
  for (int64_t i = 0; i < n; ++i) {
    const float* key = rows.key(i);
    for (int h = 0; h < nq; ++h) {
      const float x = scale * Dot(q + static_cast<std::size_t>(h) * d, key, d);
      s[static_cast<std::size_t>(h) * n + i] = x;
      mx[h] = std::max(mx[h], x);
    }
  }
  std::vector<double> l(nq, 0.0), acc(static_cast<std::size_t>(nq) * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* v = rows.value(i);
    for (int h = 0; h < nq; ++h) {
      const double w =
          std::exp(static_cast<double>(s[static_cast<std::size_t>(h) * n + i]) - mx[h]);
      l[h] += w;
      double* a = acc.data() + static_cast<std::size_t>(h) * d;
      for (int j = 0; j < d; ++j) a[j] += w * v[j];
    }
  }
  const int64_t kk = std::min<int64_t>(top_k, n);
  std::vector<int32_t> ids(n);
  for (int h = 0; h < nq; ++h) {
    const double* a = acc.data() + static_cast<std::size_t>(h) * d;
    for (int j = 0; j < d; ++j)
      o[static_cast<std::size_t>(h) * d + j] = static_cast<float>(a[j] / l[h]);
    lse[h] = static_cast<float>(mx[h] + std::log(l[h]));
    const float* sh = s.data() + static_cast<std::size_t>(h) * n;
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + kk, ids.end(), [&](int32_t x, int32_t y) {
      return sh[x] > sh[y] || (sh[x] == sh[y] && x < y);
    });
    std::copy(ids.begin(), ids.begin() + kk, top + static_cast<std::size_t>(h) * top_k);
  }
}

absl::Status ScoreHead(const float* q, const HeadRows& rows, int d, float scale,
                       const float* exact_o, float exact_lse, const int32_t* top, int64_t kk,
                       const int64_t* ids, int64_t count, const float* out,
                       std::vector<uint8_t>* mark_in, HeadAccuracy* result) {
  auto& mark = *mark_in;
  for (int j = 0; j < d; ++j)
    if (!std::isfinite(out[j]))
      return absl::InternalError(absl::StrCat("kvrt's output is not finite (element ", j, ": ",
                                              out[j], ") where exact attention is"));
  // Recall counts ties as a top-k does: every token scored above the k-th exact score is in any
  // top-k; of those scored equal to it, as many as the top-k has room for (with every score tied,
  // any k tokens are a top-k; an id-ordered count gave ivf 0.1 and flat 1.0 for the same mass).
  const float kth = kk > 0 ? scale * Dot(q, rows.key(top[kk - 1]), d) : 0.f;
  int64_t top_above = 0;
  for (int64_t i = 0; i < kk; ++i) top_above += scale * Dot(q, rows.key(top[i]), d) > kth ? 1 : 0;
  double mass = 0;
  int64_t above = 0, tied = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t id = ids[j];
    if (id < 0 || id >= rows.n || mark[id]) {
      for (int64_t i = 0; i < j; ++i) mark[ids[i]] = 0;
      return absl::InternalError(absl::StrCat("attended id ", id, " is out of range [0, ", rows.n,
                                              ") or repeated"));
    }
    mark[id] = 1;
    const float s = scale * Dot(q, rows.key(id), d);
    mass += std::exp(static_cast<double>(s) - exact_lse);
    above += s > kth ? 1 : 0;
    tied += s == kth ? 1 : 0;
  }
  const int64_t hit = kk > 0 ? std::min(kk, above + std::min(tied, kk - top_above)) : 0;
  for (int64_t j = 0; j < count; ++j) mark[ids[j]] = 0;
  double num = 0, den = 0;
  for (int j = 0; j < d; ++j) {
    const double diff = out[j] - exact_o[j];
    num += diff * diff;
    den += static_cast<double>(exact_o[j]) * exact_o[j];
  }
  result->error = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  result->recall = kk > 0 ? static_cast<double>(hit) / kk : 1.0;
  result->mass = std::min(1.0, mass);
  return absl::OkStatus();
}

AccuracySummary AccuracyAcc::Summary() const {
  AccuracySummary s;
  s.samples = static_cast<int64_t>(errors_.size());
  s.recall = Mean(recalls_);
  s.mass = Mean(masses_);
  s.error_mean = Mean(errors_);
  s.error_p99 = Percentile(errors_, 0.99);
  s.error_max = errors_.empty() ? 0 : *std::max_element(errors_.begin(), errors_.end());
  return s;
}

}  // namespace kvrt::cli
