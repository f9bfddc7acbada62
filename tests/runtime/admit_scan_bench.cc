// admit_scan_bench: the direct step's admission scan (DirectStep::Admit marking a step's blocks in
// the page policy) one BlockPageCache::Use at a time against one UseHeld call, over as many
// policies as a batch keeps ((sequence, layer) pairs: 64 = B=16 x 4 layers), each 8 kv heads of
// the 128K shape's table and pool. Per head and step: 450 scattered every-step blocks (outlier
// rows) and 245 selected clusters of 3 blocks, 10 of them changed per step, all held (the hit
// path; the misses are admitted separately). Not a ctest; run by hand:
//   admit_scan_bench [policies=64] [steps=40]
// prints microseconds per (kv head, step) for both forms.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "runtime/src/block_page_cache.h"

using kvrt::runtime::BlockPageCache;

int main(int argc, char** argv) {
  const int policies = argc > 1 ? std::atoi(argv[1]) : 64;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 40;
  constexpr int kHeads = 8, kClusters = 8192;
  constexpr int64_t kPages = 1640, kBlocks = 16384;  // 128K rows / 8; pages: hot cache 0.1
  if (policies < 1 || steps < 2) {
    std::fprintf(stderr, "usage: admit_scan_bench [policies >= 1] [steps >= 2]\n");
    return 2;
  }
  std::mt19937 rng(1);
  auto cluster_blocks = [&](std::vector<int64_t>& v, int i) {
    const int64_t b0 = static_cast<int64_t>(rng() % kClusters) * 2;
    for (int b = 0; b < 3; ++b) v[450 + 3 * i + b] = b0 + b;
  };
  double us[2] = {0, 0};
  int64_t hits[2] = {0, 0};
  for (int form = 0; form < 2; ++form) {
    rng.seed(1);
    std::vector<BlockPageCache> caches;
    std::vector<std::vector<int64_t>> lists(static_cast<std::size_t>(policies) * kHeads);
    for (int i = 0; i < policies; ++i) {
      caches.emplace_back(kHeads, kPages);
      caches.back().NextStep();
      for (int g = 0; g < kHeads; ++g) {
        std::vector<int64_t>& v = lists[i * kHeads + g];
        v.resize(450 + 3 * 245);
        for (int k = 0; k < 450; ++k) v[k] = rng() % kBlocks;
        for (int k = 0; k < 245; ++k) cluster_blocks(v, k);
        for (int64_t b : v) (void)caches.back().Use(g, b, true);
      }
      (void)caches.back().TakeUpdates();
    }
    std::vector<int64_t> missed;
    for (int step = 0; step < steps; ++step) {
      for (int i = 0; i < policies; ++i) {
        BlockPageCache& c = caches[i];
        c.NextStep();
        const auto t0 = std::chrono::steady_clock::now();
        for (int g = 0; g < kHeads; ++g) {
          const std::vector<int64_t>& v = lists[i * kHeads + g];
          missed.clear();
          if (form == 0) {
            for (int64_t b : v) {
              if (c.Use(g, b, false))
                ++hits[form];
              else
                missed.push_back(b);
            }
          } else {
            hits[form] += c.UseHeld(g, v.data(), v.size(), &missed);
          }
          for (int64_t b : missed) (void)c.Use(g, b, true);
        }
        const auto t1 = std::chrono::steady_clock::now();
        (void)c.TakeUpdates();
        if (step > 0) us[form] += std::chrono::duration<double, std::micro>(t1 - t0).count();
        for (int g = 0; g < kHeads; ++g)
          for (int k = 0; k < 10; ++k) cluster_blocks(lists[i * kHeads + g], rng() % 245);
      }
    }
  }
  const double per = static_cast<double>(policies) * kHeads * (steps - 1);
  std::printf(
      "%d policies x %d kv heads, %d steps: one Use at a time %.2f us, UseHeld %.2f us "
      "per (kv head, step); hits %lld / %lld\n",
      policies, kHeads, steps, us[0] / per, us[1] / per, static_cast<long long>(hits[0]),
      static_cast<long long>(hits[1]));
  return hits[0] == hits[1] ? 0 : 1;
}
