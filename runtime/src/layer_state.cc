#include "runtime/src/layer_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <exception>
#include <new>

#include "absl/strings/str_cat.h"
#include "runtime/src/budget.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_cpu_index/attention.h"
#include "runtime/src/fault_injection.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace

LayerState::LayerState(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* gpu)
    : cfg_(config), counters_(counters), gpu_ctx_(gpu) {
  if (gpu_ctx_ != nullptr) gpu_ = std::make_unique<GpuTier>();
  cold_.reserve(cfg_->num_kv_heads);
  for (int g = 0; g < cfg_->num_kv_heads; ++g) cold_.emplace_back(cfg_->head_dim, cfg_->dtype);
  index_.resize(cfg_->num_kv_heads);
}

LayerState::~LayerState() = default;

std::size_t LayerState::token_bytes() const {
  return static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
}

void LayerState::Release() {
  if (gpu_) {  // background index work and copies in flight end before the counters go
    (void)gpu_->index_work.Wait();
    gpu_->evictions.Discard();
    counters_->gpu_allocated_bytes -= static_cast<int64_t>(gpu_->bytes());
  }
  counters_->gpu_tokens -= gpu_tokens();
  counters_->host_tokens -= cold_tokens();
  counters_->gpu_allocated_bytes -= static_cast<int64_t>(sink_k_.size() + sink_v_.size() + ring_k_.size() + ring_v_.size());
  counters_->index_bytes -= index_bytes_;
  index_bytes_ = 0;
}

absl::Status LayerState::Prefill(const void* q, const void* k, const void* v, int64_t n,
                                 tbb::task_arena& arena, const Exec& exec) {
  if (gpu_) return PrefillGpu(q, k, v, n, arena, exec);
  if (length_ != 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "prefill: the layer already holds ", length_, " tokens (prefill once, then append)"));
  KVRT_RETURN_IF_ERROR(AppendTokens(k, v, n));
  if (q != nullptr && cfg_->index_kind != cpu_index::IndexKind::kExact) SampleQueries(q, n);
  return UpdateIndexes(arena);
}

absl::Status LayerState::Append(const void* k, const void* v, int64_t n, tbb::task_arena& arena,
                                const Exec& exec) {
  if (gpu_) return AppendTokensGpu(k, v, n, arena, exec);
  KVRT_RETURN_IF_ERROR(AppendTokens(k, v, n));
  return UpdateIndexes(arena);
}

// Keeps an evenly spaced sample of the prompt's queries per kv head (all q heads of its group), in
// f32, for index kinds that build from queries.
void LayerState::SampleQueries(const void* q, int64_t n) {
  const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
  const int d = cfg_->head_dim;
  const int64_t cap = std::max(1, cfg_->index.graph_query_sample);
  const int64_t tokens = std::min<int64_t>(n, std::max<int64_t>(1, cap / group));
  const std::size_t q_row = static_cast<std::size_t>(cfg_->num_q_heads) * d;
  query_sample_.assign(cfg_->num_kv_heads, {});
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    auto& out = query_sample_[g];
    out.resize(static_cast<std::size_t>(tokens) * group * d);
    for (int64_t i = 0; i < tokens; ++i) {
      const int64_t t = tokens == n ? i : i * n / tokens;
      for (int j = 0; j < group; ++j) {
        const std::size_t src = (static_cast<std::size_t>(t) * q_row + (g * group + j) * d);
        ConvertToF32(static_cast<const unsigned char*>(q) + src * DTypeSize(cfg_->dtype),
                     cfg_->dtype, d, out.data() + (static_cast<std::size_t>(i) * group + j) * d);
      }
    }
  }
}

