#pragma once
// A trace of normal random values for tests of the trace format and of replay (any shape,
// prompt_tokens 0 included).
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tools/trace/trace.h"

namespace kvrt::trace::testing {

// [rows, heads, head_dim] of tensor `part` ("prefill.q", "decode.k", ...).
inline std::vector<int64_t> ShapeOf(const TraceMeta& m, const std::string& part) {
  const int64_t rows = part.rfind("prefill", 0) == 0 ? m.prompt_tokens : m.decode_steps;
  const int64_t heads = part.back() == 'q' ? m.num_q_heads : m.num_kv_heads;
  return {rows, heads, m.head_dim};
}

// Writes a trace with random contents; returns the bytes of each tensor in write order.
inline std::vector<std::string> WriteRandomTrace(const std::string& path, const TraceMeta& m,
                                                 unsigned seed = 7) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto writer = TraceWriter::Create(path, m);
  EXPECT_TRUE(writer.ok()) << writer.status();
  if (!writer.ok()) return {};
  std::vector<std::string> all;
  for (int layer = 0; layer < m.num_layers; ++layer)
    for (const std::string& part : TensorParts()) {
      const auto shape = ShapeOf(m, part);
      const std::size_t n = shape[0] * shape[1] * shape[2];
      std::vector<float> f(n);
      for (float& x : f) x = normal(rng);
      std::string bytes(n * DTypeSize(m.dtype), '\0');
      ConvertFromF32(f.data(), n, m.dtype, bytes.data());
      EXPECT_TRUE((*writer)->WriteTensor(layer, part, bytes.data(), bytes.size()).ok()) << part;
      all.push_back(bytes);
    }
  EXPECT_TRUE((*writer)->Close().ok());
  return all;
}

}  // namespace kvrt::trace::testing
