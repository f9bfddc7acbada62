#pragma once
// Synthetic out-of-distribution keys and queries for index tests and the sweep. Keys come in
// runs of tokens on one "topic" (neighbouring tokens alike), with a large shared bias and
// decaying per-channel scales; queries look for a topic but are drawn with a different mean,
// different channel scales and their own noise, so a query's best keys by q.k are not the keys
// nearest to it, nor is the query near any key (RetrievalAttention's OOD problem).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace kvrt::cpu_index::testing {

struct OodData {
  int64_t n = 0;
  int d = 0;
  std::vector<float> keys;            // [n, d]
  std::vector<float> prompt_queries;  // [n_prompt, d]: given to Build
  std::vector<float> test_queries;    // [n_test, d]: decode-time queries, same distribution
  int64_t n_prompt = 0, n_test = 0;
};

inline OodData MakeOodData(int64_t n, int d, int64_t n_prompt, int64_t n_test, uint64_t seed) {
  OodData out;
  out.n = n;
  out.d = d;
  out.n_prompt = n_prompt;
  out.n_test = n_test;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  const int topics = 256;
  std::vector<float> topic(static_cast<std::size_t>(topics) * d);
  for (auto& x : topic) x = g(rng);
  std::vector<float> key_bias(d), query_bias(d), key_scale(d), query_scale(d);
  for (int i = 0; i < d; ++i) {
    key_bias[i] = 2.0f * g(rng);
    query_bias[i] = 1.0f * g(rng);
    key_scale[i] = std::exp(-1.5f * i / d);
    query_scale[i] = 0.4f + std::exp(-1.5f * (d - 1 - i) / d);
  }
  out.keys.resize(static_cast<std::size_t>(n) * d);
  std::uniform_int_distribution<int> topic_of(0, topics - 1), run_len(8, 64);
  int64_t i = 0;
  while (i < n) {
    const int c = topic_of(rng);
    const int64_t end = std::min<int64_t>(n, i + run_len(rng));
    for (; i < end; ++i) {
      float* k = out.keys.data() + i * d;
      const float w = 0.5f + 0.5f * std::abs(g(rng));  // how strongly this token is on topic
      for (int j = 0; j < d; ++j)
        k[j] = key_bias[j] + key_scale[j] * (w * topic[c * d + j] + 0.7f * g(rng));
    }
  }
  // Queries favour a skewed subset of topics (a few topics draw most attention).
  std::exponential_distribution<float> pop(0.05f);
  auto make_queries = [&](int64_t m, std::vector<float>* q) {
    q->resize(static_cast<std::size_t>(m) * d);
    for (int64_t r = 0; r < m; ++r) {
      const int c = static_cast<int>(std::min<float>(pop(rng), topics - 1));
      float* x = q->data() + r * d;
      for (int j = 0; j < d; ++j)
        x[j] = query_bias[j] + query_scale[j] * (1.5f * topic[c * d + j] + 0.8f * g(rng));
    }
  };
  make_queries(n_prompt, &out.prompt_queries);
  make_queries(n_test, &out.test_queries);
  return out;
}

// Recall of `got` against the exact top list `want` (|want| = k).
inline double Recall(const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (want.empty()) return 1.0;
  int64_t hit = 0;
  for (int64_t id : want) hit += std::find(got.begin(), got.end(), id) != got.end();
  return static_cast<double>(hit) / static_cast<double>(want.size());
}

}  // namespace kvrt::cpu_index::testing
