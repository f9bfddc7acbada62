#include "tools/replay.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kvrt_common/dtype.h"
#include "oneapi/tbb/parallel_for.h"
#include "tools/accuracy.h"
#include "tools/reuse.h"

namespace kvrt::cli {
namespace {

// Progress on stderr. On a terminal one line redrawn in place (carriage return); elsewhere (a log
// file, a pipe: scripts/demo.sh's log read "layer 1/2exact reference: layer 2/2") whole lines,
// the first, then at most one per kLogPeriod, then the last.
class Progress {
 public:
  explicit Progress(bool on) : on_(on), tty_(on && isatty(fileno(stderr)) == 1) {}
  ~Progress() { Finish(); }
  // Ends the terminal's redrawn line (a no-op elsewhere, or when nothing was drawn).
  void Finish() {
    if (drawn_ && tty_) std::fputc('\n', stderr);
    drawn_ = false;
  }
  template <typename... Args>
  void Update(bool last, const char* fmt, Args... args) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!tty_ && drawn_ && !last && now - last_line_ < kLogPeriod) return;
    if (tty_) std::fputc('\r', stderr);
    std::fprintf(stderr, fmt, args...);
    if (!tty_) std::fputc('\n', stderr);
    drawn_ = true;
    last_line_ = now;
  }

 private:
  static constexpr std::chrono::seconds kLogPeriod{10};
  bool on_, tty_, drawn_ = false;
  std::chrono::steady_clock::time_point last_line_;
};

using Clock = std::chrono::steady_clock;

double Micros(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// One layer's keys and values over all tokens (prompt then decode steps), as f32.
struct LayerF32 {
  int64_t tokens = 0;
  std::vector<float> k, v;  // [tokens, kv_heads, d]
};

absl::StatusOr<trace::TensorView> Get(const trace::TraceReader& t, int layer, const char* part) {
  return t.Tensor(layer, part);
}

absl::StatusOr<LayerF32> LoadLayer(const trace::TraceReader& t, int layer, int steps) {
  const auto& m = t.meta();
  auto pk = Get(t, layer, "prefill.k");
  auto pv = Get(t, layer, "prefill.v");
  auto dk = Get(t, layer, "decode.k");
  auto dv = Get(t, layer, "decode.v");
  for (auto* s : {&pk, &pv, &dk, &dv})
    if (!s->ok()) return s->status();
  LayerF32 out;
  const std::size_t row = static_cast<std::size_t>(m.num_kv_heads) * m.head_dim;
  out.tokens = m.prompt_tokens + steps;
  out.k.resize(out.tokens * row);
  out.v.resize(out.tokens * row);
  const std::size_t prompt = m.prompt_tokens * row, decode = steps * row;
  ConvertToF32(pk->data, m.dtype, prompt, out.k.data());
  ConvertToF32(pv->data, m.dtype, prompt, out.v.data());
  ConvertToF32(dk->data, m.dtype, decode, out.k.data() + prompt);
  ConvertToF32(dv->data, m.dtype, decode, out.v.data() + prompt);
  return out;
}

int StepsOf(const trace::TraceMeta& m, int max_steps) {
  return max_steps > 0 ? static_cast<int>(std::min<int64_t>(max_steps, m.decode_steps))
                       : static_cast<int>(m.decode_steps);
}

float ScaleOf(const trace::TraceMeta& m) {
  return m.scale > 0 ? m.scale : 1.f / std::sqrt(static_cast<float>(m.head_dim));
}

kvrt_status Check(kvrt_status s, const char* what, std::string* error) {
  if (s != KVRT_OK)
    *error = absl::StrCat(what, ": ", kvrt_status_string(s), ": ", kvrt_last_error());
  return s;
}

// Share of exact attention mass that the GPU tier (sinks + window) would hold, per q head,
// averaged over the prompt's last `count` queries (each attending causally to the prompt). A cell
// per (kv head, prompt query) scores its q heads in one pass over the rows (a pass per head was a
// third of a 32K cluster replay's time under perf); the per-head arithmetic and the order of the
// averages are as before.
std::vector<double> TierMassFromPrompt(const trace::TraceMeta& m, const LayerF32& kv,
                                       const trace::TensorView& prompt_q, int sinks, int window,
                                       int count) {
  const int d = m.head_dim, H = m.num_q_heads, G = m.num_kv_heads, group = H / G;
  const float scale = ScaleOf(m);
  const int64_t T = m.prompt_tokens;
  // No prompt, no measurement: NaN (reported as n/a), never a streaming head.
  if (T == 0) return std::vector<double>(H, std::nan(""));
  std::vector<double> share(H, 1.0);
  const int64_t first = std::max<int64_t>(0, T - count);
  const int64_t queries = T - first;
  std::vector<double> ratio(static_cast<std::size_t>(H) * queries);  // [h, query]
  tbb::parallel_for(int64_t{0}, G * queries, [&](int64_t cell) {
    const int g = static_cast<int>(cell / queries);
    const int64_t p = first + cell % queries;
    std::vector<float> q(static_cast<std::size_t>(group) * d), s(group * (p + 1));
    ConvertToF32(static_cast<const unsigned char*>(prompt_q.data) +
                     (static_cast<std::size_t>(p) * H + g * group) * d * DTypeSize(m.dtype),
                 m.dtype, q.size(), q.data());
    std::vector<float> mx(group, -INFINITY);
    for (int64_t i = 0; i <= p; ++i) {
      const float* key = kv.k.data() + (i * G + g) * d;
      for (int j = 0; j < group; ++j) {
        const float x = scale * Dot(&q[static_cast<std::size_t>(j) * d], key, d);
        s[j * (p + 1) + i] = x;
        mx[j] = std::max(mx[j], x);
      }
    }
    for (int j = 0; j < group; ++j) {
      double all = 0, tier = 0;
      for (int64_t i = 0; i <= p; ++i) {
        const double w = std::exp(static_cast<double>(s[j * (p + 1) + i]) - mx[j]);
        all += w;
        if (i < sinks || i > p - window) tier += w;
      }
      ratio[static_cast<std::size_t>(g * group + j) * queries + (p - first)] = tier / all;
    }
  });
  for (int h = 0; h < H; ++h) {
    double total = 0;
    for (int64_t k = 0; k < queries; ++k) total += ratio[static_cast<std::size_t>(h) * queries + k];
    share[h] = total / static_cast<double>(queries);
  }
  return share;
}

}  // namespace

