// DeviceTier's cluster selection on the device (device_tier_internal.h): the summary's upload,
// a member's or a batch's selection kernels, the direct step's attention and the hot cache's.
#include <cmath>

#include "device_tier_internal.h"
#include "kvrt_common/timeline.h"

namespace kvrt::runtime::device_tier_internal {
namespace {

// Whether every decoded residual of `values` (offset + step x code, codes up to 2^bits - 1) is
// well inside f16's range (gpu::CodeValueRest decodes them in f16).
bool ValueGridFitsF16(const cpu_index::SegmentCodes& values, int bits) {
  const float top = static_cast<float>((1 << bits) - 1);
  for (std::size_t i = 0; i < values.offset.size(); ++i)
    if (!(std::fabs(values.offset[i]) + top * std::fabs(values.step[i]) < 6e4f)) return false;
  return true;
}

}  // namespace

// Packs every kv head's summary in ClusterSummaryView's layout and uploads it when the cold tier's
// index changed since the last upload. Its bytes count against gpu_memory_limit.
absl::Status DeviceTier::SyncSummary(const ColdTier& cold, void* stream) {
  if (summary_version_ == cold.index_version() && !summary_.empty()) return absl::OkStatus();
  // The last step's admission job may not have launched its penalty kernel yet, which reads the
  // summary's sizes: it finishes before they are rewritten or freed (once per index version).
  direct_.BeforeSummaryChanges();
  const int G = cfg_->num_kv_heads, d = cfg_->head_dim;
  int64_t C = 0, O = 0, clustered = 0;
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary* s = cold.summary(g);
    if (s == nullptr) return absl::FailedPreconditionError("no cluster summary yet");
    C = std::max<int64_t>(C, s->num_clusters());
    O = std::max<int64_t>(O, static_cast<int64_t>(s->outliers.size()));
    int64_t rows = 0;
    for (int32_t n : s->size) rows += n;
    clustered = std::max(clustered, rows);
  }
  if (C == 0) return absl::FailedPreconditionError("no cluster summary yet");
  // Selection on codes: every kv head's codes over its covered rows (the same rows for every
  // head: their stores grow together) and its segments' grids.
  const int bits = cfg_->index.cluster.rescore_bits;
  const int64_t rb =
      cpu_index::SelectsOnCodes(cfg_->index.cluster) ? cpu_index::CodeRowBytes(d, bits) : 0;
  // And the value codes, the rest's estimate (LaunchValueRest), laid out as the key codes. The
  // kernel decodes residuals (offset + step x code) in f16: a summary whose grids reach past
  // f16's range (values of magnitude ~1e4 and more) estimates from the value means instead, as
  // docs/gpu.md says.
  int value_bits = rb > 0 ? cfg_->index.cluster.value_bits : 0;
  for (int g = 0; g < G && value_bits > 0; ++g) {
    const cpu_index::SegmentCodes* values = cold.value_codes(g);
    if (values == nullptr) return absl::FailedPreconditionError("no cluster value codes yet");
    if (!ValueGridFitsF16(*values, value_bits)) value_bits = 0;
  }
  const bool value_fallback = value_bits == 0 && rb > 0 && cfg_->index.cluster.value_bits > 0;
  const int64_t vrb = value_bits > 0 ? cpu_index::CodeRowBytes(d, value_bits) : 0;
  int64_t code_rows = 0, segments = 0;
  for (int g = 0; g < G && rb > 0; ++g) {
    const cpu_index::SegmentCodes* codes = cold.codes(g);
    if (codes == nullptr) return absl::FailedPreconditionError("no cluster codes yet");
    code_rows = std::max<int64_t>(code_rows, static_cast<int64_t>(codes->code.size()) / rb);
    segments = std::max<int64_t>(segments, static_cast<int64_t>(codes->offset.size()) / d);
    if (vrb == 0) continue;
    const cpu_index::SegmentCodes* values = cold.value_codes(g);
    if (values->code.size() / vrb != codes->code.size() / rb ||
        values->offset.size() != codes->offset.size())
      return absl::InternalError(absl::StrCat("kv head ", g, ": ", values->code.size() / vrb,
                                              " value-coded rows against ", codes->code.size() / rb,
                                              " key-coded rows"));
  }
  auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
  const std::size_t kd = static_cast<std::size_t>(G) * d * sizeof(uint16_t);
  const std::size_t centroid_at = 0, value_at = align(C * kd), size_at = value_at + align(C * kd);
  const std::size_t spread_at = size_at + align(G * C * sizeof(int32_t));
  const std::size_t outlier_at = spread_at + align(G * C * sizeof(float));
  const std::size_t code_at = outlier_at + align(std::max<int64_t>(O, 1) * kd);
  const std::size_t gd = static_cast<std::size_t>(G) * segments * d * sizeof(float);
  const std::size_t offset_at = code_at + align(G * code_rows * rb);
  const std::size_t step_at = offset_at + align(gd), begin_at = step_at + align(gd);
  const std::size_t vcode_at = begin_at + align(G * C * sizeof(int64_t));
  const std::size_t voffset_at = vcode_at + align(G * code_rows * vrb);
  const std::size_t vstep_at = voffset_at + align(gd);
  const std::size_t bytes = rb == 0 ? code_at : vrb == 0 ? vcode_at : vstep_at + align(gd);
  summary_host_.assign(bytes, 0);
  auto* h = summary_host_.data();
  std::vector<float> row(d);
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    const std::size_t c = static_cast<std::size_t>(s.num_clusters());
    const std::size_t head_rows = static_cast<std::size_t>(g) * C;
    std::memcpy(h + centroid_at + head_rows * d * 2, s.centroid.data(), c * d * 2);
    std::memcpy(h + value_at + head_rows * d * 2, s.value_mean.data(), c * d * 2);
    std::memcpy(h + size_at + head_rows * 4, s.size.data(), c * 4);  // padding: size 0
    std::memcpy(h + spread_at + head_rows * 4, s.spread.data(), c * 4);
    const auto& store = cold.store(g);
    for (std::size_t j = 0; j < s.outliers.size(); ++j) {
      store.KeyF32(s.outliers[j], row.data());
      ConvertFromF32(row.data(), d, DType::kBF16,
                     h + outlier_at + (static_cast<std::size_t>(g) * O + j) * d * 2);
    }
    if (rb == 0) continue;
    const cpu_index::SegmentCodes& codes = *cold.codes(g);
    const std::size_t head_code_rows = static_cast<std::size_t>(g) * code_rows;
    std::memcpy(h + code_at + head_code_rows * rb, codes.code.data(), codes.code.size());
    auto* begin = reinterpret_cast<int64_t*>(h + begin_at) + head_rows;
    std::copy(s.begin.begin(), s.begin.end(), begin);  // padding: size 0 from row 0
    const std::size_t grid = static_cast<std::size_t>(g) * segments * d * sizeof(float);
    std::memcpy(h + offset_at + grid, codes.offset.data(), codes.offset.size() * sizeof(float));
    std::memcpy(h + step_at + grid, codes.step.data(), codes.step.size() * sizeof(float));
    if (vrb == 0) continue;
    const cpu_index::SegmentCodes& values = *cold.value_codes(g);
    std::memcpy(h + vcode_at + head_code_rows * vrb, values.code.data(), values.code.size());
    std::memcpy(h + voffset_at + grid, values.offset.data(), values.offset.size() * sizeof(float));
    std::memcpy(h + vstep_at + grid, values.step.data(), values.step.size() * sizeof(float));
  }
  if (summary_.size() < bytes) {
    const int64_t add = static_cast<int64_t>(bytes) - static_cast<int64_t>(summary_.size());
    const int64_t limit = cfg_->gpu_memory_limit;
    if (limit > 0 && counters_->gpu_allocated_bytes.load() + add > limit)
      return absl::ResourceExhaustedError(absl::StrCat(
          "GPU memory limit: the cluster summary needs ", bytes, " bytes, ",
          counters_->gpu_allocated_bytes.load(), " in use > gpu_memory_limit ", limit));
    KVRT_ASSIGN_OR_RETURN(transfer::DeviceBuffer grown,
                          transfer::DeviceBuffer::Allocate(bytes + bytes / 4));
    counters_->gpu_allocated_bytes += static_cast<int64_t>(grown.size() - summary_.size());
    counters_->summary_gpu_bytes += static_cast<int64_t>(grown.size() - summary_.size());
    summary_ = std::move(grown);
  }
  // NOTE: pageable source: the copy has read summary_host_ when MemcpyAsync returns.
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(summary_.data(), h, bytes, stream));
  auto* dev = static_cast<unsigned char*>(summary_.data());
  summary_view_.kv_heads = G;
  summary_view_.head_dim = d;
  summary_view_.num_clusters = static_cast<int>(C);
  summary_view_.num_outliers = static_cast<int>(O);
  summary_view_.centroid = reinterpret_cast<const uint16_t*>(dev + centroid_at);
  summary_view_.value_mean = reinterpret_cast<const uint16_t*>(dev + value_at);
  summary_view_.size = reinterpret_cast<const int32_t*>(dev + size_at);
  summary_view_.spread = reinterpret_cast<const float*>(dev + spread_at);
  summary_view_.outlier_key = reinterpret_cast<const uint16_t*>(dev + outlier_at);
  code_view_ = gpu::CodeScanView{};
  code_begin_ = nullptr;
  value_view_ = gpu::CodeValueView{};
  if (rb > 0 && code_rows > 0) {
    code_view_.kv_heads = G;
    code_view_.head_dim = d;
    code_view_.bits = bits;
    code_view_.rows = code_rows;
    code_view_.segment_rows = cfg_->index.cluster.segment_tokens;
    code_view_.num_clusters = static_cast<int>(C);
    code_view_.code = dev + code_at;
    code_view_.centroid = summary_view_.centroid;
    code_view_.offset = reinterpret_cast<const float*>(dev + offset_at);
    code_view_.step = reinterpret_cast<const float*>(dev + step_at);
    code_begin_ = reinterpret_cast<const int64_t*>(dev + begin_at);
    if (vrb > 0) {
      value_view_.bits = value_bits;
      value_view_.code = dev + vcode_at;
      value_view_.value_mean = summary_view_.value_mean;
      value_view_.offset = reinterpret_cast<const float*>(dev + voffset_at);
      value_view_.step = reinterpret_cast<const float*>(dev + vstep_at);
    }
  }
  summary_version_ = cold.index_version();
  if (value_fallback) counters_->value_codes_fallbacks += 1;
  summary_clustered_ = clustered;
  return absl::OkStatus();
}

