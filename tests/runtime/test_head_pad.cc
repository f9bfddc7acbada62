// The GPU backend's padded head_dim (runtime/src/head_pad.h), its host side: the widths taken, the
// caller's rows copied with zeros after them, null inputs kept null, and the output's first
// columns written back for exactly the rows asked. The device side (stream-ordered copies) and the
// padded runtime against the host backend run in tests/runtime_gpu.
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/src/head_pad.h"

namespace kvrt::runtime {
namespace {

TEST(HeadPad, WidthIsTheNextOneTheKernelsTake) {
  EXPECT_EQ(HeadPad::WidthFor(1), 64);
  EXPECT_EQ(HeadPad::WidthFor(64), 64);
  EXPECT_EQ(HeadPad::WidthFor(80), 128);
  EXPECT_EQ(HeadPad::WidthFor(96), 128);
  EXPECT_EQ(HeadPad::WidthFor(128), 128);
  EXPECT_EQ(HeadPad::WidthFor(192), 256);
  EXPECT_EQ(HeadPad::WidthFor(256), 256);
  EXPECT_EQ(HeadPad::WidthFor(257), 0);
  EXPECT_FALSE(HeadPad(128, 128, DType::kBF16).on());
  EXPECT_TRUE(HeadPad(96, 128, DType::kBF16).on());
}

TEST(HeadPad, HostRowsArePaddedWithZerosAndTheOutputComesBackUnpadded) {
  const int from = 6, to = 8;
  const HeadPad pad(from, to, DType::kF16);  // 2-byte elements
  std::vector<uint16_t> a(3 * from), b(2 * from);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint16_t>(1000 + i);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint16_t>(2000 + i);
  PaddedCall call;
  ASSERT_TRUE(pad.In({{a.data(), 3}, {nullptr, 5}, {b.data(), 2}}, 4, Exec{}, &call).ok());
  EXPECT_EQ(call.in(1), nullptr);
  const auto* pa = static_cast<const uint16_t*>(call.in(0));
  const auto* pb = static_cast<const uint16_t*>(call.in(2));
  ASSERT_NE(pa, nullptr);
  ASSERT_NE(pb, nullptr);
  for (int r = 0; r < 3; ++r)
    for (int e = 0; e < to; ++e)
      EXPECT_EQ(pa[r * to + e], e < from ? a[r * from + e] : 0) << r << " " << e;
  for (int r = 0; r < 2; ++r)
    for (int e = 0; e < to; ++e)
      EXPECT_EQ(pb[r * to + e], e < from ? b[r * from + e] : 0) << r << " " << e;
  ASSERT_NE(call.out(), nullptr);
  for (int i = 0; i < 4 * to; ++i) call.out()[i] = static_cast<float>(i);
  std::vector<float> out(4 * from, -1.f);
  ASSERT_TRUE(pad.Out(call, out.data(), 2, Exec{}, 1).ok());  // rows 1 and 2 only
  for (int r = 0; r < 4; ++r)
    for (int e = 0; e < from; ++e)
      EXPECT_EQ(out[r * from + e], r == 1 || r == 2 ? static_cast<float>(r * to + e) : -1.f)
          << r << " " << e;
}

}  // namespace
}  // namespace kvrt::runtime
