// Launcher of the cluster step (cluster_kernels.h): argument checks, scratch, then
// cluster_score.cu through cluster_launch.h.
#include "kvrt_gpu/cluster_kernels.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "cluster_launch.h"

namespace kvrt::gpu {
namespace {

absl::Status CheckCluster(const ClusterSummaryView& s, const ClusterStepParams& p,
                          const ClusterStepOutputs& out) {
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClusterStep: unsupported head_dim ", s.head_dim, " (64, 128, 256)"));
  }
  if (s.kv_heads <= 0 || s.num_clusters < 0 || s.num_outliers < 0 || p.q_heads <= 0 ||
      p.q_heads % s.kv_heads != 0 || p.q_heads / s.kv_heads > kClusterMaxGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClusterStep: need kv_heads > 0, C, O >= 0 and q_heads a multiple of kv_heads "
                     "with at most ",
                     kClusterMaxGroup, " per kv head"));
  }
  if ((s.num_clusters > 0 && (s.centroid == nullptr || s.value_mean == nullptr ||
                              s.size == nullptr || s.spread == nullptr)) ||
      (s.num_outliers > 0 && (s.outlier_key == nullptr || out.outlier_score == nullptr)) ||
      out.density == nullptr || out.selected == nullptr || out.selected_count == nullptr ||
      out.selected_tokens == nullptr || out.est_o == nullptr || out.est_lse == nullptr) {
    return absl::InvalidArgumentError("ClusterStep: null summary array or output");
  }
  if (p.group_select && p.q_heads > s.kv_heads && s.num_clusters > 0 && out.group_key == nullptr)
    return absl::InvalidArgumentError("ClusterStep: group_select needs outputs.group_key");
  if (!(p.top_p >= 0.f && p.top_p <= 1.f) || !std::isfinite(p.scale) || p.scale < 0.f) {
    return absl::InvalidArgumentError("ClusterStep: top_p must be in [0, 1], scale finite >= 0");
  }
  return absl::OkStatus();
}

}  // namespace

std::size_t ClusterStepWorkspaceFloats(const ClusterSummaryView& s, int q_heads) {
  return detail::ClusterWorkspaceFloats(s, q_heads);
}

absl::Status ClusterStep(const ClusterSummaryView& s, const float* q, const ClusterStepParams& p,
                         const ClusterStepOutputs& out, float* workspace, void* stream) {
  if (auto st = CheckCluster(s, p, out); !st.ok()) return st;
#if KVRT_WITH_CUDA
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(s.head_dim));
  const detail::Err e = detail::LaunchClusterStep(s, q, p, scale, out, workspace, stream);
  if (e.msg != nullptr) return absl::InvalidArgumentError(absl::StrCat("ClusterStep: ", e.msg));
  if (e.cuda != 0) {
    return absl::InternalError(
        absl::StrCat("ClusterStep: CUDA error ", e.cuda, " (", detail::CudaErrorName(e.cuda), ")"));
  }
  return absl::OkStatus();
#else
  (void)q;
  (void)workspace;
  (void)stream;
  return absl::FailedPreconditionError("ClusterStep: kvrt was built without CUDA");
#endif
}

absl::Status ClusterStepBatch(const ClusterStepItem* items, int n, const ClusterStepParams& p,
                              void* stream) {
  if (n < 0 || (n > 0 && items == nullptr))
    return absl::InvalidArgumentError("ClusterStepBatch: n < 0 or null items");
  if (p.scored_event != nullptr)
    return absl::InvalidArgumentError("ClusterStepBatch: scored_event is one member's");
  for (int i = 0; i < n; ++i) {
    const ClusterStepItem& it = items[i];
    ClusterStepParams pi = p;
    pi.budget_tokens = it.budget_tokens;
    pi.key_offset = it.key_offset;
    pi.cluster_lse = it.cluster_lse;
    if (auto st = CheckCluster(it.summary, pi, it.out); !st.ok())
      return absl::InvalidArgumentError(absl::StrCat("member ", i, ": ", st.message()));
    if (it.summary.kv_heads != items[0].summary.kv_heads ||
        it.summary.head_dim != items[0].summary.head_dim)
      return absl::InvalidArgumentError(absl::StrCat(
          "ClusterStepBatch: member ", i, " has another kv_heads or head_dim than member 0"));
    if (it.q == nullptr ||
        (it.workspace == nullptr && ClusterStepWorkspaceFloats(it.summary, p.q_heads) > 0))
      return absl::InvalidArgumentError(
          absl::StrCat("ClusterStepBatch: member ", i, " has a null q or workspace"));
  }
#if KVRT_WITH_CUDA
  if (n == 0) return absl::OkStatus();
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(items[0].summary.head_dim));
  // NOTE: ~8 KiB; the launches copy it into their parameters.
  auto launch = std::make_unique<detail::ClusterBatchLaunch>();
  for (int first = 0; first < n; first += detail::kClusterBatchMax) {
    launch->n = std::min(n - first, detail::kClusterBatchMax);
    for (int i = 0; i < launch->n; ++i) {
      launch->m[i] = detail::ClusterBatchMember{};
      launch->m[i].it = items[first + i];
    }
    const detail::Err e = detail::LaunchClusterStepBatch(launch.get(), p, scale, stream);
    if (e.msg != nullptr)
      return absl::InvalidArgumentError(absl::StrCat("ClusterStepBatch: ", e.msg));
    if (e.cuda != 0)
      return absl::InternalError(absl::StrCat("ClusterStepBatch: CUDA error ", e.cuda, " (",
                                              detail::CudaErrorName(e.cuda), ")"));
  }
  return absl::OkStatus();
#else
  (void)stream;
  return absl::FailedPreconditionError("ClusterStepBatch: kvrt was built without CUDA");
#endif
}

}  // namespace kvrt::gpu
