#pragma once
// A query-like test vector for the cluster suites: n values drawn from N(0, sd^2), reproducible
// from its seed.
#include <cstdint>
#include <random>
#include <vector>

namespace kvrt::cpu_index::testing {

inline std::vector<float> NormalVector(int n, uint64_t seed, float sd = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

}  // namespace kvrt::cpu_index::testing
