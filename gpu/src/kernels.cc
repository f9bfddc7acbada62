// Launchers of the GPU-tier kernels: argument checks, split-K planning and scratch, then the CUDA
// translation units (launch.h). Without CUDA every launcher returns FailedPrecondition and
// DeviceAvailable() is false, so callers fall back to the host references.
#include "kvrt_gpu/kernels.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "launch_status.h"
#include "ring_check.h"

namespace kvrt::gpu {
using detail::NoCuda;
using detail::ToStatus;

namespace {

bool HeadDimOk(int d) { return d == 64 || d == 128 || d == 256; }
bool DTypeOk(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }
[[maybe_unused]] float ScaleOr(float scale, int d) {
  return scale != 0.f ? scale : 1.f / std::sqrt(float(d));
}


absl::Status CheckTier(const TierBatch& t, const AttnParams& p) {
  if (t.batch < 0 || t.kv_heads <= 0 || t.max_tokens < 0) {
    return absl::InvalidArgumentError("TierAttention: batch, kv_heads or max_tokens out of range");
  }
  if (!HeadDimOk(t.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("TierAttention: unsupported head_dim ", t.head_dim, " (64, 128, 256)"));
  }
  if (!DTypeOk(t.dtype)) return absl::InvalidArgumentError("TierAttention: unsupported dtype");
  if (p.q_heads <= 0 || p.q_heads % t.kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("TierAttention: q_heads ", p.q_heads,
                                                   " must be a positive multiple of kv_heads ",
                                                   t.kv_heads));
  }
  if (p.split_tokens < 0) return absl::InvalidArgumentError("TierAttention: split_tokens < 0");
  return absl::OkStatus();
}

absl::Status CheckGather(const GatherBatch& g, int split_tokens) {
  if (g.rows_q < 0 || g.max_rows < 0 || split_tokens < 0) {
    return absl::InvalidArgumentError("GatherAttend: rows_q, max_rows or split_tokens < 0");
  }
  if (!HeadDimOk(g.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GatherAttend: unsupported head_dim ", g.head_dim, " (64, 128, 256)"));
  }
  if (!DTypeOk(g.dtype)) return absl::InvalidArgumentError("GatherAttend: unsupported dtype");
  return absl::OkStatus();
}

absl::Status CheckRing(const RingBatch& r, int n, const char* what) {
  if (r.batch < 0 || r.capacity <= 0 || r.kv_heads <= 0 || n < 0 || n > r.capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": need capacity > 0, kv_heads > 0, 0 <= n <= capacity"));
  }
  if (!HeadDimOk(r.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unsupported head_dim ", r.head_dim, " (64, 128, 256)"));
  }
  if (!DTypeOk(r.dtype)) return absl::InvalidArgumentError(absl::StrCat(what, ": bad dtype"));
  return absl::OkStatus();
}

absl::Status CheckTopK(const TopKProblem& pr) {
  if (pr.nq < 0 || pr.nk <= 0 || pr.topk <= 0 || pr.topk > kMaxTopK || pr.topk > pr.nk ||
      pr.nk > (int64_t{1} << 31) - 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExactTopK: need 0 < topk <= min(", kMaxTopK, ", nk), nk < 2^31"));
  }
  if (!HeadDimOk(pr.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExactTopK: unsupported head_dim ", pr.head_dim, " (64, 128, 256)"));
  }
  if (!DTypeOk(pr.dtype) || pr.q_stride < pr.head_dim || pr.k_stride < pr.head_dim) {
    return absl::InvalidArgumentError("ExactTopK: bad dtype or stride < head_dim");
  }
  return absl::OkStatus();
}

}  // namespace

bool DeviceAvailable() {
#if KVRT_WITH_CUDA
  return detail::DeviceCount() > 0;
#else
  return false;
#endif
}

#if KVRT_WITH_CUDA
// The tier kernel's CTAs per split: a wide group's kv head takes several (kTierGroupTile q heads
// each), and the split planner sizes the splits for all of them.
static int TierCtas(const TierBatch& tier, const AttnParams& p) {
  const int group = p.q_heads / tier.kv_heads;
  return tier.batch * tier.kv_heads * ((group + kTierGroupTile - 1) / kTierGroupTile);
}
#endif

std::size_t TierAttentionWorkspaceFloats(const TierBatch& tier, const AttnParams& p) {
#if KVRT_WITH_CUDA
  if (tier.kv_heads <= 0) return 0;
  const int units = TierCtas(tier, p);
  const auto plan = detail::PlanSplits(units, tier.max_tokens, p.split_tokens, detail::SmCount());
  if (plan.num_splits <= 1) return 0;
  return static_cast<std::size_t>(tier.batch) * p.q_heads * plan.num_splits * (tier.head_dim + 1);
#else
  return 0;
#endif
}

absl::Status TierAttention(const TierBatch& tier, const void* q, const AttnParams& p, float* o,
                           float* lse, float* workspace, void* stream) {
  if (auto s = CheckTier(tier, p); !s.ok()) return s;
#if KVRT_WITH_CUDA
  const int units = TierCtas(tier, p);
  const auto plan = detail::PlanSplits(units, tier.max_tokens, p.split_tokens, detail::SmCount());
  const float scale = ScaleOr(p.scale, tier.head_dim);
  const std::size_t need = plan.num_splits > 1 ? static_cast<std::size_t>(tier.batch) * p.q_heads *
                                                     plan.num_splits * (tier.head_dim + 1)
                                               : 0;
  float* ws = workspace;
  if (need > 0 && ws == nullptr) {
    void* ptr = nullptr;
    if (auto s = ToStatus(detail::AllocAsync(&ptr, need * sizeof(float), stream), "TierAttention");
        !s.ok()) {
      return s;
    }
    ws = static_cast<float*>(ptr);
  }
  auto st = ToStatus(detail::LaunchTierAttention(tier, q, p, scale, plan, o, lse, ws, stream),
                     "TierAttention");
  if (ws != workspace) {
    auto fs = ToStatus(detail::FreeAsync(ws, stream), "TierAttention");
    if (st.ok()) st = fs;
  }
  return st;
#else
  return NoCuda("TierAttention");
#endif
}

std::size_t GatherAttendWorkspaceFloats(const GatherBatch& g, int split_tokens) {
#if KVRT_WITH_CUDA
  const auto plan = detail::PlanSplits(g.rows_q, g.max_rows, split_tokens, detail::SmCount());
  if (plan.num_splits <= 1) return 0;
  return static_cast<std::size_t>(g.rows_q) * plan.num_splits * (g.head_dim + 1);
#else
  return 0;
#endif
}

absl::Status GatherAttend(const GatherBatch& g, const void* q, bool q_is_f32, float scale,
                          int split_tokens, float* o, float* lse, float* workspace, void* stream) {
  if (auto s = CheckGather(g, split_tokens); !s.ok()) return s;
#if KVRT_WITH_CUDA
  const auto plan = detail::PlanSplits(g.rows_q, g.max_rows, split_tokens, detail::SmCount());
  const std::size_t need =
      plan.num_splits > 1 ? static_cast<std::size_t>(g.rows_q) * plan.num_splits * (g.head_dim + 1)
                          : 0;
  float* ws = workspace;
  if (need > 0 && ws == nullptr) {
    void* ptr = nullptr;
    if (auto s = ToStatus(detail::AllocAsync(&ptr, need * sizeof(float), stream), "GatherAttend");
        !s.ok()) {
      return s;
    }
    ws = static_cast<float*>(ptr);
  }
  auto st = ToStatus(detail::LaunchGatherAttend(g, q, q_is_f32, ScaleOr(scale, g.head_dim), plan, o,
                                                lse, ws, stream),
                     "GatherAttend");
  if (ws != workspace) {
    auto fs = ToStatus(detail::FreeAsync(ws, stream), "GatherAttend");
    if (st.ok()) st = fs;
  }
  return st;
#else
  return NoCuda("GatherAttend");
#endif
}

absl::Status MergeStates(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                         int rows, int head_dim, void* out, DType out_dtype, float* lse_out,
                         void* stream) {
  if (rows < 0 || !HeadDimOk(head_dim) || !DTypeOk(out_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MergeStates: rows ", rows, ", head_dim ", head_dim, " (64, 128, 256)"));
  }
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchMergeStates(o_a, lse_a, o_b, lse_b, rows, head_dim, out, out_dtype,
                                            lse_out, stream),
                  "MergeStates");
#else
  return NoCuda("MergeStates");
#endif
}

absl::Status MergeStatesN(const float* o, const float* lse, int n_states, int rows, int head_dim,
                          void* out, DType out_dtype, float* lse_out, void* stream) {
  if (n_states < 1 || rows < 0 || !HeadDimOk(head_dim) || !DTypeOk(out_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("MergeStatesN: states ", n_states, ", rows ",
                                                   rows, ", head_dim ", head_dim,
                                                   " (64, 128, 256)"));
  }
#if KVRT_WITH_CUDA
  return ToStatus(
      detail::LaunchMergeStatesN(o, lse, n_states, rows, head_dim, out, out_dtype, lse_out, stream),
      "MergeStatesN");
#else
  return NoCuda("MergeStatesN");
#endif
}

absl::Status RingAppend(const RingBatch& ring, const void* new_k, const void* new_v, int n_new,
                        void* evict_k, void* evict_v, void* stream) {
  if (auto s = CheckRing(ring, n_new, "RingAppend"); !s.ok()) return s;
  if ((evict_k == nullptr) != (evict_v == nullptr)) {
    return absl::InvalidArgumentError("RingAppend: evict_k and evict_v both or neither");
  }
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchRingAppend(ring, new_k, new_v, n_new, evict_k, evict_v, stream),
                  "RingAppend");
#else
  return NoCuda("RingAppend");
#endif
}

