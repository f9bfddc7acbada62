// LayerState's storage verbs: prefill, append, release. The decode step is decode_step.cc.
#include "layer_state.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "budget.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/kind_table.h"

namespace kvrt::runtime {

LayerState::LayerState(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* gpu)
    : cfg_(config),
      counters_(counters),
      tier_(gpu != nullptr ? MakeDeviceTier(config, counters, gpu) : MakeHostTier(config)),
      cold_(config, counters, config->sink_tokens) {
  // The backend may read the stores in place (the direct step): it must see them move first.
  cold_.SetStoreGuard([tier = tier_.get()](bool moves) { tier->BeforeStoreChanges(moves); });
}

LayerState::~LayerState() = default;

void LayerState::Release() {
  cold_.AwaitIndexes();  // background work ends before the counters go
  counters_->host_tokens -= tier_->pending_rows();
  tier_->Release();
  cold_.Release();
  counters_->gpu_tokens -= gpu_tokens();
  counters_->gpu_allocated_bytes -= static_cast<int64_t>(tier_->allocated_bytes());
}

AppendPlan LayerState::PlanAppend(int64_t n) const {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb =
      static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
  AppendPlan p;
  p.length = length_;
  p.new_length = length_ + n;
  p.cold_begin = S + cold_tokens();  // first position not yet cold
  p.cold_end = std::max(p.cold_begin, std::max(S, p.new_length - W));  // below: cold afterwards
  p.evict = std::max<int64_t>(0, std::min(p.length, p.cold_end) - p.cold_begin);
  p.direct_begin = std::max(p.length, p.cold_begin);
  p.direct = std::max<int64_t>(0, p.cold_end - p.direct_begin);
  p.sink_end = std::min(p.new_length, S);
  p.ring_begin = std::max({p.length, S, p.cold_end});
  p.need_sinks = !tier_->has_sinks() && S > 0;
  p.ring_grow = tier_->RingGrowth(p.new_length);
  p.gpu_bytes =
      cfg_->rows_per_token() * static_cast<int64_t>(tb) * ((p.need_sinks ? S : 0) + p.ring_grow);
  return p;
}

absl::Status LayerState::SettleCold() {
  KVRT_RETURN_IF_ERROR(SettleBeforeSelect());
  return SettleEvictions();
}

absl::Status LayerState::SettleBeforeSelect(int64_t* index_wait_ns) {
  const int64_t waited = cold_.AwaitIndexes();
  if (index_wait_ns != nullptr) *index_wait_ns = waited;
  return tier_->SettlePrompt(&cold_);  // only if the prefill's job failed
}

absl::Status LayerState::SettleEvictions() { return tier_->SettleEvictions(&cold_); }

absl::Status LayerState::AppendTokens(const void* k, const void* v, int64_t n, const Exec& exec) {
  // The plan reads the cold tier's rows: a prefill's background job must be done with them.
  if (tier_->pending_prompt_rows() > 0 || prompt_build_) KVRT_RETURN_IF_ERROR(SettleCold());
  prompt_build_ = false;
  const AppendPlan plan = PlanAppend(n);
  // Only a call that writes the store waits for the background refresh (the GPU backend's decode
  // append, which only evicts, does not: its rows reach the store at the next attend). The host
  // backend, whose evictions write the store at once, has no background work but a prompt's
  // build, which the prompt_build_ wait above covers.
  const bool writes_store = plan.direct > 0 || tier_->pending_rows() > 0;
  if (writes_store) KVRT_RETURN_IF_ERROR(SettleCold());
  // Settled: no background refresh is running (waited for above, or a backend without one).
  const bool settled = writes_store || !tier_->background_refresh();
  const std::size_t tb =
      static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
  // The cold index's growth counts against host_memory_limit before it happens (an upper bound,
  // trued up by the refresh), so a call past the limit fails here having changed nothing. With a
  // background refresh running, its growth is counted when it completes (kvrt.h).
  const int64_t index_add = settled && plan.new_cold() > 0
                                ? IndexGrowthBound(*cfg_, cold_tokens() + plan.new_cold(),
                                                   kIndexMinRows, cold_.index_bytes())
                                : 0;
  BudgetReservation budget;
  KVRT_RETURN_IF_ERROR(
      budget.Reserve(*cfg_, counters_, plan.gpu_bytes, plan.new_cold(), tb, index_add));
  KVRT_RETURN_IF_ERROR(tier_->Append(plan, k, v, exec, &cold_));
  budget.Commit();  // the reservation counted the tier's new buffers, cold rows and index growth
  cold_.AccountIndexGrowth(index_add);
  const int64_t gpu_before = gpu_tokens();
  length_ = plan.new_length;
  n_sink_ = std::min<int64_t>(length_, cfg_->sink_tokens);
  n_window_ = length_ - n_sink_ - cold_tokens();
  counters_->gpu_tokens += gpu_tokens() - gpu_before;
  // Evicted = left the GPU tier after having been on it (not prompt tokens sent straight to host).
  counters_->evicted_tokens += plan.evict;
  return absl::OkStatus();
}

absl::Status LayerState::Prefill(const void* q, int64_t n_queries, const void* k, const void* v,
                                 int64_t n, tbb::task_arena& arena, const Exec& exec) {
  if (length_ != 0)
    return absl::FailedPreconditionError(absl::StrCat("prefill: the layer already holds ", length_,
                                                      " tokens (prefill once, then append)"));
  // Device pointers: the device backend may stage the prompt's cold rows (a slot of the runtime's
  // few; this waits while they are all taken) and finish them in a background job.
  struct Slot {
    TierBackend* tier = nullptr;
    ~Slot() {
      if (tier != nullptr) tier->ReleasePromptSlot();
    }
  };
  auto slot = std::make_shared<Slot>();
  if (exec.device) {
    tier_->AcquirePromptSlot();
    slot->tier = tier_.get();
  }
  absl::Status appended;
  {
    KVRT_SPAN("prefill_append");
    arena.execute([&] { appended = AppendTokens(k, v, n, exec); });  // its parallel copies: there
  }
  KVRT_RETURN_IF_ERROR(appended);
  if (q != nullptr && cpu_index::KindInfo(cfg_->index_kind).uses_queries) {
    KVRT_SPAN("prefill_sample_queries");
    // Only the sampled rows cross to the host: the evenly spaced rows SampleQueries picks.
    const QuerySample sample = PromptQuerySample(*cfg_, n_queries);
    const int64_t rows = sample.count;
    const std::size_t row =
        static_cast<std::size_t>(cfg_->num_q_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
    if (rows == n_queries && !exec.device) {
      cold_.SampleQueries(q, n_queries);
    } else {
      std::vector<int64_t> picked(rows);
      for (int64_t i = 0; i < rows; ++i) picked[i] = i * sample.stride;
      if (exec.device && tier_->pending_prompt_rows() > 0) {
        // Staged beside the prompt, taken by its background job: a copy to the host here waits
        // for all the caller queued before this call (a decoder that attends first: the layer's
        // prompt attention, ~0.4 s at 128K), and the device idles while this call finishes and
        // the caller queues its next work (docs/benchmarks.md, seventh session).
        KVRT_RETURN_IF_ERROR(tier_->StagePromptQueries(q, row, picked, exec));
      } else {
        std::vector<unsigned char> sample(static_cast<std::size_t>(rows) * row);
        KVRT_RETURN_IF_ERROR(tier_->CopyRowsToHost(sample.data(), q, row, picked, exec));
        cold_.SampleQueries(sample.data(), rows);
      }
    }
  }
  if (tier_->pending_prompt_rows() > 0) {
    // The copy to the host store, the GPU build (cluster kind) and the index build overlap the
    // caller's next work (the next layer's prefill); the next call on this layer waits for them.
    cold_.LaunchBackground(arena, [this, &arena, slot]() mutable {
      const absl::Status st = tier_->SettlePrompt(&cold_);
      if (st.ok()) cold_.RefreshIndexes(arena, /*background=*/false);
      if (st.ok()) tier_->PrepareDecode(cold_);
      // NOTE: the slot goes back here, while this layer surely exists (a waiter proceeds only
      // after the job returns), not when the job object is destroyed.
      slot.reset();
      return st;
    });
    return absl::OkStatus();
  }
  KVRT_RETURN_IF_ERROR(tier_->SettleEvictions(&cold_));
  arena.execute([&] { BuildSegmentsOnGpu(k, v, exec); });  // its per-head work: in the arena
  // The rows are stored (the caller's buffers are no longer read): the prompt's index is built in
  // a background job, as a staged prompt's is, which the next call on this layer (or
  // kvrt_seq_wait) waits for. A decoder's next layers (their model work and their own builds)
  // overlap it: one layer's build has phases that keep few cores busy (a head's segments, the
  // query metric), which the other layers' builds fill. The index is the same whenever it is
  // built (it depends on the rows and the query sample only), so results do not depend on timing.
  auto build = [this, &arena] {
    {
      KVRT_SPAN("prefill_index");
      cold_.RefreshIndexes(arena, /*background=*/false);
    }
    tier_->PrepareDecode(cold_);
    return absl::OkStatus();
  };
  if (cold_.needs_refresh()) {
    cold_.LaunchBackground(arena, build, /*joinable=*/true);
    prompt_build_ = true;
    return absl::OkStatus();
  }
  return build();
}

void LayerState::BuildSegmentsOnGpu(const void* k, const void* v, const Exec& exec) {
  // Every cold row came from this prompt: rows [0, rows()) are its positions [S, S + rows()).
  if (!tier_->builds_segments() || !cold_.needs_refresh() ||
      cold_.rows() < cfg_->index.cluster.segment_tokens)
    return;
  const int64_t t0 = NowNs();
  const std::size_t skip = static_cast<std::size_t>(cfg_->sink_tokens) * cfg_->num_kv_heads *
                           cfg_->head_dim * DTypeSize(cfg_->dtype);
  auto parts =
      tier_->BuildSegments(cold_, static_cast<const unsigned char*>(k) + skip,
                           static_cast<const unsigned char*>(v) + skip, cold_.rows(), exec);
  // NOTE: a failed GPU build (no device memory for its work arrays, a CUDA error) is not an error
  // of the prefill: the index clusters the segments on the CPU, as without a GPU.
  if (!parts.ok() || parts->empty() || (*parts)[0].empty()) return;
  const int64_t segments = static_cast<int64_t>((*parts)[0].size());
  cold_.PresetSegments(0, std::move(*parts));
  counters_->segments_built_gpu += segments * cfg_->num_kv_heads;
  counters_->time_segment_build_ns += NowNs() - t0;
}

absl::Status LayerState::Append(const void* k, const void* v, int64_t n, tbb::task_arena& arena,
                                const Exec& exec) {
  const int64_t cold_before = cold_.rows();
  KVRT_RETURN_IF_ERROR(AppendTokens(k, v, n, exec));
  // Rows stored by this call get indexed: at once on the host backend (results independent of
  // timing), in the background on the GPU backend (evicted rows reach the store, and the index,
  // after the next attend: decode_step.cc).
  if (!tier_->background_refresh()) {
    cold_.RefreshIndexes(arena, false);
  } else if (cold_.rows() > cold_before) {
    cold_.RefreshIndexes(arena, true);
  }
  return absl::OkStatus();
}

void LayerState::SettleBackgroundWork() { cold_.AwaitIndexes(); }

}  // namespace kvrt::runtime