absl::StatusOr<kvrt_index_kind> ParseIndexKindOption(const std::string& name) {
  kvrt_index_kind kind;
  if (kvrt_index_kind_parse(name.c_str(), &kind) != KVRT_OK)
    return absl::InvalidArgumentError(kvrt_last_error());
  return kind;
}

const char* IndexKindOptionName(kvrt_index_kind kind) {
  const char* name = kvrt_index_kind_name(kind);
  return name != nullptr ? name : "?";
}

absl::StatusOr<ExactReference> ComputeExactReference(const trace::TraceReader& t, int top_k,
                                                     int max_steps, bool progress) {
  const auto& m = t.meta();
  Progress bar(progress);
  ExactReference ref;
  ref.layers = m.num_layers;
  ref.steps = StepsOf(m, max_steps);
  // No step has more than prompt + steps tokens: a larger k holds nothing but costs memory per
  // (layer, step, head) (--top-k 1048576 on a 216-token trace asked for gigabytes).
  top_k = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(top_k, m.prompt_tokens + int64_t{ref.steps})));
  ref.top_k = top_k;
  ref.heads = m.num_q_heads;
  ref.head_dim = m.head_dim;
  const int d = m.head_dim, H = m.num_q_heads, G = m.num_kv_heads, group = H / G;
  const float scale = ScaleOf(m);
  const std::size_t cells = static_cast<std::size_t>(ref.layers) * ref.steps * H;
  ref.o.resize(cells * d);
  ref.lse.resize(cells);
  ref.top_ids.resize(cells * top_k, -1);
  for (int layer = 0; layer < m.num_layers; ++layer) {
    auto kv = LoadLayer(t, layer, ref.steps);
    if (!kv.ok()) return kv.status();
    auto dq = t.Tensor(layer, "decode.q");
    if (!dq.ok()) return dq.status();
    const std::size_t krow = static_cast<std::size_t>(G) * d;
    // A cell per (step, kv head): its q heads are consecutive, in the trace and in ref.
    tbb::parallel_for(0, ref.steps * G, [&](int cell) {
      const int step = cell / G, g = cell % G, h0 = g * group;
      const HeadRows rows{kv->k.data() + g * d, kv->v.data() + g * d,
                          static_cast<int64_t>(krow), m.prompt_tokens + step + 1};
      std::vector<float> q(static_cast<std::size_t>(group) * d);
      ConvertToF32(static_cast<const unsigned char*>(dq->data) +
                       (static_cast<std::size_t>(step) * H + h0) * d * DTypeSize(m.dtype),
                   m.dtype, static_cast<std::size_t>(group) * d, q.data());
      const std::size_t at = ref.at(layer, step, h0);
      ExactAttention(q.data(), group, rows, d, scale, top_k, ref.o.data() + at * d, &ref.lse[at],
                     ref.top_ids.data() + at * top_k);
    });
    // Finite inputs whose q.k passes f32's range (|q| |k| ~ 1e38) give an infinite score and a
    // NaN reference: refused here, where every metric after it would be NaN.
    for (int step = 0; step < ref.steps; ++step)
      for (int h = 0; h < H; ++h)
        if (!std::isfinite(ref.lse[ref.at(layer, step, h)]))
          return absl::InvalidArgumentError(absl::StrCat(
              "exact attention of layer ", layer, ", decode step ", step, ", q head ", h,
              " is not finite: its q.k scores pass f32's range (values too large for attention)"));
    bar.Update(layer + 1 == m.num_layers, "exact reference: layer %d/%d", layer + 1, m.num_layers);
  }
  return ref;
}

