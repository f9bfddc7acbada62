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
  // The caller's floats read as bits in place (may_alias: no copy into a buffer first).
  typedef U __attribute__((may_alias)) Bits;
  const Bits* x = reinterpret_cast<const Bits*>(p);
  // exponent's lowest bit: (x & exponent) + low carries into the sign bit exactly when the
  // exponent bits are all ones (the sign bit itself is masked off first).
  const U low = static_cast<U>(exponent & (~exponent + 1u));
  constexpr U kSign = static_cast<U>(U{1} << (8 * sizeof(U) - 1));
  constexpr std::size_t kBlock = 1024;
  for (std::size_t base = 0; base < n; base += kBlock) {
    const std::size_t len = std::min(kBlock, n - base);
    const Bits* b = x + base;
    // An OR of the carries over the block: adds, ands and ors in the vector unit (a min-reduction
    // of 16-bit lanes is scalar without SSE4.1, an OR of bools does not vectorise).
    U any = 0;
    for (std::size_t i = 0; i < len; ++i) any |= static_cast<U>((b[i] & exponent) + low);
    if ((any & kSign) == 0) continue;
    for (std::size_t i = 0; i < len; ++i)
      if ((b[i] & exponent) == exponent) return base + i;
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