absl::Status DeviceTier::PrepareSelect(DeviceStep* step, int i, const ColdTier& cold, void* stream,
                                       DeviceStep::Selection* s) {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  if (step->q_f32 == nullptr)
    return absl::FailedPreconditionError(
        "select clusters: the step converted no q (not announced as selecting on the device)");
  // No summary yet: FailedPrecondition (the CPU selects).
  KVRT_RETURN_IF_ERROR(SyncSummary(cold, stream));
  const int64_t C = summary_view_.num_clusters, O = summary_view_.num_outliers;
  const cpu_index::ClusterConfig& cc = cfg_->index.cluster;
  // The same budget as the index's own Search: max(k, fraction of the clustered rows, floor);
  // the clustered rows are counted once per index version (SyncSummary), not per step.
  const int64_t clustered = summary_clustered_;
  gpu::ClusterStepParams& params = s->params;
  params = gpu::ClusterStepParams{};
  params.q_heads = H;
  params.scale = cfg_->scale;
  params.spread_weight = cc.spread_weight;
  params.budget_tokens = std::max<int64_t>(
      {cfg_->top_k,
       static_cast<int64_t>(std::ceil(static_cast<double>(cc.budget_fraction) * clustered)),
       cc.min_budget_tokens});
  params.top_p = cc.top_p;
  params.estimate = cc.estimate;
  params.group_select = cc.group_select;

  // Scratch (SelectScratch): the step's share for this member (BeginStep), or one allocation of
  // its own when its summary outgrew it (freed by SelectClusters on the member's stream). NOTE:
  // one allocation: the kernel's own workspace allocation sat between its launches, on the
  // step's device chain.
  const SelectScratch at(summary_view_, H, code_view_.rows > 0, value_view_.code != nullptr);
  unsigned char* dev = step->select_scratch.empty() ? nullptr : step->select_scratch[i];
  s->own = nullptr;
  if (dev == nullptr || at.bytes > step->select_bytes[i]) {
    KVRT_ASSIGN_OR_RETURN(s->own, transfer::MallocAsync(at.bytes, stream));
    dev = static_cast<unsigned char*>(s->own);
  }
  s->direct_q = direct_.Prepare(cold, stream);
  // q in f32 on the device: converted for every member at BeginStep, which a step whose cold
  // tier runs on the device never copies to the host.
  s->q = step->q_f32 + static_cast<std::size_t>(i) * H * d;
  // Residency-aware selection: a cluster's group key loses miss_penalty x its share of rows that
  // the attend would read over PCIe, as the direct step's last admission job computed it after
  // its fill (the stream waits for that fill, long done in a decoder's pipeline).
  if (s->direct_q && cc.miss_penalty > 0.f && cc.group_select && group > 1 && C > 0)
    params.key_offset = direct_.PenaltyOffsets(cold, static_cast<int>(C), stream);
  gpu::ClusterStepOutputs& outs = s->outs;
  outs = gpu::ClusterStepOutputs{};
  outs.density = reinterpret_cast<float*>(dev + at.density_at);
  outs.group_key = reinterpret_cast<float*>(dev + at.key_at);
  outs.outlier_score = O > 0 ? reinterpret_cast<float*>(dev + at.outlier_at) : nullptr;
  outs.selected = reinterpret_cast<int32_t*>(dev + at.selected_at);
  outs.selected_count = reinterpret_cast<int32_t*>(dev + at.count_at);
  outs.selected_tokens = reinterpret_cast<int64_t*>(dev + at.tokens_at);
  outs.est_o = step->o(kEstimateSlot, i);
  outs.est_lse = step->lse(kEstimateSlot, i);
  // Group selection with a direct step: the select kernel writes the step's mask itself (no
  // clear and no MarkSelected on the chain).
  if (s->direct_q && cc.group_select && group > 1 && C > 0)
    outs.group_mask = direct_.SelectionMask(static_cast<int>(C), stream);
  s->workspace = reinterpret_cast<float*>(dev + at.ws_at);
  if (code_view_.rows > 0) {
    // Selection on codes: each cluster's mass from its rows' codes (the index's one-stage code
    // selection, ClusterConfig::rescore_bits), before the step's kernels.
    auto* lse = reinterpret_cast<float*>(dev + at.lse_at);
    KVRT_RETURN_IF_ERROR(gpu::CodeClusterMass(code_view_, s->q, H, code_begin_, summary_view_.size,
                                              cfg_->scale, lse, stream));
    params.cluster_lse = lse;
    params.top_p = 0.f;  // as the index's code selection
  }
  // The rest from value codes replaces the value means' estimate (LaunchValueRest).
  s->value_rest = params.estimate && code_view_.rows > 0 && value_view_.code != nullptr;
  s->attended = s->value_rest ? dev + at.attended_at : nullptr;
  s->rest_workspace = s->value_rest ? reinterpret_cast<float*>(dev + at.rest_ws_at) : nullptr;
  if (s->value_rest) params.estimate = false;
  s->prepared = true;
  return absl::OkStatus();
}

