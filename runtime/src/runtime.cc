#include "kvrt_runtime/runtime.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "arena_capture_mode.h"
#include "cpu_binding.h"
#include "device_tier.h"
#include "head_pad.h"
#include "kvrt_common/finite_bits.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/kind_table.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/code_rest.h"
#include "kvrt_gpu/kernel_types.h"
#include "layer_state.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"

namespace kvrt::runtime {

class Sequence {
 public:
  Sequence(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* gpu) {
    layers.reserve(config->num_layers);
    for (int l = 0; l < config->num_layers; ++l) layers.emplace_back(config, counters, gpu);
  }
  std::mutex mu;  // serialises calls on this sequence
  std::vector<LayerState> layers;
  bool released = false;  // guarded by mu: its layers were released (ReleaseSequence)
};

namespace {
// A call that found the sequence before a concurrent release and locked it after (the caller's
// race, kvrt.h) fails as a released one, instead of running on released layers.
absl::Status Live(const Sequence& seq, int64_t id) {
  if (!seq.released) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("sequence ", id, " does not exist or was released"));
}
}  // namespace

struct Runtime::Impl {
  explicit Impl(int threads) : arena(threads) {}
  tbb::task_arena arena;
  // config.worker_cpu_count > 0: pins the arena's workers. Declared after the arena, so it is
  // destroyed first, once the sequences (their background jobs) are gone.
  std::unique_ptr<ArenaCpuBinding> cpu_binding;
  // GPU backend: the arena's threads in the relaxed capture mode (arena_capture_mode.h).
  std::unique_ptr<ArenaCaptureMode> capture_mode;
  Counters counters;
  std::unique_ptr<GpuContext> gpu;  // GPU backend only; outlives the sequences (declared first)
  // NOTE: std::mutex rather than absl::Mutex: Debian's Abseil is not built with TSan, so TSan
  // cannot see absl::Mutex and reports every access it guards as a race.
  mutable std::mutex mu;
  absl::flat_hash_map<int64_t, std::shared_ptr<Sequence>> sequences;  // guarded by mu
  int64_t next_id = 0;                                                // guarded by mu
  std::vector<uint8_t> streaming;  // [layers, q_heads]: 1 = streaming head (GPU tier only)
  // The caller's head_dim to the layers' (a no-op unless the GPU backend pads it).
  HeadPad pad{0, 0, DType::kF32};
};

