#pragma once
// Comparison of a kernel's floats against a reference, for the kernel suites.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <string>

namespace kvrt::gpu {

// |a - b| <= tol * (1 + |b|) elementwise; -inf must match exactly; NaN never passes.
inline ::testing::AssertionResult Close(const float* a, const float* b, std::size_t n, double tol,
                                        const std::string& what) {
  for (std::size_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) {
      return ::testing::AssertionFailure() << what << "[" << i << "] is NaN";
    }
    if (std::isinf(a[i]) || std::isinf(b[i])) {
      if (a[i] != b[i])
        return ::testing::AssertionFailure() << what << "[" << i << "] " << a[i] << " vs " << b[i];
      continue;
    }
    if (std::fabs(double(a[i]) - b[i]) > tol * (1.0 + std::fabs(double(b[i])))) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "] " << a[i] << " vs reference " << b[i];
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace kvrt::gpu