namespace detail {
absl::Status CheckRingToStore(const RingBatch& ring, const void* new_k, const void* new_v,
                              int n_new, const RingStoreTarget& store, const int64_t* write_pos,
                              const char* fn) {
  if (auto s = CheckRing(ring, n_new, fn); !s.ok()) return s;
  if (ring.batch > 0 &&
      (ring.ring_k == nullptr || ring.ring_v == nullptr || write_pos == nullptr ||
       store.store_k == nullptr || store.store_v == nullptr || store.row_base == nullptr ||
       (n_new > 0 && (new_k == nullptr || new_v == nullptr)))) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": null ring, new rows, write_pos or store target"));
  }
  if (store.store_rows < 0) return absl::InvalidArgumentError(absl::StrCat(fn, ": store_rows < 0"));
  return absl::OkStatus();
}
}  // namespace detail

absl::Status RingAppendToStore(const RingBatch& ring, const void* new_k, const void* new_v,
                               int n_new, const RingStoreTarget& store, int64_t* write_pos,
                               int64_t* rows, void* stream) {
  constexpr const char* kFn = "RingAppendToStore";
  if (auto s = detail::CheckRingToStore(ring, new_k, new_v, n_new, store, write_pos, kFn); !s.ok())
    return s;
#if KVRT_WITH_CUDA
  return ToStatus(
      detail::LaunchRingAppendToStore(ring, new_k, new_v, n_new, store, write_pos, rows, stream),
      kFn);
#else
  (void)rows;
  (void)stream;
  return NoCuda(kFn);
#endif
}