namespace {

absl::Status Range(const char* field, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi)
    return absl::InvalidArgumentError(
        absl::StrCat("config.", field, " = ", value, " is out of range [", lo, ", ", hi, "]"));
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateConfig(const RuntimeConfig& c) {
  KVRT_RETURN_IF_ERROR(Range("num_layers", c.num_layers, 1, 4096));
  KVRT_RETURN_IF_ERROR(Range("num_kv_heads", c.num_kv_heads, 1, 1024));
  KVRT_RETURN_IF_ERROR(Range("num_q_heads", c.num_q_heads, 1, 4096));
  if (c.num_q_heads % c.num_kv_heads != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("config.num_q_heads = ", c.num_q_heads,
                     " is not a multiple of config.num_kv_heads = ", c.num_kv_heads));
  KVRT_RETURN_IF_ERROR(Range("head_dim", c.head_dim, 1, 1024));
  if (c.dtype != DType::kF32 && c.dtype != DType::kF16 && c.dtype != DType::kBF16)
    return absl::InvalidArgumentError(
        absl::StrCat("config.dtype = ", static_cast<int>(c.dtype), " is not f32, f16 or bf16"));
  if (!std::isfinite(c.scale) || c.scale < 0.f)
    return absl::InvalidArgumentError(absl::StrCat(
        "config.scale = ", c.scale, " must be finite and >= 0 (0 = 1/sqrt(head_dim))"));
  KVRT_RETURN_IF_ERROR(Range("sink_tokens", c.sink_tokens, 0, 1 << 20));
  KVRT_RETURN_IF_ERROR(Range("window_tokens", c.window_tokens, 1, 1 << 24));
  KVRT_RETURN_IF_ERROR(Range("top_k", c.top_k, 1, kMaxTopK));
  KVRT_RETURN_IF_ERROR(
      Range("index_kind", static_cast<int>(c.index_kind), 0, cpu_index::kNumIndexKinds - 1));
  KVRT_RETURN_IF_ERROR(Range("search_effort", c.search_effort, 0, kMaxSearchEffort));
  // NOTE: no upper bound: values above the hardware thread count are clamped to it (Create), as
  // kvrt.h says; only negative counts are errors.
  KVRT_RETURN_IF_ERROR(Range("worker_threads", c.worker_threads, 0, INT32_MAX));
  KVRT_RETURN_IF_ERROR(Range("worker_cpu_first", c.worker_cpu_first, 0, INT32_MAX));
  KVRT_RETURN_IF_ERROR(Range("worker_cpu_count", c.worker_cpu_count, 0, INT32_MAX));
  KVRT_RETURN_IF_ERROR(Range("cold_attention", c.cold_attention, 0, 2));
  if (!(c.hot_cache_fraction >= 0.f && c.hot_cache_fraction <= 1.f))
    return absl::InvalidArgumentError(
        absl::StrCat("config.hot_cache_fraction = ", c.hot_cache_fraction, " must be in [0, 1]"));
  const float budget = c.index.cluster.budget_fraction;
  if (!(budget > 0.f && budget <= 1.f))
    return absl::InvalidArgumentError(
        absl::StrCat("config.cluster_budget_fraction = ", budget, " must be in (0, 1]"));
  const int keys = c.index.cluster.cluster_size;
  if (keys < 2 || keys > 256)
    return absl::InvalidArgumentError(absl::StrCat(
        "config.cluster_keys = ", keys, " is out of range [2, 256] (0 means the default, 16)"));
  const float rescore = c.index.cluster.rescore;
  if (!(rescore >= 0.f && rescore <= 64.f))  // NaN fails too
    return absl::InvalidArgumentError(
        absl::StrCat("config.cluster_rescore = ", rescore, " must be in [0, 64] (0 or 1: off)"));
  const int bits = c.index.cluster.rescore_bits;
  if (bits != 0 && !cpu_index::ValidCodeBits(bits))
    return absl::InvalidArgumentError(
        absl::StrCat("config.cluster_rescore_bits = ", bits, " must be 0 (keys), 1, 2, 4 or 8"));
  const int value_bits = c.index.cluster.value_bits;
  if (value_bits != 0 && !cpu_index::ValidCodeBits(value_bits))
    return absl::InvalidArgumentError(absl::StrCat("config.cluster_value_bits = ", value_bits,
                                                   " must be 0 (value means), 1, 2, 4 or 8"));
  if (value_bits != 0 && !cpu_index::SelectsOnCodes(c.index.cluster))
    return absl::InvalidArgumentError(absl::StrCat(
        "config.cluster_value_bits = ", value_bits,
        " needs the selection on codes: cluster_rescore_bits 1-8 with cluster_rescore 0 or 1 (got ",
        c.index.cluster.rescore_bits, " and ", c.index.cluster.rescore, ")"));
  const float top_p = c.index.cluster.top_p;
  if (!(top_p >= 0.f && top_p <= 1.f))
    return absl::InvalidArgumentError(
        absl::StrCat("config.cluster_top_p = ", top_p, " must be in [0, 1]"));
  const float miss_penalty = c.index.cluster.miss_penalty;
  if (!(miss_penalty >= 0.f && miss_penalty <= 64.f))  // NaN fails too
    return absl::InvalidArgumentError(absl::StrCat("config.cluster_miss_penalty = ", miss_penalty,
                                                   " must be finite and in [0, 64] (0 = off)"));
  KVRT_RETURN_IF_ERROR(Range("cuda_device", c.cuda_device, -1, 1 << 16));
  KVRT_RETURN_IF_ERROR(Range("host_memory_limit", c.host_memory_limit, 0, INT64_MAX));
  KVRT_RETURN_IF_ERROR(Range("gpu_memory_limit", c.gpu_memory_limit, 0, INT64_MAX));
  return absl::OkStatus();
}

Runtime::Runtime(const RuntimeConfig& config) : config_(config) {}
Runtime::~Runtime() {
  // The sequences' device buffers, streams and events go on the runtime's device.
  transfer::CudaCallScope on_device(config_.call_device());
  impl_.reset();
}

namespace {
// use_gpu: 1 needs a CUDA device and a shape the GPU kernels support; -1 takes the GPU when both
// hold, else the host backend. Creates the runtime's CUDA resources.
absl::Status ResolveGpuBackend(RuntimeConfig* c, std::unique_ptr<GpuContext>* gpu) {
  if (c->use_gpu < -1 || c->use_gpu > 1)
    return absl::InvalidArgumentError(
        absl::StrCat("config.use_gpu = ", c->use_gpu, " must be -1, 0 or 1"));
  if (c->use_gpu == 0) return absl::OkStatus();
  const bool want = c->use_gpu == 1;
  c->use_gpu = 0;
  if (c->values_are_keys) {
    if (!want) return absl::OkStatus();
    return absl::InvalidArgumentError(
        "config.use_gpu = 1: config.values_are_keys = 1 runs on the host backend only; use 0 or "
        "-1 (the host backend then)");
  }
  if (!transfer::CudaAvailable()) {
    if (!want) return absl::OkStatus();
    return absl::UnimplementedError(
        "config.use_gpu = 1: no CUDA device is available (or kvrt was built without CUDA); use 0 "
        "(host backend) or -1 (GPU when available)");
  }
  // A head_dim the kernels do not take runs padded to the next width they do (head_pad.h).
  const int d = c->head_dim, width = HeadPad::WidthFor(d);
  if (width == 0) {
    if (!want) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("config.use_gpu = 1: the GPU backend takes head_dim up to 256 (head_dim ", d,
                     "); use 0 (host backend) or -1 (GPU when the shape allows)"));
  }
  const int devices = transfer::DeviceCount();
  if (c->cuda_device >= devices) {
    if (!want) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("config.cuda_device = ", c->cuda_device, ": ",
                                                   devices, " CUDA device(s) are visible"));
  }
  if (c->cuda_device < 0) c->cuda_device = transfer::CurrentDevice();
  transfer::CudaCallScope on_device(c->cuda_device);  // streams and pools belong to it
  KVRT_ASSIGN_OR_RETURN(*gpu, GpuContext::Create());
  c->use_gpu = 1;
  // The index's metric (and the clusters' spreads) over the caller's dims, not the zeros.
  if (width != d) c->index.cluster.active_dim = d;
  c->head_dim = width;
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(const RuntimeConfig& config) {
  KVRT_RETURN_IF_ERROR(ValidateConfig(config));
  // Its CUDA calls (the device's properties, the context's streams and pools) may meet a
  // caller's capture on another thread too.
  transfer::CudaCallScope calls(config.use_gpu != 0 ? transfer::CurrentDevice() : -1);
  RuntimeConfig effective = config;
  if (effective.scale == 0.f)
    effective.scale = 1.f / std::sqrt(static_cast<float>(config.head_dim));
  // A two-level kind's estimate is an attention state: it needs the runtime's scale.
  effective.index.cluster.scale = effective.scale;
  // The GPU's selection kernels (and so the direct step, which needs them) do not rescore: a
  // two-stage selection is the CPU's.
  // Nor does the GPU's scan of codes (gpu::CodeClusterMass) take a head_dim that is not whole
  // 32-channel words, nor its rest from value codes (gpu::CodeValueRest) a shape outside
  // gpu::CodeValueRestTakes': the selection on codes stays the CPU's there.
  const int value_bits = effective.index.cluster.value_bits;
  const bool value_rest_on_gpu = gpu::CodeValueRestTakes(
      value_bits, config.head_dim, config.num_q_heads / std::max(config.num_kv_heads, 1));
  const bool codes_off_gpu = cpu_index::SelectsOnCodes(effective.index.cluster) &&
                             (config.head_dim % 32 != 0 || (value_bits > 0 && !value_rest_on_gpu));
  // The GPU's cluster selection takes at most gpu::kClusterMaxGroup q heads per kv head (an MQA
  // model's 32 or 48 do not fit its kernels); wider groups select on the CPU and attend the tier
  // on the GPU.
  const bool group_off_gpu =
      config.num_kv_heads > 0 && config.num_q_heads / config.num_kv_heads > gpu::kClusterMaxGroup;
  // The host's products on the AMX tiles for wide groups (cpu_index::UseHostTiles): one choice
  // for every call of this runtime, so that its results do not depend on how heads are grouped.
  effective.index.host_tiles =
      cpu_index::UseHostTiles(config.num_q_heads / std::max(config.num_kv_heads, 1));
  if (effective.index.cluster.rescore > 1.f || codes_off_gpu || group_off_gpu) {
    effective.index.cluster.gpu_select = false;
    effective.direct_step = false;
  }
  // NOTE: clamped to the hardware threads: more would only oversubscribe, and oneTBB prints a
  // warning when an arena asks for more workers than exist (a library must not print).
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const bool bound = effective.worker_cpu_count > 0;
  if (bound) {
    KVRT_RETURN_IF_ERROR(CheckCpuRange(effective.worker_cpu_first, effective.worker_cpu_count));
    if (effective.worker_threads == 0) effective.worker_threads = effective.worker_cpu_count;
  }
  if (effective.worker_threads == 0 || effective.worker_threads > hw) effective.worker_threads = hw;
  std::unique_ptr<Runtime> rt(new Runtime(effective));
  rt->impl_ = std::make_unique<Impl>(effective.worker_threads);
  if (bound) {
    rt->impl_->cpu_binding = std::make_unique<ArenaCpuBinding>(
        rt->impl_->arena, effective.worker_cpu_first, effective.worker_cpu_count);
  }
  KVRT_RETURN_IF_ERROR(ResolveGpuBackend(&rt->config_, &rt->impl_->gpu));
  if (rt->impl_->gpu)
    rt->impl_->capture_mode = std::make_unique<ArenaCaptureMode>(rt->impl_->arena);
  rt->api_config_ = rt->config_;
  rt->api_config_.head_dim = effective.head_dim;
  rt->impl_->pad = HeadPad(effective.head_dim, rt->config_.head_dim, effective.dtype);
  rt->impl_->streaming.assign(
      static_cast<std::size_t>(effective.num_layers) * effective.num_q_heads, 0);
  return rt;
}

absl::StatusOr<int64_t> Runtime::CreateSequence() {
  transfer::CudaCallScope on_device(config_.call_device());  // the layers' device state
  auto seq = std::make_shared<Sequence>(&config_, &impl_->counters, impl_->gpu.get());
  std::lock_guard<std::mutex> lock(impl_->mu);
  const int64_t id = impl_->next_id++;
  impl_->sequences.emplace(id, std::move(seq));
  return id;
}

absl::Status Runtime::ReleaseSequence(int64_t id) {
  // Before `seq`: the last reference may be this one, and the sequence's destructor frees device
  // memory too (in the relaxed capture mode, beside a caller's capture on another thread).
  transfer::CudaCallScope on_device(config_.call_device());
  std::shared_ptr<Sequence> seq;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->sequences.find(id);
    if (it == impl_->sequences.end())
      return absl::NotFoundError(absl::StrCat("sequence ", id, " does not exist or was released"));
    seq = std::move(it->second);
    impl_->sequences.erase(it);
  }
  std::lock_guard<std::mutex> lock(seq->mu);  // waits for a call in flight on this sequence
  for (auto& layer : seq->layers) layer.Release();
  seq->released = true;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Sequence>> Runtime::Find(int64_t id, int layer) const {
  if (layer < 0 || layer >= config_.num_layers)
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is out of range [0, ", config_.num_layers, ")"));
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->sequences.find(id);
  if (it == impl_->sequences.end())
    return absl::NotFoundError(absl::StrCat("sequence ", id, " does not exist or was released"));
  return it->second;
}

absl::Status Runtime::WaitSequence(int64_t id) {
  transfer::CudaCallScope on_device(config_.call_device());  // before seq: as ReleaseSequence
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, 0));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  for (auto& layer : seq->layers) KVRT_RETURN_IF_ERROR(layer.SettleCold());
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Runtime::SequenceLength(int64_t id, int layer) const {
  // Before `seq`, in every getter: a ReleaseSequence racing this call may leave the last
  // reference here, and the sequence's destructor makes CUDA calls (as in ReleaseSequence).
  transfer::CudaCallScope on_device(config_.call_device());
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  return seq->layers[layer].length();
}

