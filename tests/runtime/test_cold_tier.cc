// The cold tier's rows written in place: a decode append's kernel writes the token that leaves the
// window into each kv head's next store row (DeviceTier::AppendEvictFused, by default since
// 0.3.36), and the settle takes them with AppendWritten instead of copying them
// with Append. Both must leave the same store, row-to-position map and NaN/Inf rows.
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/src/cold_tier.h"

namespace kvrt::runtime {
namespace {

RuntimeConfig TwoHeads() {
  RuntimeConfig c;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.dtype = DType::kF32;
  return c;
}

TEST(ColdTier, RowsWrittenInPlaceAreTakenAsAppendTakesThem) {
  const RuntimeConfig cfg = TwoHeads();
  const int G = cfg.num_kv_heads, d = cfg.head_dim, first_position = 4, tokens = 5;
  const std::size_t hb = d * sizeof(float);
  Runtime::Counters counters;
  ColdTier copied(&cfg, &counters, first_position), in_place(&cfg, &counters, first_position);
  ASSERT_TRUE(in_place.Reserve(8).ok());  // the room the append checks before it writes
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> k(G * d), v(G * d);  // one token, [kv_heads, d]
    for (float& x : k) x = dist(rng);
    for (float& x : v) x = dist(rng);
    if (t == 2) k[d + 3] = std::numeric_limits<float>::quiet_NaN();  // kv head 1's row 2
    ASSERT_TRUE(copied.Append(k.data(), v.data(), 1).ok());
    for (int g = 0; g < G; ++g) {  // what the kernel writes: each head's slice into its store
      auto [keys, values] = in_place.NextRows(g);
      std::memcpy(keys, k.data() + g * d, hb);
      std::memcpy(values, v.data() + g * d, hb);
    }
    ASSERT_TRUE(in_place.AppendWritten(1).ok()) << t;
  }
  ASSERT_EQ(in_place.rows(), tokens);
  ASSERT_EQ(copied.rows(), tokens);
  for (int g = 0; g < G; ++g) {
    EXPECT_EQ(0, std::memcmp(in_place.store(g).keys(), copied.store(g).keys(), tokens * hb)) << g;
    EXPECT_EQ(0, std::memcmp(in_place.store(g).values(), copied.store(g).values(), tokens * hb))
        << g;
    for (int r = 0; r < tokens; ++r) EXPECT_EQ(in_place.position(g, r), first_position + r);
    EXPECT_EQ(in_place.store(g).nonfinite_rows(), copied.store(g).nonfinite_rows()) << g;
  }
  EXPECT_EQ(in_place.store(1).nonfinite_rows(), (std::vector<int64_t>{2}));
  // More rows than the reserved room holds: refused, nothing taken.
  EXPECT_EQ(in_place.AppendWritten(in_place.store(0).capacity() - tokens + 1).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(in_place.rows(), tokens);
}

}  // namespace
}  // namespace kvrt::runtime