namespace {
absl::Status CheckRingRows(const RingRows& r, const void* new_k, const void* new_v, int64_t n,
                           const void* evict_k, const void* evict_v) {
  if (n < 0 || n > r.capacity || r.capacity <= 0 || r.slot0 < 0 || r.slot0 >= r.capacity ||
      r.row_bytes == 0 || r.row_bytes % 16 != 0 || r.row_bytes > (std::size_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RingAppendRows: need 0 <= n <= capacity, 0 <= slot0 < capacity and row_bytes a positive "
        "multiple of 16 (n ", n, ", capacity ", r.capacity, ", slot0 ", r.slot0, ", row_bytes ",
        r.row_bytes, ")"));
  }
  if ((evict_k == nullptr) != (evict_v == nullptr))
    return absl::InvalidArgumentError("RingAppendRows: evict_k and evict_v both or neither");
  if (n > 0 && (r.k == nullptr || r.v == nullptr || new_k == nullptr || new_v == nullptr))
    return absl::InvalidArgumentError("RingAppendRows: null ring or new rows");
  return absl::OkStatus();
}
}  // namespace

absl::Status RingAppendRows(const RingRows& ring, const void* new_k, const void* new_v, int64_t n,
                            void* evict_k, void* evict_v, void* stream) {
  if (auto s = CheckRingRows(ring, new_k, new_v, n, evict_k, evict_v); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchRingAppendRows(ring, new_k, new_v, n, evict_k, evict_v, stream),
                  "RingAppendRows");
#else
  return NoCuda("RingAppendRows");
#endif
}