namespace {
absl::Status CheckTokens(const char* what, int64_t n, int64_t length, bool allow_zero) {
  if (n < (allow_zero ? 0 : 1))
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": n_tokens = ", n, " must be >= ", allow_zero ? 0 : 1));
  if (n > kMaxTokens || length + n > kMaxTokens)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", length, " + ", n, " tokens exceeds the limit of ", kMaxTokens));
  return absl::OkStatus();
}
}  // namespace

namespace {
absl::Status CheckExec(const RuntimeConfig& c, const Exec& exec, const char* what) {
  if (exec.device && c.use_gpu != 1)
    return absl::UnimplementedError(absl::StrCat(
        what,
        ": device pointers need the GPU backend (config.use_gpu = 1 on a machine with a CUDA "
        "device); this runtime uses the host backend"));
  // NOTE: refused before any work is enqueued: a call synchronises with the CPU (q for the
  // selection, the prefill's staging, events on kvrt's own streams), which would invalidate the
  // caller's capture half-way. Checked on the caller's stream only.
  if (exec.device && transfer::StreamIsCapturing(exec.stream))
    return absl::FailedPreconditionError(absl::StrCat(
        what,
        ": cuda_stream is being captured into a CUDA graph; kvrt's calls wait for the CPU "
        "side of a step and cannot be captured: call kvrt between captured segments (kvrt.h, "
        "\"CUDA graphs\")"));
  return absl::OkStatus();
}

// Index of the first NaN/Inf of count elements, or count: chunks in parallel on the runtime's
// workers past a few MiB (a 32K prompt's q at 16 heads of 576 is 600 MB: read by the calling
// thread alone, the other cores waited for it).
std::size_t FirstNonFiniteParallel(const void* data, std::size_t count, DType dtype,
                                   tbb::task_arena& arena) {
  constexpr std::size_t kChunk = std::size_t{1} << 20;
  if (count <= kChunk) return FirstNonFinite(data, count, dtype);
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::size_t chunks = (count + kChunk - 1) / kChunk;
  std::atomic<std::size_t> first{count};
  arena.execute([&] {
    tbb::parallel_for(std::size_t{0}, chunks, [&](std::size_t c) {
      const std::size_t begin = c * kChunk;
      if (begin >= first.load(std::memory_order_relaxed)) return;  // an earlier one is known
      const std::size_t len = std::min(kChunk, count - begin);
      const std::size_t at = FirstNonFinite(bytes + begin * DTypeSize(dtype), len, dtype);
      if (at == len) return;
      std::size_t seen = first.load(std::memory_order_relaxed);
      while (begin + at < seen && !first.compare_exchange_weak(seen, begin + at)) {
      }
    });
  });
  return first.load();
}

// With check_finite, names the first NaN/Inf of a [n, heads, head_dim] tensor; its rows are
// `row` (a sampled prefill's q rows are not the prompt's tokens).
absl::Status CheckFinite(const RuntimeConfig& c, tbb::task_arena& arena, const char* what,
                         const void* data, int64_t n, int heads, const char* row = "token") {
  if (!c.check_finite || data == nullptr) return absl::OkStatus();
  const std::size_t count = static_cast<std::size_t>(n) * heads * c.head_dim;
  const std::size_t at = FirstNonFiniteParallel(data, count, c.dtype, arena);
  if (at == count) return absl::OkStatus();
  const std::size_t r = at / c.head_dim;
  return absl::InvalidArgumentError(absl::StrCat(what, " holds a non-finite value at ", row, " ",
                                                 r / heads, ", head ", r % heads, ", element ",
                                                 at % c.head_dim, " (config.check_finite = 1)"));
}
}  // namespace

