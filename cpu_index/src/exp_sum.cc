#include "kvrt_cpu_index/exp_sum.h"

#include "kvrt_common/multiversion.h"

namespace kvrt::cpu_index {
namespace {

// 16 independent lanes so that GCC vectorises the body (as dot.cc's loops).
template <bool kWrite>
inline __attribute__((always_inline)) double ExpSumLanes(const float* x, int64_t n, float m,
                                                         float* w) {
  double acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    float e[16];
    for (int j = 0; j < 16; ++j) e[j] = ExpNonPositive(x[i + j] - m);
    for (int j = 0; j < 16; ++j) {
      if constexpr (kWrite) w[i + j] = e[j];
      acc[j] += static_cast<double>(e[j]);
    }
  }
  double tail = 0;
  for (; i < n; ++i) {
    const float e = ExpNonPositive(x[i] - m);
    if constexpr (kWrite) w[i] = e;
    tail += static_cast<double>(e);
  }
  for (int s = 8; s > 0; s /= 2)
    for (int j = 0; j < s; ++j) acc[j] += acc[j + s];
  return acc[0] + tail;
}

KVRT_MULTIVERSION double ExpSumWrite(const float* x, int64_t n, float m, float* w) {
  return ExpSumLanes<true>(x, n, m, w);
}

KVRT_MULTIVERSION double ExpSumOnly(const float* x, int64_t n, float m) {
  return ExpSumLanes<false>(x, n, m, nullptr);
}

}  // namespace

double ExpSum(const float* x, int64_t n, float m, float* w) {
  return w != nullptr ? ExpSumWrite(x, n, m, w) : ExpSumOnly(x, n, m);
}

}  // namespace kvrt::cpu_index
