#pragma once
// Offsets inside packed device uploads: 16-byte alignment for vector loads of the next part.
#include <cstddef>

namespace kvrt::runtime {

constexpr std::size_t Align16(std::size_t x) { return (x + 15) / 16 * 16; }

}  // namespace kvrt::runtime
