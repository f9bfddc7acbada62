// Host references of the tier attention and merge kernels: plain loops, f32 accumulation.
#include <cmath>
#include <limits>
#include <vector>

#include "kvrt_gpu/tier_attention.h"
#include "kvrt_common/nan_max.h"

namespace kvrt::gpu {
namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

const unsigned char* Row(const void* base, int64_t token, int kv_head, const TierView& t) {
  const std::size_t elems = (static_cast<std::size_t>(token) * t.kv_heads + kv_head) * t.head_dim;
  return static_cast<const unsigned char*>(base) + elems * DTypeSize(t.dtype);
}
}  // namespace

void TierAttentionHost(const TierView& t, const float* q, int q_heads, float scale, float* o,
                       float* lse) {
  const int d = t.head_dim;
  const int group = q_heads / t.kv_heads;
  const int64_t n = t.n_sink + t.n_window;
  std::vector<float> s(n), row(d);
  for (int h = 0; h < q_heads; ++h) {
    const int g = h / group;
    const float* qh = q + static_cast<std::size_t>(h) * d;
    float* oh = o + static_cast<std::size_t>(h) * d;
    auto k_row = [&](int64_t j) {
      return j < t.n_sink ? Row(t.sink_k, j, g, t) : Row(t.window_k, j - t.n_sink, g, t);
    };
    auto v_row = [&](int64_t j) {
      return j < t.n_sink ? Row(t.sink_v, j, g, t) : Row(t.window_v, j - t.n_sink, g, t);
    };
    float m = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int i = 0; i < d; ++i) acc += qh[i] * LoadAsF32(k_row(j), i, t.dtype);
      s[j] = acc * scale;
      m = MaxPropagateNan(m, s[j]);
    }
    for (int i = 0; i < d; ++i) oh[i] = 0.f;
    if (n == 0 || m == kNegInf) {
      lse[h] = kNegInf;
      continue;
    }
    float l = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      l += s[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      ConvertToF32(v_row(j), t.dtype, d, row.data());
      const float w = s[j] / l;
      for (int i = 0; i < d; ++i) oh[i] += w * row[i];
    }
    lse[h] = m + std::log(l);
  }
}

void MergeStatesHost(float* o, float* lse, const float* o2, const float* lse2, int heads, int d) {
  for (int h = 0; h < heads; ++h) {
    float* oh = o + static_cast<std::size_t>(h) * d;
    const float* o2h = o2 + static_cast<std::size_t>(h) * d;
    const float a = lse[h], b = lse2[h];
    if (b == kNegInf) continue;
    if (a == kNegInf) {
      for (int i = 0; i < d; ++i) oh[i] = o2h[i];
      lse[h] = b;
      continue;
    }
    const float m = std::max(a, b);
    const float l = m + std::log(std::exp(a - m) + std::exp(b - m));
    const float wa = std::exp(a - l), wb = std::exp(b - l);
    for (int i = 0; i < d; ++i) oh[i] = wa * oh[i] + wb * o2h[i];
    lse[h] = l;
  }
}

}  // namespace kvrt::gpu
