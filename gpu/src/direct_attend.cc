// Launchers of the direct step (direct_attend.h): argument checks (shared with the host
// references through direct_check.h), then direct_attend.cu through direct_launch.h. Without CUDA
// every launcher returns FailedPrecondition after its checks.
#include "kvrt_gpu/direct_attend.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "cluster_launch.h"
#include "code_scan_launch.h"
#include "direct_check.h"
#include "direct_launch.h"
#include "launch_status.h"

namespace kvrt::gpu {
namespace detail {
namespace {

absl::Status Invalid(const char* fn, const char* what) {
  return absl::InvalidArgumentError(absl::StrCat(fn, ": ", what));
}

// What every call reads: the store, the page table and the pool.
absl::Status CheckRows(const DirectRowsView& v, const char* fn) {
  if (v.head_dim != 64 && v.head_dim != 128 && v.head_dim != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": unsupported head_dim ", v.head_dim, " (64, 128, 256)"));
  }
  if (v.dtype != DType::kF32 && v.dtype != DType::kF16 && v.dtype != DType::kBF16) {
    return Invalid(fn, "unsupported dtype");
  }
  if (v.kv_heads <= 0) return Invalid(fn, "need kv_heads > 0");
  if (v.rows < 0 || v.rows > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": rows ", v.rows, " outside [0, 2^31)"));
  }
  if (v.blocks_per_head < (v.rows + kDirectBlockRows - 1) / kDirectBlockRows) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": blocks_per_head ", v.blocks_per_head,
                                                   " < ceil(rows / ", kDirectBlockRows, ")"));
  }
  if (v.pages < 0 || v.pages > std::numeric_limits<int32_t>::max() / kDirectBlockRows) {
    return Invalid(fn, "pages outside [0, 2^31 / kDirectBlockRows)");
  }
  if (v.store_k == nullptr || v.store_v == nullptr ||
      (v.blocks_per_head > 0 && v.block_page == nullptr) ||
      (v.pages > 0 && (v.pool_k == nullptr || v.pool_v == nullptr))) {
    return Invalid(fn, "null store, page table or pool");
  }
  if (v.staged_pages) {
    if (v.pages >= kStagedPageMask) return Invalid(fn, "staged pages need pages < 2^24 - 1");
    if (v.stage_cap < 0 || v.stage_cap > std::numeric_limits<int32_t>::max() ||
        v.stage_count == nullptr ||
        (v.stage_cap > 0 &&
         (v.stage_k == nullptr || v.stage_v == nullptr || v.stage_row == nullptr))) {
      return Invalid(fn, "staged pages need a stage (stage_count, and buffers for stage_cap rows)");
    }
  }
  return absl::OkStatus();
}

absl::Status CheckGroup(int q_heads, int kv_heads, const char* fn) {
  if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0 ||
      q_heads / kv_heads > kDirectMaxGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": q_heads ", q_heads, " must be a multiple of kv_heads ", kv_heads,
                     " with at most ", kDirectMaxGroup, " q heads per kv head"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckMarkSelected(const int32_t* selected, const int32_t* count, int q_heads,
                               int kv_heads, int num_clusters, const uint32_t* mask,
                               const char* fn) {
  if (auto s = CheckGroup(q_heads, kv_heads, fn); !s.ok()) return s;
  if (num_clusters < 0) return Invalid(fn, "num_clusters < 0");
  if (num_clusters > 0 && (selected == nullptr || count == nullptr || mask == nullptr)) {
    return Invalid(fn, "null selected, count or mask");
  }
  return absl::OkStatus();
}

absl::Status CheckDirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q,
                               float scale, const float* o, const float* lse, const char* fn) {
  if (auto s = CheckRows(v, fn); !s.ok()) return s;
  if (auto s = CheckGroup(v.q_heads, v.kv_heads, fn); !s.ok()) return s;
  if (v.num_clusters < 0 || v.num_extra < 0) return Invalid(fn, "num_clusters or num_extra < 0");
  if ((v.num_clusters > 0 &&
       (mask == nullptr || v.cluster_begin == nullptr || v.cluster_size == nullptr)) ||
      (v.num_extra > 0 && v.extra == nullptr) || v.tail_begin == nullptr) {
    return Invalid(fn, "null mask, cluster, extra or tail array");
  }
  if (q == nullptr || o == nullptr || lse == nullptr) return Invalid(fn, "null q, o or lse");
  if (!std::isfinite(scale) || scale < 0.f) return Invalid(fn, "scale must be finite and >= 0");
  return absl::OkStatus();
}

