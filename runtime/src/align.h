#pragma once
// Offsets inside packed device uploads: 16-byte alignment for vector loads of the next part.
#include <cstddef>

namespace kvrt::runtime {

constexpr std::size_t Align16(std::size_t x) { return (x + 15) / 16 * 16; }
// Parts of one step's scratch that kernels use as their own allocation (cudaMallocAsync's).
constexpr std::size_t Align256(std::size_t x) { return (x + 255) / 256 * 256; }

}  // namespace kvrt::runtime
