// The host backend of the GPU tier (tier_backend.h): sinks and window ring in host memory, tokens
// leaving the window copied into the cold tier at once, every partial state on the CPU. It is
// also the numerical reference of the device backend: both attend and merge with the same host
// implementation (cpu_index/attention.h) that the kernels' host references use.
#include <algorithm>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_cpu_index/attention.h"
#include "oneapi/tbb/parallel_for.h"
#include "tier_backend.h"

namespace kvrt::runtime {
namespace {

class HostStep : public TierStep {
 public:
  HostStep(int n, int q_heads, int d) {
    n_ = n;
    q_floats_ = static_cast<std::size_t>(q_heads) * d;
    q_.resize(n * q_floats_);
    tier.resize(n);
    for (auto& t : tier) t.Reset(q_heads, d);
  }
  float* q_mut(int i) { return q_.data() + i * q_floats_; }
  std::vector<PartialState> tier;  // [n] sinks + window
};

class HostTier final : public TierBackend {
 public:
  explicit HostTier(const RuntimeConfig* config) : cfg_(config) {}

  absl::Status Append(const AppendPlan& plan, const void* k, const void* v, const Exec& exec,
                      ColdTier* cold) override;
  absl::Status SettleEvictions(ColdTier*) override { return absl::OkStatus(); }
  int64_t pending_rows() const override { return 0; }
  absl::Status CopyRowsToHost(void* dst, const void* src, std::size_t row_bytes,
                              const std::vector<int64_t>& rows, const Exec&) override {
    for (std::size_t i = 0; i < rows.size(); ++i)
      std::memcpy(static_cast<unsigned char*>(dst) + i * row_bytes,
                  static_cast<const unsigned char*>(src) + rows[i] * row_bytes, row_bytes);
    return absl::OkStatus();
  }
  bool background_refresh() const override { return false; }
  bool computes_on_host() const override { return true; }
  absl::StatusOr<std::unique_ptr<TierStep>> BeginStep(TierBackend* const* tiers,
                                                      const TierCounts* counts, int n,
                                                      const void* q, const Exec& exec,
                                                      tbb::task_arena& arena) override;
  bool can_fetch() const override { return false; }
  bool can_select_clusters() const override { return false; }
  absl::Status SelectClusters(TierStep*, int, const ColdTier&, ColdSelection*, tbb::task_arena&,
                              absl::FunctionRef<absl::Status(bool)>) override {
    return absl::UnimplementedError("summary scoring on the accelerator needs the GPU backend");
  }
  absl::Status AttendFetched(TierStep*, int, const ColdSelection&, const ColdTier&,
                             tbb::task_arena&) override {
    return absl::UnimplementedError("fetch mode needs the GPU backend");
  }
  absl::Status Finish(TierStep* step, const std::vector<StepStates>& states,
                      const std::vector<uint8_t>& ok, float* out, float* lse) override;
  bool has_sinks() const override { return !sink_k_.empty(); }
  int64_t RingGrowth(int64_t new_length) const override {
    const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
    const int64_t rows = static_cast<int64_t>(ring_k_.size() / token_bytes());
    const int64_t need = new_length > S ? std::min(W, new_length - S) : 0;
    return need > rows ? std::min(W, std::max(need, 2 * rows)) - rows : 0;
  }
  std::size_t allocated_bytes() const override {
    return sink_k_.size() + sink_v_.size() + ring_k_.size() + ring_v_.size();
  }
  // The value buffers: the key buffers when values are keys (config.values_are_keys).
  const std::vector<unsigned char>& sink_values() const {
    return cfg_->values_are_keys ? sink_k_ : sink_v_;
  }
  const std::vector<unsigned char>& ring_values() const {
    return cfg_->values_are_keys ? ring_k_ : ring_v_;
  }
  void Release() override {}

 private:
  std::size_t token_bytes() const {
    return static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
  }
  absl::Status Allocate(const AppendPlan& plan);