namespace detail {
absl::Status CheckRingRowsToHeads(const RingRows& r, const void* new_k, const void* new_v,
                                  int64_t n, const HeadRows& to) {
  if (auto s = CheckRingRows(r, new_k, new_v, n, nullptr, nullptr); !s.ok()) return s;
  if (to.heads < 1 || to.heads > HeadRows::kMaxHeads || r.row_bytes % (16 * to.heads) != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("RingAppendRowsToHeads: need 1 <= heads <= ", HeadRows::kMaxHeads,
                     " and row_bytes a multiple of 16 x heads (heads ", to.heads, ", row_bytes ",
                     r.row_bytes, ")"));
  for (int g = 0; n > 0 && g < to.heads; ++g)
    if (to.k[g] == nullptr || to.v[g] == nullptr)
      return absl::InvalidArgumentError(
          absl::StrCat("RingAppendRowsToHeads: no target for kv head ", g));
  return absl::OkStatus();
}
}  // namespace detail

absl::Status RingAppendRowsToHeads(const RingRows& ring, const void* new_k, const void* new_v,
                                   int64_t n, const HeadRows& evict, void* stream) {
  if (auto s = detail::CheckRingRowsToHeads(ring, new_k, new_v, n, evict); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchRingAppendRowsToHeads(ring, new_k, new_v, n, evict, stream),
                  "RingAppendRowsToHeads");
#else
  return NoCuda("RingAppendRowsToHeads");
#endif
}

absl::Status RingGather(const RingBatch& ring, const int64_t* start, int count, void* out_k,
                        void* out_v, void* stream) {
  if (auto s = CheckRing(ring, count, "RingGather"); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchRingGather(ring, start, count, out_k, out_v, stream), "RingGather");
#else
  return NoCuda("RingGather");
#endif
}

absl::Status ScatterRows(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                         const int32_t* dst_rows, int64_t n, std::size_t row_bytes, void* stream) {
  if (n < 0 || row_bytes == 0 || row_bytes % 16 != 0)
    return absl::InvalidArgumentError("ScatterRows: need n >= 0 and row_bytes a multiple of 16");
#if KVRT_WITH_CUDA
  return ToStatus(
      detail::LaunchScatterRows(src_k, src_v, dst_k, dst_v, dst_rows, n, row_bytes, stream),
      "ScatterRows");
#else
  return NoCuda("ScatterRows");
#endif
}

absl::Status ExpandRowRuns(const int32_t* runs, int64_t n_runs, int32_t* ids, void* stream) {
  if (n_runs < 0) return absl::InvalidArgumentError("ExpandRowRuns: n_runs < 0");
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchExpandRowRuns(runs, n_runs, ids, stream), "ExpandRowRuns");
#else
  return NoCuda("ExpandRowRuns");
#endif
}

absl::Status CopySpans(const CopySpan* spans, int n, void* stream) {
  constexpr const char* kFn = "CopySpans";
  if (n < 0 || n > kMaxCopySpans)
    return absl::InvalidArgumentError(
        absl::StrCat(kFn, ": ", n, " spans, at most ", kMaxCopySpans));
  for (int i = 0; i < n; ++i) {
    const CopySpan& s = spans[i];
    if (s.bytes == 0) continue;
    if (s.src == nullptr || s.dst == nullptr)
      return absl::InvalidArgumentError(absl::StrCat(kFn, ": span ", i, " has a null pointer"));
    if (s.bytes % 4 != 0 || reinterpret_cast<std::uintptr_t>(s.src) % 4 != 0 ||
        reinterpret_cast<std::uintptr_t>(s.dst) % 4 != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(kFn, ": span ", i, " is not 4-byte aligned (", s.bytes, " bytes)"));
  }
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchCopySpans(spans, n, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status FillF32(float* out, float value, int64_t n, void* stream) {
  if (n < 0) return absl::InvalidArgumentError("FillF32: n < 0");
  if (n > 0 && out == nullptr) return absl::InvalidArgumentError("FillF32: null pointer");
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchFillF32(out, value, n, stream), "FillF32");
#else
  return NoCuda("FillF32");
#endif
}

absl::Status ConvertRowsToF32(const void* in, DType t, int64_t n, float* out, void* stream) {
  if (n < 0) return absl::InvalidArgumentError("ConvertRowsToF32: n < 0");
  if (n > 0 && (in == nullptr || out == nullptr))
    return absl::InvalidArgumentError("ConvertRowsToF32: null pointer");
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchConvertToF32(in, t, n, out, stream), "ConvertRowsToF32");
#else
  return NoCuda("ConvertRowsToF32");
#endif
}

absl::Status ExactTopK(const TopKProblem& pr, int32_t* ids, float* scores, void* stream) {
  if (auto s = CheckTopK(pr); !s.ok()) return s;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchExactTopK(pr, ids, scores, stream), "ExactTopK");
#else
  return NoCuda("ExactTopK");
#endif
}

}  // namespace kvrt::gpu
