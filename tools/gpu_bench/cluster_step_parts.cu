// cluster_step_parts: the cluster kind's step kernels (ClusterStep: score, then select) taken apart
// (docs/benchmarks.md). Built three times from gpu/src/cluster_score.cu: as it is, without the
// selection's radix passes (KVRT_CLUSTER_PARTS=1: nothing selected) and without its compaction
// (=2); each times ClusterStep at --clusters per kv head (8 kv heads, 32 q heads, d = 128, bf16
// summary, 512 outliers per kv head, budget 2% of 16 rows per cluster) and at budget 0 (the score
// kernel and the selection's merge of its states only).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kvrt_common/dtype.h"
#include "parts_harness.h"

// The parts left out make the loops after them unreachable: expected here.
#pragma nv_diag_suppress 128
// The kernels themselves, built with this target's KVRT_CLUSTER_PARTS.
#include "cluster_score.cu"  // NOLINT

int main(int argc, char** argv) {
  namespace g = kvrt::gpu;
  namespace b = kvrt::gpu_bench;
  constexpr const char* kTool = "cluster_step_parts";
  int64_t clusters = 8192;
  int iters = 200;
  if (const int rc = b::ParsePartsArgs(
          argc, argv, kTool, "clusters", "per kv head; 8192 = 128K tokens",
          "Times the cluster kind's step kernels (score + select), whole and in parts.", &clusters,
          &iters);
      rc >= 0) {
    return rc;
  }
  const int kv = 8, qh = 32, d = 128, outliers = 512;
  const int c = static_cast<int>(clusters);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto bf16s = [&](std::size_t n, float sd) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = kvrt::F32ToBf16(sd * nd(rng));
    return v;
  };
  std::vector<float> q(static_cast<std::size_t>(qh) * d);
  for (auto& x : q) x = nd(rng);
  bool ok = true;
  const std::size_t kc = static_cast<std::size_t>(kv) * c;
  g::ClusterSummaryView s;
  s.kv_heads = kv;
  s.head_dim = d;
  s.num_clusters = c;
  s.num_outliers = outliers;
  s.centroid = b::Upload(kTool, bf16s(kc * d, 0.3f), &ok);
  s.value_mean = b::Upload(kTool, bf16s(kc * d, 1.f), &ok);
  s.size = b::Upload(kTool, std::vector<int32_t>(kc, 16), &ok);
  s.spread = b::Upload(kTool, std::vector<float>(kc, 0.1f), &ok);
  s.outlier_key = b::Upload(kTool, bf16s(static_cast<std::size_t>(kv) * outliers * d, 0.3f), &ok);
  const float* dq = b::Upload(kTool, q, &ok);
  g::ClusterStepOutputs out;
  out.density = b::Alloc<float>(kTool, static_cast<std::size_t>(qh) * c, &ok);
  out.outlier_score = b::Alloc<float>(kTool, static_cast<std::size_t>(qh) * outliers, &ok);
  out.selected = b::Alloc<int32_t>(kTool, static_cast<std::size_t>(qh) * c, &ok);
  out.selected_count = b::Alloc<int32_t>(kTool, qh, &ok);
  out.selected_tokens = b::Alloc<int64_t>(kTool, qh, &ok);
  out.est_o = b::Alloc<float>(kTool, static_cast<std::size_t>(qh) * d, &ok);
  out.est_lse = b::Alloc<float>(kTool, qh, &ok);
  float* ws = b::Alloc<float>(kTool, g::detail::ClusterWorkspaceFloats(s, qh), &ok);
  if (!ok) return 1;
  out.group_key = b::Alloc<float>(kTool, kc, &ok);
  if (!ok) return 1;
  auto time_us = [&](int64_t budget, bool group = false) {
    g::ClusterStepParams p;
    p.q_heads = qh;
    p.budget_tokens = budget;
    p.group_select = group;
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    return b::TimeUs(kTool, "ClusterStep", iters, [&] {
      (void)g::detail::LaunchClusterStep(s, dq, p, scale, out, ws, nullptr);
    });
  };
  const int64_t budget = clusters * 16 / 50;  // 2% of the cold rows
  const double whole = time_us(budget), score = time_us(0);
  if (whole < 0 || score < 0) return 1;
  const char* part = KVRT_CLUSTER_PARTS == 1   ? "without the radix passes"
                     : KVRT_CLUSTER_PARTS == 2 ? "without the compaction"
                                               : "whole";
  std::printf(
      "cluster step (%s), %d clusters x %d kv heads: %.1f us per step; at budget 0 "
      "%.1f us (the selection's share: %.1f us)\n",
      part, c, kv, whole, score, whole - score);
  namespace dt = kvrt::gpu::detail;
  {
    // The score kernels alone (the warp-per-cluster one, and the tensor-core one the launcher
    // picks for this shape), against the bytes they must move (the summary read once, the
    // densities and the CTAs' states written): their bandwidth.
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    const int otiles = (outliers + dt::kOutlierTile - 1) / dt::kOutlierTile;
    for (const bool mma : {false, true}) {
      const int cctas = mma ? dt::ClusterCtas<128, dt::kMmaQ, true>(dt::ClusterTiles(c), kv)
                            : dt::ClusterCtas<128, 4, false>(dt::ClusterTiles(c), kv);
      const unsigned grid = static_cast<unsigned>((cctas + otiles) * kv);
      const double us = b::TimeUs(kTool, mma ? "ScoreMmaKernel" : "ScoreKernel", iters, [&] {
        if (mma) {
          dt::ScoreMmaKernel<128><<<grid, dt::kScoreThreads>>>(
              s, dq, qh / kv, scale, 0.f, cctas, otiles, out.density, out.outlier_score, ws);
        } else {
          dt::ScoreKernel<128, 4><<<grid, dt::kScoreThreads>>>(s, dq, qh / kv, scale, 0.f, cctas,
                                                               otiles, nullptr, out.density,
                                                               out.outlier_score, ws);
        }
      });
      if (us < 0) return 1;
      const double bytes = static_cast<double>(kc) * (2.0 * d * 2 + 8) +
                           static_cast<double>(kv) * outliers * d * 2 +
                           static_cast<double>(qh) * (c + outliers) * 4 +
                           static_cast<double>(qh) * cctas * (d + 2) * 4;
      std::printf("  %s alone: %.1f us, %.0f GB/s of its %.1f MB (%d cluster CTAs per kv head)%s\n",
                  mma ? "tensor-core score kernel" : "score kernel (warp per cluster)", us,
                  bytes / us * 1e-3, bytes * 1e-6, cctas,
                  mma == dt::UseScoreMma<128>(s, qh / kv, nullptr) ? " <- the step's" : "");
    }
  }
  // The decode step's default: one selection per kv head (the group keys, then the select kernel).
  const double gwhole = time_us(budget, true), gscore = time_us(0, true);
  if (gwhole < 0 || gscore < 0) return 1;
  std::printf(
      "cluster step (%s, group selection), %d clusters x %d kv heads: %.1f us per step; at "
      "budget 0 %.1f us (the selection's share: %.1f us; the group keys' %.1f us)\n",
      part, c, kv, gwhole, gscore, gwhole - gscore, gscore - score);