  const RuntimeConfig* cfg_;
  // [rows, kv_heads, d] in storage dtype; position p >= S lives in ring slot (p - S) % W. The
  // value buffers stay empty when values are keys.
  std::vector<unsigned char> sink_k_, sink_v_, ring_k_, ring_v_;
};

absl::Status HostTier::Allocate(const AppendPlan& plan) {
  const std::size_t tb = token_bytes();
  const std::size_t ring_rows = ring_k_.size() / tb;
  const std::size_t v_tb = cfg_->values_are_keys ? 0 : tb;
  try {
    if (plan.need_sinks) {
      sink_k_.resize(cfg_->sink_tokens * tb);
      sink_v_.resize(cfg_->sink_tokens * v_tb);
    }
    if (plan.ring_grow > 0) {
      ring_k_.resize(ring_k_.size() + plan.ring_grow * tb);
      ring_v_.resize(ring_v_.size() + plan.ring_grow * v_tb);
    }
  } catch (const std::bad_alloc&) {
    if (plan.need_sinks) sink_k_ = {}, sink_v_ = {};
    if (plan.ring_grow > 0) ring_k_.resize(ring_rows * tb), ring_v_.resize(ring_rows * v_tb);
    return absl::ResourceExhaustedError(
        absl::StrCat("append: cannot allocate ", plan.gpu_bytes, " bytes of GPU-tier buffers"));
  }
  return absl::OkStatus();
}

absl::Status HostTier::Append(const AppendPlan& plan, const void* k, const void* v, const Exec&,
                              ColdTier* cold) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb = token_bytes();
  // Cold capacity first (a reserved but unused capacity is harmless), then the tier's buffers,
  // so that a failure of either leaves nothing allocated on this call's account.
  KVRT_RETURN_IF_ERROR(cold->Reserve(cold->rows() + plan.new_cold()));
  KVRT_RETURN_IF_ERROR(Allocate(plan));
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);

