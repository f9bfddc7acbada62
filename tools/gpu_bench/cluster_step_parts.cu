// cluster_step_parts: the cluster kind's step kernels (ClusterStep: score, then select) taken apart
// (docs/benchmarks.md). Built three times from gpu/src/cluster_score.cu: as it is, without the
// selection's radix passes (KVRT_CLUSTER_PARTS=1: nothing selected) and without its compaction
// (=2); each times ClusterStep at --clusters per kv head (8 kv heads, 32 q heads, d = 128, bf16
// summary, 512 outliers per kv head, budget 2% of 16 rows per cluster) and at budget 0 (the score
// kernel and the selection's merge of its states only).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// The parts left out make the loops after them unreachable: expected here.
#pragma nv_diag_suppress 128
// The kernels themselves, built with this target's KVRT_CLUSTER_PARTS.
#include "cluster_score.cu"  // NOLINT

namespace {

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "cluster_step_parts: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

template <typename T>
T* Upload(const std::vector<T>& v, bool* ok) {
  void* p = nullptr;
  *ok = *ok && Ok(cudaMalloc(&p, v.size() * sizeof(T)), "cudaMalloc") &&
        Ok(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return static_cast<T*>(p);
}

template <typename T>
T* Alloc(std::size_t n, bool* ok) {
  void* p = nullptr;
  *ok = *ok && Ok(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(p);
}

uint16_t Bf16(float x) {  // round to nearest even
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  int clusters = 8192, iters = 200;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--clusters") == 0 && i + 1 < argc) {
      clusters = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::printf(
          "usage: %s [--clusters N (per kv head; 8192 = 128K tokens)] [--iters N (200)]\n"
          "Times the cluster kind's step kernels (score + select), whole and in parts.\n",
          argv[0]);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  if (clusters <= 0 || iters <= 0) {
    std::fprintf(stderr, "cluster_step_parts: --clusters and --iters must be positive\n");
    return 2;
  }
  namespace g = kvrt::gpu;
  const int kv = 8, qh = 32, d = 128, outliers = 512;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto bf16s = [&](std::size_t n, float sd) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = Bf16(sd * nd(rng));
    return v;
  };
  std::vector<float> q(static_cast<std::size_t>(qh) * d);
  for (auto& x : q) x = nd(rng);
  bool ok = true;
  g::ClusterSummaryView s;
  s.kv_heads = kv;
  s.head_dim = d;
  s.num_clusters = clusters;
  s.num_outliers = outliers;
  s.centroid = Upload(bf16s(static_cast<std::size_t>(kv) * clusters * d, 0.3f), &ok);
  s.value_mean = Upload(bf16s(static_cast<std::size_t>(kv) * clusters * d, 1.f), &ok);
  s.size = Upload(std::vector<int32_t>(static_cast<std::size_t>(kv) * clusters, 16), &ok);
  s.spread = Upload(std::vector<float>(static_cast<std::size_t>(kv) * clusters, 0.1f), &ok);
  s.outlier_key = Upload(bf16s(static_cast<std::size_t>(kv) * outliers * d, 0.3f), &ok);
  const float* dq = Upload(q, &ok);
  g::ClusterStepOutputs out;
  out.density = Alloc<float>(static_cast<std::size_t>(qh) * clusters, &ok);
  out.outlier_score = Alloc<float>(static_cast<std::size_t>(qh) * outliers, &ok);
  out.selected = Alloc<int32_t>(static_cast<std::size_t>(qh) * clusters, &ok);
  out.selected_count = Alloc<int32_t>(qh, &ok);
  out.selected_tokens = Alloc<int64_t>(qh, &ok);
  out.est_o = Alloc<float>(static_cast<std::size_t>(qh) * d, &ok);
  out.est_lse = Alloc<float>(qh, &ok);
  float* ws = Alloc<float>(g::detail::ClusterWorkspaceFloats(s, qh), &ok);
  if (!ok) return 1;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto time_us = [&](int64_t budget) {
    g::ClusterStepParams p;
    p.q_heads = qh;
    p.budget_tokens = budget;
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    for (int i = 0; i < 5; ++i)
      (void)g::detail::LaunchClusterStep(s, dq, p, scale, out, ws, nullptr);
    cudaEventRecord(e0);
    for (int i = 0; i < iters; ++i)
      (void)g::detail::LaunchClusterStep(s, dq, p, scale, out, ws, nullptr);
    cudaEventRecord(e1);
    if (!Ok(cudaEventSynchronize(e1), "ClusterStep")) return -1.0;
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    return 1e3 * ms / iters;
  };
  const int64_t budget = static_cast<int64_t>(clusters) * 16 / 50;  // 2% of the cold rows
  const double whole = time_us(budget), score = time_us(0);
  if (whole < 0 || score < 0) return 1;
  const char* part = KVRT_CLUSTER_PARTS == 1   ? "without the radix passes"
                     : KVRT_CLUSTER_PARTS == 2 ? "without the compaction"
                                               : "whole";
  std::printf(
      "cluster step (%s), %d clusters x %d kv heads: %.1f us per step; at budget 0 "
      "%.1f us (the selection's share: %.1f us)\n",
      part, clusters, kv, whole, score, whole - score);
  return 0;
}