absl::Status DeviceTier::LaunchValueRest(const DeviceStep::Selection& s, void* stream) const {
  if (!s.value_rest) return absl::OkStatus();
  const int H = cfg_->num_q_heads, C = summary_view_.num_clusters;
  KVRT_RETURN_IF_ERROR(
      gpu::AttendedFromSelection(s.outs.selected, s.outs.selected_count, H, C, s.attended, stream));
  return gpu::CodeValueRest(code_view_, value_view_, s.q, H, code_begin_, summary_view_.size,
                            s.attended, s.params.cluster_lse, cfg_->scale, s.rest_workspace,
                            s.outs.est_o, s.outs.est_lse, stream);
}

absl::Status DeviceTier::PrepareBatchSelect(TierStep* base, int i, const ColdTier& cold) {
  auto* step = static_cast<DeviceStep*>(base);
  if (step->size() < 2) return absl::UnimplementedError("batch selection: one member");
  KVRT_SPAN("select_prepare", i);
  if (step->selections.empty()) step->selections.resize(step->size());
  return PrepareSelect(step, i, cold, step->lease.get(), &step->selections[i]);
}

// The prepared members' selections in one launch per kernel on the step's stream (members that
// need another score kernel than the first one's launch one by one), then the lanes' fork moved
// after them.
absl::Status DeviceTier::LaunchBatchSelect(TierStep* base) {
  auto* step = static_cast<DeviceStep*>(base);
  void* stream = step->lease.get();
  KVRT_SPAN("select_batch_launch", step->size());
  std::vector<gpu::ClusterStepItem> items;
  std::vector<int> who;
  for (int i = 0; i < static_cast<int>(step->selections.size()); ++i) {
    const DeviceStep::Selection& s = step->selections[i];
    if (!s.prepared) continue;
    gpu::ClusterStepItem it;
    it.summary = step->tiers[i]->summary_view_;
    it.q = s.q;
    it.budget_tokens = s.params.budget_tokens;
    it.key_offset = s.params.key_offset;
    it.cluster_lse = s.params.cluster_lse;
    it.out = s.outs;
    it.workspace = s.workspace;
    items.push_back(it);
    who.push_back(i);
  }
  if (items.empty()) return absl::OkStatus();
  const gpu::ClusterStepParams& shared = step->selections[who[0]].params;
  // The batch's kernels take one estimate switch: members whose estimate differs (the rest from
  // value codes for some, from value means for others while a summary has no codes yet) launch
  // one by one.
  const bool one_estimate = std::all_of(who.begin(), who.end(), [&](int i) {
    return step->selections[i].params.estimate == shared.estimate;
  });
  absl::Status st;
  bool one_by_one = !one_estimate;
  if (one_estimate) {
    st = gpu::ClusterStepBatch(items.data(), static_cast<int>(items.size()), shared, stream);
    one_by_one = st.code() == absl::StatusCode::kInvalidArgument;
  }
  if (one_by_one) {
    // Members the batch's kernels cannot take together: one launch each, as SelectClusters would.
    st = absl::OkStatus();
    for (std::size_t k = 0; k < items.size() && st.ok(); ++k)
      st = gpu::ClusterStep(items[k].summary, items[k].q, step->selections[who[k]].params,
                            items[k].out, items[k].workspace, stream);
  }
  KVRT_RETURN_IF_ERROR(st);
  for (int i : who)
    KVRT_RETURN_IF_ERROR(step->tiers[i]->LaunchValueRest(step->selections[i], stream));
  for (int i : who) step->selections[i].launched = true;
  // The lanes start after the selections (their fork, recorded at BeginStep, recorded again: no
  // lane has waited on it yet).
  if (step->forked != nullptr) KVRT_RETURN_IF_ERROR(batch_forked_.Record(stream));
  return absl::OkStatus();
}

