#pragma once
// A softmax denominator over many scores: sum_i exp(x_i - m) for the caller's stabilizer m >=
// every x_i. The cluster index's masses take one exp per row and query; libm's scalar double exp
// was most of the selection's time on codes. Compiled for several ISAs and dispatched at run time
// (kvrt_common/multiversion.h), as the dot products are.
#include <cstdint>

namespace kvrt::cpu_index {

// exp(x) for x <= 0 in float: 2^k x a degree-6 polynomial on [-ln2 / 2, ln2 / 2] (relative error
// within 2^-22 of libm's expf); 0 below -87 (past float's normal range) and for NaN, 1 at 0.
// Branch-free, so the loops that call it vectorise.
inline float ExpNonPositive(float x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5 x 2^23: adding it rounds to an integer
  const bool in = x >= -87.f;           // false for NaN too: k stays an integer
  const float under = in ? 1.f : 0.f;
  x = in ? (x > 0.f ? 0.f : x) : -87.f;
  const float k = (x * kLog2e + kRound) - kRound;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 0]
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale * under;
}

// Returns sum_i exp(x_i - m) over n scores (double sum of float terms); each term also into
// w[i] when w is not null. x_i - m must not be positive (m: their max, or above).
double ExpSum(const float* x, int64_t n, float m, float* w);

}  // namespace kvrt::cpu_index