QuerySample PromptQuerySample(const RuntimeConfig& config, int64_t n) {
  if (n < 1 || !cpu_index::KindInfo(config.index_kind).uses_queries) return {};
  const int group = config.num_q_heads / config.num_kv_heads;
  const int64_t cap = std::max(1, config.index.graph_query_sample);
  const int64_t most = std::min<int64_t>(n, std::max<int64_t>(1, cap / group));
  // The stride rounded up, so the rows reach the prompt's end: a floored one left the tail out
  // (2000 rows of at most 1024: stride 1, rows 0-1023, the first half only).
  // 1 + (n - 1) / x is ceil(n / x) without the overflow of n + x - 1 near INT64_MAX.
  const int64_t stride = 1 + (n - 1) / most;
  return {1 + (n - 1) / stride, stride};
}

absl::Status Runtime::Prefill(int64_t id, int layer, const void* q, int64_t n_queries,
                              const void* k, const void* v, int64_t n, const Exec& exec) {
  transfer::CudaCallScope on_device(config_.call_device());
  if (config_.values_are_keys) v = k;  // not read (kvrt.h): may be NULL
  if (k == nullptr || v == nullptr)
    return absl::InvalidArgumentError("prefill: k and v must not be NULL");
  KVRT_RETURN_IF_ERROR(CheckExec(config_, exec, "prefill"));
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  KVRT_RETURN_IF_ERROR(CheckTokens("prefill", n, seq->layers[layer].length(), false));
  // After the checks kvrt_prefill has always made, in their order (tests/fuzz holds them to it):
  // there n_queries is n, valid once n is.
  if (n_queries < 0 || n_queries > n)
    return absl::InvalidArgumentError(
        absl::StrCat("prefill: n_queries = ", n_queries, " must be in [0, n_tokens = ", n, "]"));
  if (n_queries > 0 && q == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat("prefill: q is NULL with n_queries = ", n_queries));
  if (n_queries == 0) q = nullptr;
  // NOTE: check_finite reads host memory; device tensors are not checked (documented in kvrt.h).
  const bool host = !exec.device;
  {
    KVRT_SPAN("prefill_check");
    KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "prefill: q", host ? q : nullptr,
                                     n_queries, config_.num_q_heads,
                                     n_queries == n ? "token" : "query row"));
    KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "prefill: k", host ? k : nullptr, n,
                                     config_.num_kv_heads));
    KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "prefill: v",
                                     host && v != k ? v : nullptr, n, config_.num_kv_heads));
  }
  if (!impl_->pad.on())
    return seq->layers[layer].Prefill(q, n_queries, k, v, n, impl_->arena, exec);
  PaddedCall padded;
  KVRT_RETURN_IF_ERROR(impl_->pad.In({{q, n_queries * config_.num_q_heads},
                                      {k, n * config_.num_kv_heads},
                                      {v, n * config_.num_kv_heads}},
                                     0, exec, &padded));
  return seq->layers[layer].Prefill(padded.in(0), n_queries, padded.in(1), padded.in(2), n,
                                    impl_->arena, exec);
}