namespace {

// What one effort of a sweep accumulates over the replay.
struct EffortAcc {
  std::vector<double> attend_us, errors, recalls, masses;
  // Per head-step with an estimate: the mass it claims and the mass the attended tokens missed
  // (shares of the exact total), and the log of their ratio where both are above 0.
  std::vector<double> est_mass, missed_mass, est_log_ratio;
  std::vector<double> layer_recall, layer_mass, layer_err;
  std::vector<HeadReport> heads;
  double cold_attended = 0;
  int64_t attended = 0, scored = 0, read = 0, searchable = 0;
};

}  // namespace

absl::StatusOr<std::vector<ReplayReport>> RunReplaySweep(const trace::TraceReader& t,
                                                         const ExactReference& ref,
                                                         const ReplayOptions& opt,
                                                         const std::vector<int>& efforts) {
  const auto& m = t.meta();
  const int steps = StepsOf(m, opt.max_steps);
  if (steps > ref.steps ||
      std::min<int64_t>(opt.top_k, m.prompt_tokens + int64_t{steps}) > ref.top_k)
    return absl::InvalidArgumentError(
        "replay: the exact reference covers fewer steps or a smaller k");
  if (efforts.empty()) return absl::InvalidArgumentError("replay: no search effort given");
  Progress bar(opt.progress);
  const int d = m.head_dim, H = m.num_q_heads, G = m.num_kv_heads, group = H / G;
  const float scale = ScaleOf(m);

  kvrt_config cfg = kvrt_config_default();
  cfg.num_layers = m.num_layers;
  cfg.num_q_heads = H;
  cfg.num_kv_heads = G;
  cfg.head_dim = d;
  cfg.dtype = static_cast<kvrt_dtype>(m.dtype);
  cfg.scale = m.scale;
  cfg.sink_tokens = opt.sinks;
  cfg.window_tokens = opt.window;
  cfg.top_k = opt.top_k;
  cfg.index_kind = opt.index;
  cfg.search_effort = efforts[0];
  cfg.worker_threads = opt.threads;
  cfg.record_attended = 1;
  cfg.group_search = opt.group_search ? 1 : 0;
  ApplyClusterOptions(opt.cluster, &cfg);
  std::string error;
  kvrt_runtime* rt = nullptr;
  if (Check(kvrt_runtime_create(&cfg, &rt), "kvrt_runtime_create", &error) != KVRT_OK)
    return absl::InvalidArgumentError(error);
  std::unique_ptr<kvrt_runtime, void (*)(kvrt_runtime*)> guard(rt, kvrt_runtime_destroy);
  kvrt_seq_id seq = 0;
  if (Check(kvrt_seq_create(rt, &seq), "kvrt_seq_create", &error) != KVRT_OK)
    return absl::InternalError(error);

  const std::size_t es = DTypeSize(m.dtype);
  const std::size_t qrow = static_cast<std::size_t>(H) * d * es,
                    kvrow = static_cast<std::size_t>(G) * d * es;
  const std::size_t n_heads = static_cast<std::size_t>(m.num_layers) * H;
  std::vector<EffortAcc> acc(efforts.size());
  for (auto& a : acc) a.heads.resize(n_heads);
  std::vector<SelectionReuse> reuse(efforts.size(), SelectionReuse(H, G));
  std::vector<double> append_us;
  int streaming_heads = 0;
  double prefill_ms = 0;
  std::vector<float> out(static_cast<std::size_t>(H) * d);
  std::vector<int64_t> ids;
  kvrt_stats before = kvrt_stats_init(), after = kvrt_stats_init();
  for (int layer = 0; layer < m.num_layers; ++layer) {
    auto kv = LoadLayer(t, layer, steps);
    if (!kv.ok()) return kv.status();
    auto pq = t.Tensor(layer, "prefill.q");
    auto pk = t.Tensor(layer, "prefill.k");
    auto pv = t.Tensor(layer, "prefill.v");
    auto dq = t.Tensor(layer, "decode.q");
    auto dk = t.Tensor(layer, "decode.k");
    auto dv = t.Tensor(layer, "decode.v");
    for (auto* s : {&pq, &pk, &pv, &dq, &dk, &dv})
      if (!s->ok()) return s->status();
    // GPU-tier mass per head from the prompt: cheap, always reported.
    const auto share =
        TierMassFromPrompt(m, *kv, *pq, opt.sinks, opt.window, opt.calibration_queries);
    for (int h = 0; h < H; ++h) {
      const bool streaming = opt.streaming_threshold > 0 && share[h] >= opt.streaming_threshold;
      for (auto& a : acc) {
        auto& hr = a.heads[static_cast<std::size_t>(layer) * H + h];
        hr.layer = layer;
        hr.head = h;
        hr.tier_mass_calibration = share[h];
        hr.streaming = streaming;
      }
      if (streaming) {
        ++streaming_heads;
        if (Check(kvrt_set_head_policy(rt, layer, h, KVRT_HEAD_STREAMING), "kvrt_set_head_policy",
                  &error) != KVRT_OK)
          return absl::InternalError(error);
      }
    }
    auto t0 = Clock::now();
    if (m.prompt_tokens > 0 &&
        Check(kvrt_prefill(rt, seq, layer, pq->data, pk->data, pv->data, m.prompt_tokens),
              "kvrt_prefill", &error) != KVRT_OK)
      return absl::InternalError(error);
    // The prefill's time is until its index is built (a background job since 0.3.28), which the
    // first append would otherwise wait for inside its own latency.
    if (Check(kvrt_seq_wait(rt, seq), "kvrt_seq_wait", &error) != KVRT_OK)
      return absl::InternalError(error);
    prefill_ms += Micros(t0, Clock::now()) / 1000.0;
    for (auto& a : acc) {
      a.layer_recall.push_back(0);
      a.layer_mass.push_back(0);
      a.layer_err.push_back(0);
    }
    for (int step = 0; step < steps; ++step) {
      auto* k = static_cast<const unsigned char*>(dk->data) + step * kvrow;
      auto* v = static_cast<const unsigned char*>(dv->data) + step * kvrow;
      auto a0 = Clock::now();
      if (Check(kvrt_append(rt, seq, layer, k, v, 1), "kvrt_append", &error) != KVRT_OK)
        return absl::InternalError(error);
      append_us.push_back(Micros(a0, Clock::now()));
      const int64_t n = m.prompt_tokens + step + 1;
      std::vector<uint8_t> mark(n, 0);
      std::vector<float> q(d);
      // Every effort attends to the same state: one build, one pass over the steps.
      for (std::size_t e = 0; e < efforts.size(); ++e) {
        auto& a = acc[e];
        if (efforts.size() > 1 && Check(kvrt_set_search_effort(rt, efforts[e]),
                                        "kvrt_set_search_effort", &error) != KVRT_OK)
          return absl::InvalidArgumentError(error);
        kvrt_get_stats(rt, &before);
        auto b0 = Clock::now();
        if (Check(
                kvrt_attend(rt, seq, layer,
                            static_cast<const unsigned char*>(dq->data) + step * qrow, out.data()),
                "kvrt_attend", &error) != KVRT_OK)
          return absl::InternalError(error);
        a.attend_us.push_back(Micros(b0, Clock::now()));
        kvrt_get_stats(rt, &after);
        a.scored += after.keys_scored - before.keys_scored;
        a.read += after.keys_read - before.keys_read;
        a.searchable += after.cold_keys_searchable - before.cold_keys_searchable;
        a.attended += after.cold_tokens_attended - before.cold_tokens_attended;
        a.cold_attended +=
            static_cast<double>(after.cold_tokens_attended - before.cold_tokens_attended) / H;
        reuse[e].BeginStep(layer, step, std::min<int64_t>(opt.sinks, n),
                           std::max<int64_t>(0, n - opt.window));
        for (int h = 0; h < H; ++h) {
          const int g = h / group;
          const std::size_t at = ref.at(layer, step, h);
          int64_t count = 0;
          if (Check(kvrt_get_attended(rt, seq, layer, h, nullptr, 0, &count), "kvrt_get_attended",
                    &error) != KVRT_OK)
            return absl::InternalError(error);
          ids.resize(count);
          kvrt_get_attended(rt, seq, layer, h, ids.data(), count, &count);
          reuse[e].AddHead(h, ids.data(), count);
          ConvertToF32(static_cast<const unsigned char*>(dq->data) + step * qrow + h * d * es,
                       m.dtype, d, q.data());
          const HeadRows rows{kv->k.data() + g * d, kv->v.data() + g * d,
                              static_cast<int64_t>(G) * d, n};
          HeadAccuracy ha;
          if (auto st = ScoreHead(q.data(), rows, d, scale, ref.o.data() + at * d, ref.lse[at],
                                  ref.top_ids.data() + at * ref.top_k,
                                  std::min<int64_t>(opt.top_k, n), ids.data(), count, &out[h * d],
                                  &mark, &ha);
              !st.ok())
            return absl::InternalError(absl::StrCat("replay: ", st.message(), " (layer ", layer,
                                                    ", step ", step, ", head ", h, ")"));
          const double err = ha.error, recall = ha.recall, mass = ha.mass;
          float est_lse = -std::numeric_limits<float>::infinity();
          if (Check(kvrt_get_estimate_lse(rt, seq, layer, h, &est_lse), "kvrt_get_estimate_lse",
                    &error) != KVRT_OK)
            return absl::InternalError(error);
          if (std::isfinite(est_lse)) {
            const double est = std::exp(static_cast<double>(est_lse) - ref.lse[at]);
            const double missed = std::max(0.0, 1.0 - mass);
            a.est_mass.push_back(est);
            a.missed_mass.push_back(missed);
            if (est > 0 && missed > 1e-9) a.est_log_ratio.push_back(std::log(est / missed));
          }
          a.errors.push_back(err);
          a.recalls.push_back(recall);
          a.masses.push_back(mass);
          a.layer_recall.back() += recall;
          a.layer_mass.back() += mass;
          a.layer_err.back() += err;
          auto& hr = a.heads[static_cast<std::size_t>(layer) * H + h];
          hr.recall += recall / steps;
          hr.mass += mass / steps;
          hr.error_mean += err / steps;
        }
        reuse[e].EndStep();
      }
      if (step + 1 == steps || step % 16 == 0)
        bar.Update(layer + 1 == m.num_layers && step + 1 == steps,
                   "replay [%s]: layer %d/%d step %d/%d   ", IndexKindOptionName(opt.index),
                   layer + 1, m.num_layers, step + 1, steps);
    }
    const double cells = std::max(1, steps * H);
    for (auto& a : acc) {
      a.layer_recall.back() /= cells;
      a.layer_mass.back() /= cells;
      a.layer_err.back() /= cells;
    }
  }
  bar.Finish();
  kvrt_get_stats(rt, &after);
  std::vector<ReplayReport> reports;
  for (std::size_t e = 0; e < efforts.size(); ++e) {
    const auto& a = acc[e];
    ReplayReport r;
    r.trace = t.path();
    r.index = IndexKindOptionName(opt.index);
    r.group_search = opt.group_search;
    r.layers = m.num_layers;
    r.q_heads = H;
    r.kv_heads = G;
    r.head_dim = d;
    r.sinks = opt.sinks;
    r.window = opt.window;
    r.top_k = opt.top_k;
    r.effort = efforts[e];
    char search[512];
    if (kvrt_set_search_effort(rt, efforts[e]) == KVRT_OK &&
        kvrt_runtime_describe_search(rt, search, sizeof search) == KVRT_OK)
      r.search = search;
    r.steps = steps;
    r.prompt_tokens = m.prompt_tokens;
    r.recall_at_k = Mean(a.recalls);
    r.mass_recall = Mean(a.masses);
    r.output_rel_error_mean = Mean(a.errors);
    r.output_rel_error_p99 = Percentile(a.errors, 0.99);
    r.output_rel_error_max =
        a.errors.empty() ? 0 : *std::max_element(a.errors.begin(), a.errors.end());
    r.scanned_fraction = a.searchable > 0 ? static_cast<double>(a.scored) / a.searchable : 0.0;
    r.read_fraction = a.searchable > 0 ? static_cast<double>(a.read) / a.searchable : 0.0;
    r.retrieved_fraction =
        a.searchable > 0 ? static_cast<double>(a.attended) / a.searchable : 0.0;
    r.estimate_samples = static_cast<int64_t>(a.est_mass.size());
    r.estimated_mass = Mean(a.est_mass);
    r.estimate_missed_mass = Mean(a.missed_mass);
    r.estimate_log_ratio = Mean(a.est_log_ratio);
    r.head_step_reuse = reuse[e].head_step_reuse();
    r.kv_step_reuse = reuse[e].kv_step_reuse();
    r.layer_reuse = reuse[e].layer_reuse();
    r.latency_us_p50 = Percentile(a.attend_us, 0.50);
    r.latency_us_p99 = Percentile(a.attend_us, 0.99);
    r.append_us_p50 = Percentile(append_us, 0.50);
    r.prefill_ms_per_layer = prefill_ms / std::max(1, m.num_layers);
    r.cold_tokens_attended_per_head =
        a.attend_us.empty() ? 0 : a.cold_attended / a.attend_us.size();
    r.gpu_bytes = after.gpu_bytes;
    r.host_bytes = after.host_bytes;
    r.index_bytes = after.index_bytes;
    r.cold_tokens = after.host_tokens / std::max(1, m.num_layers);
    r.layer_recall = a.layer_recall;
    r.layer_mass = a.layer_mass;
    r.layer_error_mean = a.layer_err;
    r.streaming_heads = streaming_heads;
    r.heads = a.heads;
    reports.push_back(std::move(r));
  }
  return reports;
}

absl::StatusOr<ReplayReport> RunReplay(const trace::TraceReader& t, const ExactReference& ref,
                                       const ReplayOptions& opt) {
  auto reports = RunReplaySweep(t, ref, opt, {opt.effort});
  if (!reports.ok()) return reports.status();
  return std::move(reports->front());
}

}  // namespace kvrt::cli
