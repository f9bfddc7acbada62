#pragma once
// Test data for the kernel suites: normal values stored in a dtype.
#include <cstddef>
#include <random>
#include <vector>

#include "kvrt_common/dtype.h"

namespace kvrt::gpu {

// n values drawn from N(0, sd^2), stored in dtype t.
inline std::vector<unsigned char> RandomStorage(std::mt19937& rng, std::size_t n, DType t,
                                                float sd) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> f(n);
  for (auto& x : f) x = nd(rng);
  std::vector<unsigned char> out(n * DTypeSize(t));
  ConvertFromF32(f.data(), n, t, out.data());
  return out;
}

}  // namespace kvrt::gpu
