// index_sweep: recall@k / scanned fraction / build time / search latency of every index kind on
// synthetic out-of-distribution data, swept over search effort. Not a ctest; run by hand:
//   index_sweep [n_keys=32768] [dim=128] [n_test_queries=200] [k=100] [kinds=all]
//               [graph_query_sample=4096]
// Build is parallel over the current TBB arena; searches run one at a time (latency per query).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "tests/cpu_index/ood_data.h"

using namespace kvrt;
using namespace kvrt::cpu_index;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 32768;
  const int d = argc > 2 ? std::atoi(argv[2]) : 128;
  const int64_t nq = argc > 3 ? std::atoll(argv[3]) : 200;
  const int k = argc > 4 ? std::atoi(argv[4]) : 100;
  const std::string only = argc > 5 ? argv[5] : "all";
  const int sample = argc > 6 ? std::atoi(argv[6]) : 4096;
  const auto data = testing::MakeOodData(n, d, /*n_prompt=*/n, nq, /*seed=*/7);

  HeadStore store(d, DType::kBF16);
  std::vector<uint16_t> kb(data.keys.size());
  ConvertFromF32(data.keys.data(), kb.size(), DType::kBF16, kb.data());
  if (!store.Append(kb.data(), kb.data(), n, d).ok()) return 1;
  const double key_bytes = static_cast<double>(n) * d * 2;

  std::vector<std::vector<int64_t>> truth(nq);
  {
    auto flat = MakeIndex(IndexKind::kFlat, {}, d).value();
    (void)flat->Build(store, nullptr, 0);
    for (int64_t i = 0; i < nq; ++i) {
      SearchResult r;
      (void)flat->Search(store, data.test_queries.data() + i * d, {k, 0}, &r);
      truth[i] = r.ids;
    }
  }
  struct Sweep {
    IndexKind kind;
    std::vector<int> efforts;
  };
  const std::vector<Sweep> sweeps = {
      {IndexKind::kIvf, {1, 2, 4, 8, 16, 32, 64, 128}},
      {IndexKind::kHnsw, {100, 200, 400, 800, 1600, 3200}},
      {IndexKind::kLandmark, {8, 16, 32, 64, 128, 256, 512}},
      {IndexKind::kAttentionAware, {100, 128, 160, 200, 300, 400, 600, 1000}},
  };
  std::printf("n=%lld d=%d bf16 k=%d queries=%lld\n", static_cast<long long>(n), d, k,
              static_cast<long long>(nq));
  std::printf("%-16s %7s %9s %9s %9s %11s %10s\n", "kind", "effort", "recall", "scanned%",
              "build_ms", "search_us50", "mem/keys");
  for (const auto& sw : sweeps) {
    if (only != "all" && only != IndexKindName(sw.kind)) continue;
    IndexConfig config;
    config.graph_query_sample = sample;
    auto index = MakeIndex(sw.kind, config, d).value();
    const auto t0 = std::chrono::steady_clock::now();
    const auto st = index->Build(store, data.prompt_queries.data(), data.n_prompt);
    const double build_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) {
      std::printf("%s: %s\n", std::string(IndexKindName(sw.kind)).c_str(), st.ToString().c_str());
      continue;
    }
    for (int effort : sw.efforts) {
      double recall = 0, scanned = 0;
      std::vector<double> us;
      for (int64_t i = 0; i < nq; ++i) {
        SearchResult r;
        const auto s0 = std::chrono::steady_clock::now();
        (void)index->Search(store, data.test_queries.data() + i * d, {k, effort}, &r);
        us.push_back(
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s0)
                .count());
        recall += testing::Recall(r.ids, truth[i]);
        scanned += static_cast<double>(r.scanned);
      }
      std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
      std::printf("%-16s %7d %9.4f %9.3f %9.1f %11.1f %10.3f\n",
                  std::string(IndexKindName(sw.kind)).c_str(), effort, recall / nq,
                  100.0 * scanned / nq / n, build_ms, us[us.size() / 2],
                  index->MemoryBytes() / key_bytes);
    }
  }
  return 0;
}