absl::Status LayerState::AppendTokens(const void* k, const void* v, int64_t n) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb = token_bytes();
  const std::size_t head_elems = static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim;
  const std::size_t hb = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  const int64_t L = length_, L2 = length_ + n;
  const int64_t cold_begin = S + cold_tokens();            // first position not yet cold
  const int64_t cold_end = std::max(S, L2 - W);            // positions below are cold afterwards
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);

  // Budgets and allocations first, so that nothing below can fail half-way.
  const int64_t new_cold = cold_end - cold_begin;
  const bool need_sinks = sink_k_.empty() && S > 0;
  // The ring grows as it fills (doubling, up to W rows): before it wraps, position p sits in slot
  // p - S, so growing keeps every slot in place, and a huge window costs only what it holds.
  const int64_t ring_rows = static_cast<int64_t>(ring_k_.size() / tb);
  const int64_t ring_need = L2 > S ? std::min(W, L2 - S) : 0;
  const int64_t ring_grow =
      ring_need > ring_rows ? std::min(W, std::max(ring_need, 2 * ring_rows)) - ring_rows : 0;
  const bool need_ring = ring_grow > 0;
  const int64_t gpu_add = 2 * static_cast<int64_t>(tb) * ((need_sinks ? S : 0) + ring_grow);
  // The cold index's growth counts against host_memory_limit before it happens (an upper bound,
  // trued up by UpdateIndexes), so a call past the limit fails here having changed nothing.
  const int64_t index_add =
      new_cold > 0 ? IndexGrowthBound(*cfg_, cold_tokens() + new_cold, kIndexMinRows, index_bytes_) : 0;
  BudgetReservation budget;
  KVRT_RETURN_IF_ERROR(budget.Reserve(*cfg_, counters_, gpu_add, new_cold, tb, index_add));
  // Host capacity first (a reserved but unused capacity is harmless), then the GPU-tier buffers,
  // so that a failure of either leaves nothing allocated on this call's account.
  if (new_cold > 0) {
    for (auto& store : cold_) {
      if (absl::Status st = store.Reserve(store.size() + new_cold); !st.ok()) {
        return st;
      }
    }
  }
  try {
    if (need_sinks) {
      sink_k_.resize(S * tb);
      sink_v_.resize(S * tb);
    }
    if (need_ring) {
      ring_k_.resize((ring_rows + ring_grow) * tb);
      ring_v_.resize((ring_rows + ring_grow) * tb);
    }
  } catch (const std::bad_alloc&) {
    if (need_sinks) sink_k_ = {}, sink_v_ = {};
    if (need_ring) ring_k_.resize(ring_rows * tb), ring_v_.resize(ring_rows * tb);
    return absl::ResourceExhaustedError(
        absl::StrCat("append: cannot allocate ", gpu_add, " bytes of GPU-tier buffers"));
  }
  budget.Commit();
  index_bytes_ += index_add;  // UpdateIndexes trues this up to the indexes' real size

  // 1. Tokens that become cold, in position order: from the ring (older) or straight from the
  //    input (when more than a window arrives at once).
  for (int64_t p = cold_begin; p < cold_end;) {
    if (p < L) {
      const std::size_t slot = static_cast<std::size_t>((p - S) % W);
      for (int g = 0; g < cfg_->num_kv_heads; ++g)
        (void)cold_[g].Append(ring_k_.data() + slot * tb + g * hb, ring_v_.data() + slot * tb + g * hb,
                              1, head_elems);
      ++p;
    } else {
      const int64_t run = cold_end - p;  // contiguous input rows
      const std::size_t off = static_cast<std::size_t>(p - L) * tb;
      for (int g = 0; g < cfg_->num_kv_heads; ++g)
        (void)cold_[g].Append(ks + off + g * hb, vs + off + g * hb, run, head_elems);
      p += run;
    }
  }
  // 2. New tokens that stay on the GPU tier.
  for (int64_t p = std::max(L, int64_t{0}); p < L2; ++p) {
    const unsigned char* kr = ks + static_cast<std::size_t>(p - L) * tb;
    const unsigned char* vr = vs + static_cast<std::size_t>(p - L) * tb;
    if (p < S) {
      std::memcpy(sink_k_.data() + p * tb, kr, tb);
      std::memcpy(sink_v_.data() + p * tb, vr, tb);
    } else if (p >= cold_end) {
      const std::size_t slot = static_cast<std::size_t>((p - S) % W);
      std::memcpy(ring_k_.data() + slot * tb, kr, tb);
      std::memcpy(ring_v_.data() + slot * tb, vr, tb);
    }
  }
  const int64_t gpu_before = gpu_tokens();
  length_ = L2;
  n_sink_ = std::min(L2, S);
  n_window_ = L2 - n_sink_ - cold_tokens();
  counters_->gpu_tokens += gpu_tokens() - gpu_before;
  // Evicted = left the GPU tier after having been on it (not prompt tokens sent straight to host).
  counters_->evicted_tokens += std::max<int64_t>(0, std::min(L, cold_end) - cold_begin);
  return absl::OkStatus();
}