absl::Status CheckFillPages(const DirectRowsView& v, const int32_t* updates, int n,
                            const char* fn) {
  if (auto s = CheckRows(v, fn); !s.ok()) return s;
  if (n < 0) return Invalid(fn, "n < 0");
  if (n > 0 && (updates == nullptr || v.block_page == nullptr)) {
    return Invalid(fn, "null updates or page table");
  }
  if (n > 0 && v.pages <= 0) return Invalid(fn, "updates need a pool (pages > 0)");
  return absl::OkStatus();
}

absl::Status CheckCommitStaged(const DirectRowsView& v, const char* fn) {
  if (auto s = CheckRows(v, fn); !s.ok()) return s;
  if (!v.staged_pages) return Invalid(fn, "needs staged_pages");
  return absl::OkStatus();
}

absl::Status CheckMissPenalty(const DirectRowsView& v, float penalty, const float* offset,
                              const char* fn) {
  if (v.kv_heads <= 0 || v.num_clusters < 0) return Invalid(fn, "need kv_heads > 0, C >= 0");
  if (!std::isfinite(penalty) || penalty < 0.f)
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": penalty ", penalty, " must be finite and >= 0"));
  if (v.num_clusters > 0 &&
      (offset == nullptr || v.cluster_begin == nullptr || v.cluster_size == nullptr ||
       (v.blocks_per_head > 0 && v.block_page == nullptr))) {
    return Invalid(fn, "null offset, cluster or page table array");
  }
  return absl::OkStatus();
}

}  // namespace detail

using detail::NoCuda;
using detail::ToStatus;

std::size_t DirectAttendWorkspaceFloats(const DirectRowsView& v) {
  return detail::DirectWorkspaceFloats(v);
}