absl::Status Runtime::Append(int64_t id, int layer, const void* k, const void* v, int64_t n,
                             const Exec& exec) {
  transfer::CudaCallScope on_device(config_.call_device());
  if (config_.values_are_keys) v = k;  // not read (kvrt.h): may be NULL
  if (k == nullptr || v == nullptr)
    return absl::InvalidArgumentError("append: k and v must not be NULL");
  KVRT_RETURN_IF_ERROR(CheckExec(config_, exec, "append"));
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  KVRT_RETURN_IF_ERROR(CheckTokens("append", n, seq->layers[layer].length(), false));
  const bool host = !exec.device;
  KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "append: k", host ? k : nullptr, n,
                                   config_.num_kv_heads));
  KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "append: v",
                                   host && v != k ? v : nullptr, n, config_.num_kv_heads));
  if (!impl_->pad.on()) return seq->layers[layer].Append(k, v, n, impl_->arena, exec);
  PaddedCall padded;
  KVRT_RETURN_IF_ERROR(impl_->pad.In({{k, n * config_.num_kv_heads}, {v, n * config_.num_kv_heads}},
                                     0, exec, &padded));
  return seq->layers[layer].Append(padded.in(0), padded.in(1), n, impl_->arena, exec);
}

absl::Status Runtime::Attend(int64_t id, int layer, const void* q, float* out, const Exec& exec,
                             float* lse) {
  transfer::CudaCallScope on_device(config_.call_device());
  if (q == nullptr || out == nullptr)
    return absl::InvalidArgumentError("attend: q and out must not be NULL");
  KVRT_RETURN_IF_ERROR(CheckExec(config_, exec, "attend"));
  KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "attend: q",
                                   exec.device ? nullptr : q, 1, config_.num_q_heads));
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  const uint8_t* streaming =
      impl_->streaming.data() + static_cast<std::size_t>(layer) * config_.num_q_heads;
  if (!impl_->pad.on())
    return seq->layers[layer].Attend(q, out, impl_->arena, streaming, exec, lse);
  PaddedCall padded;
  KVRT_RETURN_IF_ERROR(
      impl_->pad.In({{q, config_.num_q_heads}}, config_.num_q_heads, exec, &padded));
  // lse has no head_dim: the layer writes the caller's directly.
  KVRT_RETURN_IF_ERROR(
      seq->layers[layer].Attend(padded.in(0), padded.out(), impl_->arena, streaming, exec, lse));
  return impl_->pad.Out(padded, out, config_.num_q_heads, exec);
}

