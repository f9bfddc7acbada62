#pragma once
// Non-finite elements found by their storage bits: an element is Inf or NaN exactly when its
// exponent bits are all ones, in f32, f16 and bf16 alike. Integer compares over whole blocks
// vectorise (a float sum of x * 0 was a chain of dependent adds, ~3% of a 32K prompt's host time
// under perf). Shared by the runtime's input check and the host store's NaN-row list.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvrt_common/dtype.h"

namespace kvrt {
namespace finite_bits_detail {

template <typename U>
std::size_t First(const unsigned char* p, std::size_t n, U exponent) {
  constexpr std::size_t kBlock = 1024;
  U block[kBlock];
  for (std::size_t base = 0; base < n; base += kBlock) {
    const std::size_t len = std::min(kBlock, n - base);
    std::memcpy(block, p + base * sizeof(U), len * sizeof(U));  // the caller's floats as bits
    // The smallest (x & exponent) ^ exponent is 0 exactly when some x has an all-ones exponent: a
    // min-reduction, which compilers vectorise (an OR of bools is not).
    U least = exponent;
    for (std::size_t i = 0; i < len; ++i) {
      const U miss = static_cast<U>((block[i] & exponent) ^ exponent);
      least = miss < least ? miss : least;
    }
    if (least != 0) continue;
    for (std::size_t i = 0; i < len; ++i)
      if ((block[i] & exponent) == exponent) return base + i;
  }
  return n;
}

}  // namespace finite_bits_detail

// Index of the first of the n elements at p that is Inf or NaN, or n when all are finite.
inline std::size_t FirstNonFinite(const void* p, std::size_t n, DType t) {
  const auto* b = static_cast<const unsigned char*>(p);
  switch (t) {
    case DType::kF32: return finite_bits_detail::First<uint32_t>(b, n, 0x7f800000u);
    case DType::kF16: return finite_bits_detail::First<uint16_t>(b, n, 0x7c00u);
    case DType::kBF16: return finite_bits_detail::First<uint16_t>(b, n, 0x7f80u);
  }
  return n;
}

}  // namespace kvrt
