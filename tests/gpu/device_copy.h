#pragma once
// Copies between host vectors and device memory for the kernel suites (built with CUDA only).
#if KVRT_WITH_CUDA
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace kvrt::gpu {

// A device copy of h (at least one element allocated); free it with cudaFree.
template <typename T>
T* ToDevice(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<std::size_t>(1, h.size()) * sizeof(T)), cudaSuccess);
  if (!h.empty()) {
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}

template <typename T>
std::vector<T> ToHost(const T* d, std::size_t n) {
  std::vector<T> h(n);
  if (n != 0) {
    EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return h;
}

}  // namespace kvrt::gpu
#endif  // KVRT_WITH_CUDA