absl::Status Runtime::AttendBatch(const int64_t* ids, int n, int layer, const void* q, float* out,
                                  const Exec& exec, float* lse) {
  transfer::CudaCallScope on_device(config_.call_device());
  if (ids == nullptr || n <= 0 || q == nullptr || out == nullptr)
    return absl::InvalidArgumentError(
        "attend_batch: need n >= 1 sequences and non-NULL seqs, q and out");
  KVRT_RETURN_IF_ERROR(CheckExec(config_, exec, "attend_batch"));
  if (layer < 0 || layer >= config_.num_layers)  // an error of the whole call: nothing written
    return absl::InvalidArgumentError(absl::StrCat(
        "attend_batch: layer ", layer, " is out of range [0, ", config_.num_layers, ")"));
  KVRT_RETURN_IF_ERROR(CheckFinite(api_config_, impl_->arena, "attend_batch: q",
                                   exec.device ? nullptr : q, n, config_.num_q_heads, "batch row"));
  // Locked in id order, so two batches sharing sequences cannot deadlock; a repeated id would
  // deadlock on itself, hence the check.
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [ids](int a, int b) { return ids[a] < ids[b]; });
  for (int i = 1; i < n; ++i)
    if (ids[order[i]] == ids[order[i - 1]])
      return absl::InvalidArgumentError(
          absl::StrCat("attend_batch: sequence ", ids[order[i]], " is listed twice"));
  // One rule for every per-sequence error (kvrt.h): a sequence that is unknown fails like one
  // whose attend fails; its row stays untouched and the other rows are written.
  std::vector<std::shared_ptr<Sequence>> seqs(n);
  std::vector<absl::Status> status(n);
  for (int i = 0; i < n; ++i) {
    auto found = Find(ids[i], layer);
    if (found.ok()) {
      seqs[i] = std::move(*found);
    } else {
      status[i] = found.status();
    }
  }
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(n);
  for (int i : order)
    if (seqs[i]) locks.emplace_back(seqs[i]->mu);
  // (The released ones stay referenced: `locks` holds their mutexes.)
  for (int i = 0; i < n; ++i)
    if (seqs[i]) status[i] = Live(*seqs[i], ids[i]);
  // A padded head_dim (head_pad.h): the layers read and write the padded copies; the rows of the
  // sequences that succeed go back to the caller's out below.
  PaddedCall padded;
  float* const caller_out = out;
  if (impl_->pad.on()) {
    const int64_t rows = int64_t{n} * config_.num_q_heads;
    KVRT_RETURN_IF_ERROR(impl_->pad.In({{q, rows}}, rows, exec, &padded));
    q = padded.in(0);
    out = padded.out();
  }
  const std::size_t q_bytes =
      static_cast<std::size_t>(config_.num_q_heads) * config_.head_dim * DTypeSize(config_.dtype);
  const std::size_t out_floats = static_cast<std::size_t>(config_.num_q_heads) * config_.head_dim;
  const uint8_t* streaming =
      impl_->streaming.data() + static_cast<std::size_t>(layer) * config_.num_q_heads;
  // NOTE: the attends below run on the arena's workers; each first waits for its layer's
  // background index insert, which also needs a worker. Waiting here, on the caller's thread,
  // means no worker ever blocks on work queued behind it.
  for (auto& seq : seqs)
    if (seq && !seq->released) seq->layers[layer].SettleBackgroundWork();
  // One decode step for every known sequence (LayerState::Step: one GPU-tier launch and one
  // merge for all); unknown ones keep their NOT_FOUND and their rows.
  std::vector<int> known;
  for (int i = 0; i < n; ++i)
    if (seqs[i] && status[i].ok()) known.push_back(i);
  if (!known.empty()) {
    const bool contiguous = static_cast<int>(known.size()) == n;
    std::vector<LayerState*> layers;
    for (int i : known) layers.push_back(&seqs[i]->layers[layer]);
    std::vector<absl::Status> step_status(known.size());
    if (contiguous) {
      KVRT_RETURN_IF_ERROR(LayerState::Step(layers.data(), n, q, out, impl_->arena, streaming, exec,
                                            step_status.data(), lse));
    } else {
      // Run by run of known sequences, so that q and out stay the caller's (device) memory.
      for (std::size_t a = 0; a < known.size();) {
        std::size_t b = a + 1;
        while (b < known.size() && known[b] == known[b - 1] + 1) ++b;
        KVRT_RETURN_IF_ERROR(LayerState::Step(
            layers.data() + a, static_cast<int>(b - a),
            static_cast<const unsigned char*>(q) + known[a] * q_bytes, out + known[a] * out_floats,
            impl_->arena, streaming, exec, step_status.data() + a,
            lse != nullptr ? lse + known[a] * config_.num_q_heads : nullptr));
        a = b;
      }
    }
    for (std::size_t j = 0; j < known.size(); ++j) status[known[j]] = step_status[j];
  }
  if (impl_->pad.on()) {
    for (int i = 0; i < n; ++i) {
      if (!status[i].ok()) continue;  // its caller row stays untouched
      KVRT_RETURN_IF_ERROR(impl_->pad.Out(padded, caller_out, config_.num_q_heads, exec,
                                          int64_t{i} * config_.num_q_heads));
    }
  }
  for (int i = 0; i < n; ++i)
    if (!status[i].ok())
      return absl::Status(status[i].code(), absl::StrCat("attend_batch: sequence ", ids[i], ": ",
                                                         status[i].message()));
  return absl::OkStatus();
}