absl::Status LayerState::UpdateIndexes(tbb::task_arena& arena) {
  if (cfg_->index_kind == cpu_index::IndexKind::kExact) return absl::OkStatus();
  if (cold_tokens() < kIndexMinRows) return absl::OkStatus();
  std::vector<absl::Status> status(cfg_->num_kv_heads);
  arena.execute([&] {
    tbb::parallel_for(0, cfg_->num_kv_heads, [&](int g) {
      auto& index = index_[g];
      if (index != nullptr && index->size() >= cold_[g].size()) return;
      // NOTE: an exception from an index (one that did not turn it into a status) must not leave
      // this call either: the tokens are already stored, so it would report a half-applied append.
      // It is a failed update like any other (counted, retried, rows scanned exactly).
      try {
        status[g] = fault::Check(fault::Site::kIndexUpdate, cpu_index::IndexKindName(cfg_->index_kind),
                                 index == nullptr ? "build" : "insert");
        if (!status[g].ok()) return;
        if (index == nullptr) {
          auto made = cpu_index::MakeIndex(cfg_->index_kind, cfg_->index, cfg_->head_dim);
          if (!made.ok()) {
            status[g] = made.status();
            return;
          }
          const bool have_q = !query_sample_.empty();
          const int64_t nq = have_q ? static_cast<int64_t>(query_sample_[g].size()) / cfg_->head_dim : 0;
          status[g] = (*made)->Build(cold_[g], have_q ? query_sample_[g].data() : nullptr, nq);
          if (status[g].ok()) index = std::move(*made);
        } else {
          status[g] = index->Add(cold_[g]);
        }
      } catch (const std::bad_alloc&) {
        status[g] = absl::ResourceExhaustedError("index update: out of memory");
      } catch (const std::exception& e) {
        status[g] = absl::InternalError(absl::StrCat("index update: ", e.what()));
      }
    });
  });
  int64_t bytes = 0;
  bool all_built = true;
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    if (index_[g]) bytes += static_cast<int64_t>(index_[g]->MemoryBytes());
    all_built = all_built && index_[g] != nullptr;
  }
  counters_->index_bytes += bytes - index_bytes_;
  index_bytes_ = bytes;
  if (all_built) query_sample_.clear();
  for (auto& s : status) {
    // NOTE: not an error of the call: the tokens are stored, and rows the index misses are scanned
    // exactly by Attend (and retried at the next update), so a failed update costs speed, never
    // correctness. Failing the call would report a half-applied append. Counted in the stats.
    if (!s.ok()) counters_->index_update_failures += 1;
  }
  return absl::OkStatus();
}