absl::Status DeviceTier::SelectClusters(TierStep* base, int i, const ColdTier& cold,
                                        ColdSelection* sel, tbb::task_arena& arena,
                                        absl::FunctionRef<absl::Status(bool)> settle_evictions) {
  auto* step = static_cast<DeviceStep*>(base);
  KVRT_SPAN("select_clusters", i);
  int64_t t0 = NowNs();  // the search's time: the eviction wait below is not part of it
  void* stream = step->MemberStream(i);
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  timeline::Span launch_span("select_launch", i);
  DeviceStep::Selection own_selection;
  const bool batched =
      i < static_cast<int>(step->selections.size()) && step->selections[i].launched;
  DeviceStep::Selection& selection = batched ? step->selections[i] : own_selection;
  if (!batched) {
    if (absl::Status st = PrepareSelect(step, i, cold, stream, &selection); !st.ok()) {
      // No selection on the device (no summary yet: the CPU selects): the tier's attention now,
      // beside the CPU's work, rather than at the merge.
      if (selection.own != nullptr) (void)transfer::FreeAsync(selection.own, stream);
      KVRT_RETURN_IF_ERROR(LaunchTier(step, false));
      return st;
    }
  }
  struct FreeOnExit {
    void* p;
    void* s;
    ~FreeOnExit() {
      if (p != nullptr) (void)transfer::FreeAsync(p, s);
    }
  } free_scratch{std::exchange(selection.own, nullptr), stream};
  const int64_t C = summary_view_.num_clusters;
  const gpu::ClusterStepParams& params = selection.params;
  const gpu::ClusterStepOutputs& outs = selection.outs;
  const float* q = selection.q;
  const bool direct_q = selection.direct_q;
  if (!batched) {
    // The tier's attention (one sequence) forks after the scoring kernel (LaunchTier).
    gpu::ClusterStepParams p = params;
    if (step->tier_pending) p.scored_event = tier_fork_.get();
    KVRT_RETURN_IF_ERROR(gpu::ClusterStep(summary_view_, q, p, outs, selection.workspace, stream));
    if (step->tier_pending) KVRT_RETURN_IF_ERROR(LaunchTier(step, /*forked=*/true));
    KVRT_RETURN_IF_ERROR(LaunchValueRest(selection, stream));
  }
  // The decode evictions enter the cold tier only now: the selection's kernels (they read the
  // summary, not the rows) are queued before the host waits for the evictions' copies, which in a
  // pipelined decoder wait for the device's work on the layers before. Everything below sees the
  // settled rows (the direct step's registration and view are checked again for them).
  // NOTE: a direct step does not wait at all (the host, blocked here, could not run ahead of the
  // device): rows whose copy is in flight (one batch, a decode append's) are attended on the
  // device and enter the cold tier at the layer's next call: from the pinned block
  // (AttendPendingEvictions), or, written into the stores in place (AppendEvictFused), as rows of
  // the store that the direct step's row count covers. Measurement mode keeps the wait: it
  // records the positions of the rows attended.
  launch_span.End();
  const int64_t t_settle = NowNs();
  bool defer = direct_q && !cfg_->record_attended;
  if (defer) {
    KVRT_RETURN_IF_ERROR(settle_evictions(/*wait=*/false));
    defer = evictions_.size() == 1 && !evictions_.front().done.empty() &&
            (evictions_.front().k.empty() || evictions_.pending_rows() <= kPendingAttendRows);
  }
  if (!defer) KVRT_RETURN_IF_ERROR(settle_evictions(/*wait=*/true));
  bool direct = direct_q && direct_.Prepare(cold, stream);
  // The rows written in place count as the store's from here (the attention's row count); the
  // registration covers them (InPlaceTarget), unless the stores moved since (then they settle).
  const int64_t in_place =
      direct && defer && evictions_.front().k.empty() ? evictions_.pending_rows() : 0;
  if (in_place > 0 && !direct_.RegisteredUpTo(cold, cold.rows() + in_place)) direct = false;
  if (!direct && defer) {
    KVRT_RETURN_IF_ERROR(settle_evictions(true));
    defer = false;
  }
  t0 += NowNs() - t_settle;
  // The direct step's page table follows the last admission. Its stream wait comes after the
  // selection, which reads neither pool nor table: the last step's page fill (PCIe) overlaps
  // the selection's kernels instead of delaying them.
  if (direct) {
    KVRT_SPAN("direct_begin", i);
    // The lane forked after the batch's selections, whose PrepareSelect ordered the step's
    // stream after the last fill (PenaltyOffsets).
    if (batched) direct_.StreamFollows(step->lease.get(), stream);
    KVRT_RETURN_IF_ERROR(direct_.BeginStep(cold, static_cast<int>(C), summary_view_.size, stream));
  }
  const bool estimated = params.estimate || selection.value_rest;
  step->estimated[i] = estimated ? 1 : 0;
  sel->estimate_on_device = estimated;
  if (cfg_->record_attended && estimated) {
    // Measurement mode (it waits for the device anyway): the estimate's lse for replay metrics.
    sel->device_estimate_lse.resize(H);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sel->device_estimate_lse.data(), outs.est_lse,
                                               static_cast<std::size_t>(H) * sizeof(float),
                                               stream));
    KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
  }
  if (direct) {
    KVRT_SPAN("direct_attend", i);
    // One sequence: the attention's split states stay in the step's slots for its one merge.
    int splits = 0;
    if (in_place > 0) KVRT_RETURN_IF_ERROR(FollowPendingEviction(step, stream));
    KVRT_RETURN_IF_ERROR(direct_.Attend(
        cold, cold.rows() + in_place, outs.selected, outs.selected_count,
        outs.group_mask != nullptr, step->size() > 1, q, step->o(kHotSlot, i),
        step->lse(kHotSlot, i), step->slot_count - kHotSlot, &splits, stream, arena, sel));
    step->hot[i] = 1;
    step->hot_states = splits;
    if (defer && in_place == 0) {
      KVRT_SPAN("pending_attend", i);
      KVRT_RETURN_IF_ERROR(AttendPendingEvictions(step, i, q, stream));
    }
    sel->evictions_on_device = defer;
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) sel->search_ns[h] = per_head_ns;
    counters_->attends_gpu_select += 1;
    return absl::OkStatus();
  }
  // The selection comes back (counts, then the selected clusters): the CPU maps it to rows.
  // NOTE: selected [H, C] and count [H] are adjacent in the scratch (SelectScratch).
  const auto* first = reinterpret_cast<const unsigned char*>(outs.selected);
  const std::size_t back =
      reinterpret_cast<const unsigned char*>(outs.selected_count) + H * 4 - first;
  KVRT_ASSIGN_OR_RETURN(transfer::PinnedBlock host, ctx_->pinned().Acquire(back));
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(host.data(), first, back, stream));
  KVRT_ASSIGN_OR_RETURN(transfer::Event copied, transfer::Event::Create(false));
  KVRT_RETURN_IF_ERROR(copied.Record(stream));
  KVRT_RETURN_IF_ERROR(copied.Synchronize());
  const auto* selected = static_cast<const int32_t*>(host.data());
  const int32_t* count = selected + static_cast<std::size_t>(H) * C;
  if (hot_.Fit(cold.rows(), stream)) {
    KVRT_RETURN_IF_ERROR(AttendHot(step, i, cold, selected, count, C, stream, sel, arena));
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) sel->search_ns[h] = per_head_ns;
  } else {
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) {
      if (!sel->active[h]) continue;
      const cpu_index::ClusterSummary& s = *cold.summary(h / group);
      std::vector<int64_t> rows(s.outliers.begin(), s.outliers.end());  // always attended
      for (int32_t j = 0; j < count[h]; ++j) {
        const int32_t c = selected[static_cast<std::size_t>(h) * C + j];
        if (c >= s.num_clusters()) continue;  // padding (never selected: size 0)
        for (int64_t r = s.begin[c]; r < s.begin[c] + s.size[c]; ++r) rows.push_back(r);
      }
      const int64_t t1 = NowNs();
      cold.CompleteSelection(h, step->q(i) + static_cast<std::size_t>(h) * d, std::move(rows),
                             s.num_clusters() + static_cast<int64_t>(s.outliers.size()), sel);
      sel->search_ns[h] = per_head_ns + NowNs() - t1;
    }
  }
  counters_->attends_gpu_select += 1;
  return absl::OkStatus();
}