absl::Status Runtime::SetHeadStreaming(int layer, int q_head, bool streaming) {
  if (layer < 0 || layer >= config_.num_layers)
    return absl::InvalidArgumentError(absl::StrCat(
        "kvrt_set_head_policy: layer ", layer, " is out of range [0, ", config_.num_layers, ")"));
  if (q_head < 0 || q_head >= config_.num_q_heads)
    return absl::InvalidArgumentError(absl::StrCat("kvrt_set_head_policy: q_head ", q_head,
                                                   " is out of range [0, ", config_.num_q_heads,
                                                   ")"));
  impl_->streaming[static_cast<std::size_t>(layer) * config_.num_q_heads + q_head] =
      streaming ? 1 : 0;
  return absl::OkStatus();
}

absl::Status Runtime::SetSearchEffort(int effort) {
  if (effort < 0 || effort > kMaxSearchEffort)
    return absl::InvalidArgumentError(absl::StrCat("kvrt_set_search_effort: effort = ", effort,
                                                   " is out of range [0, ", kMaxSearchEffort, "]"));
  config_.search_effort = effort;
  api_config_.search_effort = effort;
  return absl::OkStatus();
}

absl::StatusOr<float> Runtime::GetEstimateLse(int64_t id, int layer, int q_head) const {
  KVRT_RETURN_IF_ERROR(Attended("get_estimate_lse", id, layer, q_head, nullptr));  // the same
  transfer::CudaCallScope on_device(config_.call_device());       // before seq: as SequenceLength
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  return seq->layers[layer].estimate_lse(q_head);
}