  // 1. Tokens that become cold, in position order: ring tokens (older; at most two contiguous
  //    runs of slots), then input tokens past the window.
  for (int64_t p = plan.cold_begin; p < plan.cold_begin + plan.evict;) {
    const int64_t slot = (p - S) % W;
    const int64_t run = std::min(plan.cold_begin + plan.evict - p, W - slot);
    KVRT_RETURN_IF_ERROR(
        cold->Append(ring_k_.data() + slot * tb, ring_values().data() + slot * tb, run));
    p += run;
  }
  if (plan.direct > 0) {
    const std::size_t off = static_cast<std::size_t>(plan.direct_begin - plan.length) * tb;
    KVRT_RETURN_IF_ERROR(cold->Append(ks + off, vs + off, plan.direct));
  }
  // 2. New tokens that stay on the tier.
  for (int64_t p = plan.length; p < plan.sink_end; ++p) {
    std::memcpy(sink_k_.data() + p * tb, ks + (p - plan.length) * tb, tb);
    if (!cfg_->values_are_keys)
      std::memcpy(sink_v_.data() + p * tb, vs + (p - plan.length) * tb, tb);
  }
  for (int64_t p = plan.ring_begin; p < plan.new_length; ++p) {
    const std::size_t slot = static_cast<std::size_t>((p - S) % W);
    std::memcpy(ring_k_.data() + slot * tb, ks + (p - plan.length) * tb, tb);
    if (!cfg_->values_are_keys)
      std::memcpy(ring_v_.data() + slot * tb, vs + (p - plan.length) * tb, tb);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TierStep>> HostTier::BeginStep(TierBackend* const* tiers,
                                                              const TierCounts* counts, int n,
                                                              const void* q, const Exec&,
                                                              tbb::task_arena& arena) {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  const std::size_t q_bytes = static_cast<std::size_t>(H) * d * DTypeSize(cfg_->dtype);
  auto step = std::make_unique<HostStep>(n, H, d);
  for (int i = 0; i < n; ++i)
    ConvertToF32(static_cast<const unsigned char*>(q) + i * q_bytes, cfg_->dtype,
                 static_cast<std::size_t>(H) * d, step->q_mut(i));
  const int G = cfg_->num_kv_heads;
  const std::size_t head_elems = static_cast<std::size_t>(G) * d;
  // A task per (member, kv head, run of its q heads, chunk of the window's rows): the run scores
  // the kv head's rows in one pass over them for all its heads (the same figures as a pass per
  // head, a quarter of the reads at 4 q heads per kv head). Without the tiles the runs are as long
  // as the arena's threads still get a task each (few kv heads, one sequence: shorter runs), the
  // window one chunk. On the tiles (config.index.host_tiles) a run is cpu_index::GroupPassHeads
  // heads (the width their product is padded to) and the window goes in chunks of kWindowChunk
  // rows, merged in order: the chunks follow the row count, not the threads.
  constexpr int64_t kWindowChunk = 256;
  const bool tiles = cfg_->index.host_tiles;
  const int per_task =
      tiles ? std::clamp(group, 1, cpu_index::GroupPassHeads(true))
            : static_cast<int>(std::clamp<int64_t>(
                  int64_t{n} * H / std::max(1, arena.max_concurrency()), 1, std::max(group, 1)));
  const int runs = (group + per_task - 1) / per_task;
  int64_t most = 0;
  for (int i = 0; i < n; ++i) most = std::max(most, counts[i].n_window);
  const int chunks =
      tiles ? static_cast<int>(std::max<int64_t>(1, (most + kWindowChunk - 1) / kWindowChunk)) : 1;
  const std::size_t slot = static_cast<std::size_t>(per_task) * d;
  const std::size_t tasks = static_cast<std::size_t>(n) * G * runs * chunks;
  std::vector<float> chunk_o(tasks * slot), chunk_lse(tasks * per_task);
  // NOTE: tasks in size_t (a batch of long windows on the tiles: members x kv heads x runs x
  // chunks may pass 2^31); a row and a chunk index each fit an int.
  auto body = [&](std::size_t task) {
    const int row = static_cast<int>(task / chunks), c = static_cast<int>(task % chunks);
    const int i = row / (G * runs), g = row / runs % G, r0 = row % runs * per_task;
    const int nh = std::min(per_task, group - r0), h0 = g * group + r0;
    const auto& tier = *static_cast<const HostTier*>(tiers[i]);
    PartialState& state = step->tier[i];
    const std::size_t hoff = static_cast<std::size_t>(g) * d * DTypeSize(cfg_->dtype);
    const float* qg = step->q(i) + static_cast<std::size_t>(h0) * d;
    float* og = state.o.data() + static_cast<std::size_t>(h0) * d;
    // NOTE: an unallocated buffer (sink_tokens = 0, or no token past the sinks yet) has a null
    // data(); offsetting null is undefined behaviour (UBSan, fuzz_api), so pass null instead.
    auto at = [](const std::vector<unsigned char>& b, std::size_t off) {
      return b.empty() ? nullptr : b.data() + off;
    };
    if (c == 0)
      cpu_index::AttendDenseGroup(qg, nh, d, cfg_->scale, at(tier.sink_k_, hoff),
                                  at(tier.sink_values(), hoff), head_elems, cfg_->dtype,
                                  counts[i].n_sink, og, &state.lse[h0], tiles);
    const int64_t w0 = c * kWindowChunk, w1 = chunks == 1
                                                  ? counts[i].n_window
                                                  : std::min(counts[i].n_window, w0 + kWindowChunk);
    const std::size_t off =
        hoff + static_cast<std::size_t>(std::min(w0, w1)) * head_elems * DTypeSize(cfg_->dtype);
    cpu_index::AttendDenseGroup(
        qg, nh, d, cfg_->scale, at(tier.ring_k_, off), at(tier.ring_values(), off), head_elems,
        cfg_->dtype, std::max<int64_t>(0, w1 - w0), chunk_o.data() + task * slot,
        chunk_lse.data() + static_cast<std::size_t>(task) * per_task, tiles);
  };
  arena.execute([&] { tbb::parallel_for(std::size_t{0}, tasks, body); });
  // Each run's window chunks merged into its sinks' state, in chunk order.
  for (std::size_t task = 0; task < tasks; ++task) {
    const int row = static_cast<int>(task / chunks);
    const int i = row / (G * runs), g = row / runs % G, r0 = row % runs * per_task;
    const int nh = std::min(per_task, group - r0), h0 = g * group + r0;
    PartialState& state = step->tier[i];
    for (int r = 0; r < nh; ++r)
      cpu_index::MergeInto(state.o.data() + static_cast<std::size_t>(h0 + r) * d,
                           &state.lse[h0 + r],
                           chunk_o.data() + task * slot + static_cast<std::size_t>(r) * d,
                           chunk_lse[task * per_task + r], d);
  }
  return std::unique_ptr<TierStep>(std::move(step));
}

absl::Status HostTier::Finish(TierStep* base, const std::vector<StepStates>& states,
                              const std::vector<uint8_t>& ok, float* out, float* lse) {
  auto* step = static_cast<HostStep*>(base);
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  std::vector<const float*> os;
  std::vector<float> ls;
  for (int i = 0; i < step->size(); ++i) {
    if (!ok[i]) continue;  // a failed member's rows of out stay untouched
    PartialState& tier = step->tier[i];
    for (int h = 0; h < H; ++h) {
      const std::size_t off = static_cast<std::size_t>(h) * d;
      os.assign(1, tier.o.data() + off);
      ls.assign(1, tier.lse[h]);
      for (const PartialState* s : {states[i].cold, states[i].estimate}) {
        if (s == nullptr) continue;
        os.push_back(s->o.data() + off);
        ls.push_back(s->lse[h]);
      }
      float merged_lse;
      cpu_index::MergeStates(static_cast<int>(os.size()), os.data(), ls.data(), d,
                             out + (static_cast<std::size_t>(i) * H + h) * d, &merged_lse);
      if (lse != nullptr) lse[static_cast<std::size_t>(i) * H + h] = merged_lse;
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<TierBackend> MakeHostTier(const RuntimeConfig* config) {
  return std::make_unique<HostTier>(config);
}

}  // namespace kvrt::runtime