// The selected clusters, the outliers and the rows not clustered yet, attended on the device from
// the hot cache into member i's hot slot; what does not fit stays in sel->rows for the CPU.
absl::Status DeviceTier::AttendHot(DeviceStep* step, int i, const ColdTier& cold,
                                   const int32_t* selected, const int32_t* count, int64_t C,
                                   void* stream, ColdSelection* sel, tbb::task_arena& arena) {
  const int H = cfg_->num_q_heads, G = cfg_->num_kv_heads, group = H / G;
  // Unclustered rows go up in chunks of this many (stable until the index covers them).
  constexpr int32_t kChunkRows = 4 * DeviceHotCache::kPageRows;
  hot_.SyncVersion(cold.index_version());
  // Per kv head, the groups all its q heads attend: runs of consecutive outlier rows, then the
  // unclustered rows in chunks.
  std::vector<std::vector<HotCacheMap::Group>> common(G);
  std::vector<int64_t> scanned(G);
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    const auto& out = s.outliers;
    for (std::size_t a = 0; a < out.size();) {
      std::size_t b = a + 1;
      while (b < out.size() && out[b] == out[b - 1] + 1 && b - a < kChunkRows) ++b;
      common[g].push_back({g, out[a], static_cast<int32_t>(b - a), true});
      a = b;
    }
    const int64_t covered = cold.covered_rows(g), rows = cold.rows();
    for (int64_t r = covered; r < rows; r += kChunkRows)
      common[g].push_back(
          {g, r, static_cast<int32_t>(std::min<int64_t>(kChunkRows, rows - r)), false});
    scanned[g] = s.num_clusters() + static_cast<int64_t>(out.size()) + rows - covered;
  }
  std::vector<std::vector<HotCacheMap::Group>> groups(H);
  for (int h = 0; h < H; ++h) {
    if (!sel->active[h]) continue;
    const int g = h / group;
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    for (int32_t j = 0; j < count[h]; ++j) {
      const int32_t c = selected[static_cast<std::size_t>(h) * C + j];
      if (c >= s.num_clusters()) continue;  // padding (never selected: size 0)
      groups[h].push_back({g, s.begin[c], s.size[c], true});
    }
    groups[h].insert(groups[h].end(), common[g].begin(), common[g].end());
  }
  const void* q_dev = static_cast<const unsigned char*>(step->q_dev) +
                      static_cast<std::size_t>(i) * H * cfg_->head_dim * DTypeSize(cfg_->dtype);
  HotCacheStep hs;
  KVRT_RETURN_IF_ERROR(hot_.Attend(groups, cold, q_dev, cfg_->dtype == DType::kF32,
                                   step->o(kHotSlot, i), step->lse(kHotSlot, i), stream, arena,
                                   cfg_->record_attended, &hs));
  step->hot[i] = hs.on_device ? 1 : 0;
  for (int h = 0; h < H; ++h)
    if (sel->active[h]) cold.SetSelection(h, std::move(hs.cpu_rows[h]), scanned[h / group], sel);
  sel->cached = std::move(hs.attended);
  sel->cached_rows = std::move(hs.rows);
  return absl::OkStatus();
}

}  // namespace kvrt::runtime::device_tier_internal