absl::Status Runtime::GetAttended(int64_t id, int layer, int q_head,
                                  std::vector<int64_t>* ids) const {
  return Attended("get_attended", id, layer, q_head, ids);
}

absl::Status Runtime::Attended(const char* what, int64_t id, int layer, int q_head,
                               std::vector<int64_t>* ids) const {
  if (!config_.record_attended)
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": the runtime was created with record_attended = 0"));
  if (q_head < 0 || q_head >= config_.num_q_heads)
    return absl::InvalidArgumentError(
        absl::StrCat("q_head ", q_head, " is out of range [0, ", config_.num_q_heads, ")"));
  transfer::CudaCallScope on_device(config_.call_device());  // before seq: as SequenceLength
  KVRT_ASSIGN_OR_RETURN(auto seq, Find(id, layer));
  std::lock_guard<std::mutex> lock(seq->mu);
  KVRT_RETURN_IF_ERROR(Live(*seq, id));
  const auto& state = seq->layers[layer];
  if (!state.has_attended())
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": no attend on sequence ", id, " layer ", layer, " yet"));
  if (ids != nullptr) *ids = state.attended(q_head);
  return absl::OkStatus();
}

RuntimeStats Runtime::Stats() const {
  RuntimeStats s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    s.sequences = static_cast<int64_t>(impl_->sequences.size());
  }
  const auto& c = impl_->counters;
  const int64_t token_bytes = int64_t{config_.rows_per_token()} * config_.num_kv_heads *
                              config_.head_dim * static_cast<int64_t>(DTypeSize(config_.dtype));
#define KVRT_LOAD_COUNTER_(name) s.name = c.name.load();
  KVRT_RUNTIME_COUNTERS(KVRT_LOAD_COUNTER_)
#undef KVRT_LOAD_COUNTER_
  s.gpu_bytes = s.gpu_tokens * token_bytes;
  s.host_bytes = s.host_tokens * token_bytes;
  return s;
}

}  // namespace kvrt::runtime