absl::Status MarkSelected(const int32_t* selected, const int32_t* count, int q_heads, int kv_heads,
                          int num_clusters, uint32_t* mask, void* stream) {
  constexpr const char* kFn = "MarkSelected";
  if (auto s =
          detail::CheckMarkSelected(selected, count, q_heads, kv_heads, num_clusters, mask, kFn);
      !s.ok()) {
    return s;
  }
#if KVRT_WITH_CUDA
  return ToStatus(
      detail::LaunchMarkSelected(selected, count, q_heads, kv_heads, num_clusters, mask, stream),
      kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status DirectAttend(const DirectRowsView& v, const uint32_t* mask, const float* q,
                          float scale, float* o, float* lse, int64_t* read_rows, float* workspace,
                          void* stream, const int64_t* rows_now) {
  constexpr const char* kFn = "DirectAttend";
  if (auto s = detail::CheckDirectAttend(v, mask, q, scale, o, lse, kFn); !s.ok()) return s;
#if KVRT_WITH_CUDA
  const float sc = scale != 0.f ? scale : 1.f / std::sqrt(float(v.head_dim));
  return ToStatus(
      detail::LaunchDirectAttend(v, mask, q, sc, o, lse, read_rows, workspace, stream, rows_now),
      kFn);
#else
  (void)read_rows;
  (void)workspace;
  (void)stream;
  (void)rows_now;
  return NoCuda(kFn);
#endif
}

int DirectAttendSplits(const DirectRowsView& v) { return detail::DirectSplits(v); }

absl::Status DirectAttendPartial(const DirectRowsView& v, const uint32_t* mask, const float* q,
                                 float scale, float* part_o, float* part_lse, int64_t* read_rows,
                                 void* stream, const int64_t* rows_now) {
  constexpr const char* kFn = "DirectAttendPartial";
  if (auto s = detail::CheckDirectAttend(v, mask, q, scale, part_o, part_lse, kFn); !s.ok())
    return s;
#if KVRT_WITH_CUDA
  const float sc = scale != 0.f ? scale : 1.f / std::sqrt(float(v.head_dim));
  return ToStatus(detail::LaunchDirectAttendSplits(v, mask, q, sc, part_o, part_lse, read_rows,
                                                   stream, rows_now),
                  kFn);
#else
  (void)read_rows;
  (void)stream;
  (void)rows_now;
  return NoCuda(kFn);
#endif
}

absl::Status DirectAttendPartialBatch(const DirectAttendItem* items, int n, float scale,
                                      void* stream) {
  constexpr const char* kFn = "DirectAttendPartialBatch";
  if (n < 1 || n > kDirectAttendBatchMax)
    return absl::InvalidArgumentError(
        absl::StrCat(kFn, ": ", n, " members (1 to ", kDirectAttendBatchMax, " per call)"));
  if (items == nullptr) return absl::InvalidArgumentError(absl::StrCat(kFn, ": null items"));
  for (int i = 0; i < n; ++i) {
    const DirectAttendItem& it = items[i];
    const DirectRowsView& v = it.v;
    const DirectRowsView& v0 = items[0].v;
    if (v.dtype != v0.dtype || v.head_dim != v0.head_dim || v.q_heads != v0.q_heads ||
        v.kv_heads != v0.kv_heads)
      return absl::InvalidArgumentError(
          absl::StrCat(kFn, ": member ", i, "'s shape (dtype, head_dim, q_heads, kv_heads) is not ",
                       "member 0's: one launch runs one shape"));
    const std::string fn = absl::StrCat(kFn, " member ", i);
    if (auto s =
            detail::CheckDirectAttend(v, it.mask, it.q, scale, it.part_o, it.part_lse, fn.c_str());
        !s.ok())
      return s;
  }
#if KVRT_WITH_CUDA
  const float sc = scale != 0.f ? scale : 1.f / std::sqrt(float(items[0].v.head_dim));
  return ToStatus(detail::LaunchDirectAttendBatch(items, n, sc, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status FillPages(const DirectRowsView& v, const int32_t* updates, int n, void* stream) {
  constexpr const char* kFn = "FillPages";
  if (auto s = detail::CheckFillPages(v, updates, n, kFn); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchFillPages(v, updates, n, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status PreloadDirectStepKernels(DType dtype, int head_dim, int q_heads, int kv_heads) {
  constexpr const char* kFn = "PreloadDirectStepKernels";
  if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        kFn, ": q_heads ", q_heads, " is not a positive multiple of kv_heads ", kv_heads));
#if KVRT_WITH_CUDA
  detail::Err e = detail::PreloadClusterStep(head_dim, q_heads, kv_heads);
  if (e.ok()) e = detail::PreloadDirectStep(dtype, head_dim, q_heads, kv_heads);
  if (e.ok()) e = detail::PreloadMergeStatesN(head_dim);
  if (e.ok()) e = detail::PreloadRing(dtype);
  if (e.ok()) e = detail::PreloadCodeClusterMass();
  return ToStatus(e, kFn);
#else
  (void)dtype;
  (void)head_dim;
  return NoCuda(kFn);
#endif
}

absl::Status MissPenaltyOffsets(const DirectRowsView& v, float penalty, float* offset,
                                void* stream) {
  constexpr const char* kFn = "MissPenaltyOffsets";
  if (auto s = detail::CheckMissPenalty(v, penalty, offset, kFn); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchMissPenaltyOffsets(v, penalty, offset, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status CommitStaged(const DirectRowsView& v, void* stream) {
  constexpr const char* kFn = "CommitStaged";
  if (auto s = detail::CheckCommitStaged(v, kFn); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchCommitStaged(v, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

}  // namespace kvrt::gpu