absl::Status LayerState::Attend(const void* q_in, float* out, tbb::task_arena& arena,
                                const uint8_t* streaming, const Exec& exec) {
  if (gpu_) return AttendGpu(q_in, out, arena, streaming, exec);
  if (length_ == 0)
    return absl::FailedPreconditionError("attend: the layer holds no token (prefill or append first)");
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  const int64_t n_cold = cold_tokens();
  const std::size_t head_elems = static_cast<std::size_t>(cfg_->num_kv_heads) * d;
  std::vector<float> q(static_cast<std::size_t>(H) * d);
  ConvertToF32(q_in, cfg_->dtype, q.size(), q.data());
  if (cfg_->record_attended) attended_.assign(H, {});

  // Written to `out` only when every head succeeded (a failed call leaves outputs untouched).
  std::vector<float> result(static_cast<std::size_t>(H) * d), lse(H, kNegInf);
  std::vector<float> o_cold(static_cast<std::size_t>(H) * d), lse_cold(H, kNegInf);
  std::vector<std::vector<int64_t>> ids(H);
  std::vector<int64_t> scored(H, 0), search_ns(H, 0);
  const auto units = n_cold > 0 ? ColdUnits(streaming) : std::vector<std::vector<int>>{};
  std::vector<absl::Status> status(units.size());
  std::vector<int64_t> read(units.size(), 0);
  arena.execute([&] {
    // GPU tier: sinks, then the valid ring slots, per q head.
    tbb::parallel_for(0, H, [&](int h) {
      const int g = h / group;
      const std::size_t hoff = static_cast<std::size_t>(g) * d * DTypeSize(cfg_->dtype);
      const float* qh = q.data() + static_cast<std::size_t>(h) * d;
      float* oh = result.data() + static_cast<std::size_t>(h) * d;
      std::vector<float> o2(d);
      float lse2;
      // NOTE: an unallocated buffer (sink_tokens = 0, or no token past the sinks yet) has a null
      // data(); offsetting null is undefined behaviour (UBSan, fuzz_api), so pass null instead.
      auto at = [hoff](const std::vector<unsigned char>& b) { return b.empty() ? nullptr : b.data() + hoff; };
      cpu_index::AttendDense(qh, d, cfg_->scale, at(sink_k_), at(sink_v_), head_elems, cfg_->dtype,
                             n_sink_, oh, &lse[h]);
      cpu_index::AttendDense(qh, d, cfg_->scale, at(ring_k_), at(ring_v_), head_elems, cfg_->dtype,
                             n_window_, o2.data(), &lse2);
      cpu_index::MergeInto(oh, &lse[h], o2.data(), lse2, d);
    });
    // Cold tier, per unit (a kv head's group, or one head).
    tbb::parallel_for(0, static_cast<int>(units.size()), [&](int u) {
      status[u] = ColdGroup(units[u], q.data(), o_cold.data(), lse_cold.data(), &ids, scored.data(),
                            search_ns.data(), &read[u]);
    });
  });
  for (auto& s : status) KVRT_RETURN_IF_ERROR(s);
  std::vector<int64_t> attended_cold(H, 0);
  for (const auto& unit : units) {
    for (int h : unit) {
      const std::size_t off = static_cast<std::size_t>(h) * d;
      cpu_index::MergeInto(result.data() + off, &lse[h], o_cold.data() + off, lse_cold[h], d);
      attended_cold[h] = cfg_->index_kind == cpu_index::IndexKind::kExact ? n_cold
                                                                           : static_cast<int64_t>(ids[h].size());
    }
  }
  if (cfg_->record_attended)
    for (int h = 0; h < H; ++h) RecordAttended(h, n_cold, ids[h]);
  std::memcpy(out, result.data(), result.size() * sizeof(float));
  int64_t total_scored = 0, total_cold = 0;
  for (int h = 0; h < H; ++h) {
    total_scored += scored[h];
    total_cold += attended_cold[h];
  }
  counters_->attend_calls += 1;
  counters_->keys_scored += total_scored;
  for (int64_t r : read) counters_->keys_read += r;
  // Retrieval heads only: a streaming head searches nothing, so it would make the scanned
  // fraction (keys_scored / cold_keys_searchable) read low.
  for (const auto& unit : units) counters_->cold_keys_searchable += n_cold * static_cast<int64_t>(unit.size());
  counters_->cold_tokens_attended += total_cold;
  return absl::OkStatus();
}

void LayerState::RecordAttended(int h, int64_t n_cold, const std::vector<int64_t>& cold_ids) {
  // Positions: sinks [0, n_sink), window [S + n_cold, length), then cold row i = position S + i.
  auto& rec = attended_[h];
  rec.clear();
  rec.reserve(n_sink_ + n_window_ + cold_ids.size());
  for (int64_t p = 0; p < n_sink_; ++p) rec.push_back(p);
  for (int64_t p = cfg_->sink_tokens + n_cold; p < length_; ++p) rec.push_back(p);
  for (auto id : cold_ids) rec.push_back(cfg_->sink_tokens + id);
}

}  // namespace kvrt::runtime