#if KVRT_CLUSTER_PARTS == 0
  // The group selection's threshold kernels (cluster_threshold.cu) against the select kernel's
  // own search: what each kv head's search ended in after a step, then the kernels alone.
  if (c < dt::kThresholdMinClusters) {
    std::printf("  (fewer than %d clusters per kv head: the select kernel searches itself)\n",
                dt::kThresholdMinClusters);
    return 0;
  }
  if (time_us(budget, true) < 0) return 1;
  const float* thr_at = ws + g::detail::ClusterThresholdAt(s, qh);
  std::vector<g::detail::ThresholdRow> rows(kv);
  if (!b::CudaOk(
          kTool,
          cudaMemcpy(rows.data(), thr_at, rows.size() * sizeof(rows[0]), cudaMemcpyDeviceToHost),
          "threshold rows")) {
    return 1;
  }
  for (int h = 0; h < kv; ++h)
    std::printf(
        "  kv head %d: threshold mode %d (1 found, 2 all, 3 searched by the select kernel), "
        "bin %d, %d candidates, %lld tokens above\n",
        h, rows[h].mode, rows[h].bin, rows[h].ncand, rows[h].above_tok);
  const int cctas = dt::ScoreCtas<128, 4>(s, qh / kv, nullptr);
  const auto* row_ptr = reinterpret_cast<const dt::ThresholdRow*>(thr_at);
  auto select_us = [&](const dt::ThresholdRow* thr) {
    return b::TimeUs(kTool, "SelectKernel", iters, [&] {
      dt::SelectKernel<128><<<qh, dt::kSelectThreads>>>(s, qh / kv, cctas, budget, 0.f, 1,
                                                        out.density, ws, out.group_key, thr, out);
    });
  };
  const double sel_found = select_us(row_ptr), sel_search = select_us(nullptr);
  const double thr_us = b::TimeUs(kTool, "LaunchGroupThreshold", iters, [&] {
    (void)dt::LaunchGroupThreshold(s, out.group_key, budget, 0.f,
                                   dt::ThresholdLayout(const_cast<float*>(thr_at), kv, c), nullptr);
  });
  std::printf(
      "  select kernel %.1f us with the threshold found, %.1f us searching itself; the "
      "threshold kernels %.1f us (over a histogram they do not clear: time only)\n",
      sel_found, sel_search, thr_us);
#endif
  return 0;
}
