// The C API: validates handles and pointers, converts between C and C++ types, maps absl::Status
// to kvrt_status and keeps the thread's last error. No exception crosses this boundary.
#include "kvrt.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvrt_cpu_index/kind_table.h"
#include "kvrt_runtime/runtime.h"

struct kvrt_runtime {
  std::unique_ptr<kvrt::runtime::Runtime> impl;
  kvrt_config config;  // effective values
  uint64_t magic;      // catches use of a destroyed or foreign handle where detectable
  // kvrt_runtime_config may run beside kvrt_set_search_effort (kvrt.h): its copy of `config`
  // and the setter's write of one field take this.
  mutable std::mutex config_mu{};
};

namespace {

constexpr uint64_t kLiveMagic = 0x6b7672742d6c6976ull;  // "kvrt-liv"
constexpr uint64_t kDeadMagic = 0x6b7672742d646561ull;  // "kvrt-dea"

thread_local std::string g_last_error;

kvrt_status Fail(kvrt_status code, std::string message) {
  g_last_error = std::move(message);
  return code;
}

kvrt_status FromStatus(const absl::Status& s) {
  if (s.ok()) return KVRT_OK;
  kvrt_status code = KVRT_ERR_INTERNAL;
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: code = KVRT_ERR_INVALID_ARGUMENT; break;
    case absl::StatusCode::kNotFound: code = KVRT_ERR_NOT_FOUND; break;
    case absl::StatusCode::kResourceExhausted: code = KVRT_ERR_OUT_OF_MEMORY; break;
    case absl::StatusCode::kFailedPrecondition: code = KVRT_ERR_FAILED_PRECONDITION; break;
    case absl::StatusCode::kUnimplemented: code = KVRT_ERR_UNIMPLEMENTED; break;
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kPermissionDenied: code = KVRT_ERR_IO; break;
    default: break;
  }
  return Fail(code, std::string(s.message()));
}

kvrt_status CheckRuntime(const kvrt_runtime* rt, const char* fn) {
  if (rt == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, absl::StrCat(fn, ": rt is NULL"));
  if (rt->magic != kLiveMagic)
    return Fail(
        KVRT_ERR_INVALID_ARGUMENT,
        absl::StrCat(fn, ": rt is not a live runtime (destroyed or not from kvrt_runtime_create)"));
  return KVRT_OK;
}

// NOTE: a C caller may store any int in an enum field, but loading a C++ enum (no fixed
// underlying type) outside its range is undefined behaviour (UBSan -fsanitize=enum, found by
// fuzz_api). Enum fields from the caller are read through this, as the int C stores.
template <class E>
int32_t RawEnum(const E& e) {
  static_assert(sizeof(E) == sizeof(int32_t));
  int32_t v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

// exec -> the runtime's Exec; device pointers need the GPU backend (use_gpu = 1 in effect).
kvrt_status CheckExec(const kvrt_runtime* rt, const kvrt_exec* exec, const char* fn,
                      kvrt::runtime::Exec* out) {
  *out = {};
  if (exec == nullptr || RawEnum(exec->memory) == KVRT_MEMORY_HOST) return KVRT_OK;
  if (RawEnum(exec->memory) == KVRT_MEMORY_DEVICE) {
    if (rt->config.use_gpu != 1)
      return Fail(
          KVRT_ERR_UNIMPLEMENTED,
          absl::StrCat(fn,
                       ": device pointers need the CUDA backend (config.use_gpu = 1 on "
                       "a machine with a CUDA device); this runtime uses the host backend"));
    out->device = true;
    out->stream = exec->cuda_stream;
    return KVRT_OK;
  }
  return Fail(KVRT_ERR_INVALID_ARGUMENT,
              absl::StrCat(fn, ": exec->memory = ", RawEnum(exec->memory), " is unknown"));
}

// The C and C++ kind enums are one list (kvrt_cpu_index/kind_table.h): same values, same count.
using kvrt::cpu_index::IndexKind;
static_assert(KVRT_INDEX_EXACT == static_cast<int>(IndexKind::kExact) &&
                  KVRT_INDEX_FLAT == static_cast<int>(IndexKind::kFlat) &&
                  KVRT_INDEX_IVF == static_cast<int>(IndexKind::kIvf) &&
                  KVRT_INDEX_HNSW == static_cast<int>(IndexKind::kHnsw) &&
                  KVRT_INDEX_LANDMARK == static_cast<int>(IndexKind::kLandmark) &&
                  KVRT_INDEX_ATTENTION_AWARE == static_cast<int>(IndexKind::kAttentionAware) &&
                  KVRT_INDEX_CLUSTER == static_cast<int>(IndexKind::kCluster) &&
                  KVRT_INDEX_CLUSTER + 1 == kvrt::cpu_index::kNumIndexKinds,
              "kvrt_index_kind and cpu_index::IndexKind disagree");

// Every kvrt_stats field is a RuntimeStats field copied by name (kvrt_get_stats).
#define KVRT_COUNT_FIELD_(name) +1
constexpr int kCountedStats = 0 KVRT_RUNTIME_COUNTERS(KVRT_COUNT_FIELD_);
#undef KVRT_COUNT_FIELD_
static_assert(sizeof(kvrt_stats) == sizeof(size_t) + (3 + kCountedStats) * sizeof(int64_t),
              "kvrt_stats has a field that kvrt_get_stats does not copy");

kvrt::runtime::RuntimeConfig ToRuntimeConfig(const kvrt_config& c) {
  kvrt::runtime::RuntimeConfig r;
  r.num_layers = c.num_layers;
  r.num_q_heads = c.num_q_heads;
  r.num_kv_heads = c.num_kv_heads;
  r.head_dim = c.head_dim;
  r.dtype = static_cast<kvrt::DType>(RawEnum(c.dtype));
  r.scale = c.scale;
  r.sink_tokens = c.sink_tokens;
  r.window_tokens = c.window_tokens;
  r.top_k = c.top_k;
  r.index_kind = static_cast<kvrt::cpu_index::IndexKind>(RawEnum(c.index_kind));
  r.search_effort = c.search_effort;
  r.worker_threads = c.worker_threads;
  r.record_attended = c.record_attended != 0;
  r.host_memory_limit = c.host_memory_limit;
  r.gpu_memory_limit = c.gpu_memory_limit;
  r.check_finite = c.check_finite != 0;
  r.group_search = c.group_search != 0;
  r.cold_attention = RawEnum(c.cold_attention);
  r.use_gpu = c.use_gpu;
  r.hot_cache_fraction = c.hot_cache_fraction;
  r.index.cluster.budget_fraction = c.cluster_budget_fraction;
  r.index.cluster.group_select = c.cluster_group_select != 0;
  r.index.cluster.top_p = c.cluster_top_p;
  r.index.cluster.miss_penalty = c.cluster_miss_penalty;
  // 0: a 0.3.9 caller's reserved0 (kvrt_config_default set it to 0): the default.
  r.index.cluster.cluster_size =
      c.cluster_keys == 0 ? kvrt::cpu_index::ClusterConfig{}.cluster_size : c.cluster_keys;
  r.index.cluster.rescore = c.cluster_rescore;  // > 1: Runtime::Create turns the GPU selection off
  // 0.3.11 and 0.3.12 callers: reserved1, set to 0 by kvrt_config_default (keys, as then).
  r.index.cluster.rescore_bits = c.cluster_rescore_bits;
  r.index.cluster.value_bits = c.cluster_value_bits;  // 0.3.14 callers: the default, 0
  r.cuda_device = c.cuda_device;
  r.direct_step = c.cluster_direct_step != 0;
  r.values_are_keys = c.values_are_keys != 0;  // 0.3.15-0.3.24 callers: reserved2, 0
  r.worker_cpu_first = c.worker_cpu_first;
  r.worker_cpu_count = c.worker_cpu_count;
  return r;
}

// ABI (kvrt.h, "ABI"): the sizes of kvrt_config and kvrt_stats that some kvrt.h since 0.3
// declared. A struct grows by appending fields; its older sizes stay here, so that a program
// compiled against an older header keeps working: the library reads and writes only its prefix.
// The size of a kvrt_config that ended with the int32 field at `offset` (tail padding included).
constexpr std::size_t ConfigSizeEndingAt(std::size_t offset) {
  return (offset + sizeof(int32_t) + alignof(kvrt_config) - 1) / alignof(kvrt_config) *
         alignof(kvrt_config);
}
// 0.3.0's kvrt_config ended at cold_attention; its size includes the 4 bytes of tail padding where
// hot_cache_fraction lies now, so a caller of that size gets the default of that field.
constexpr std::size_t kConfigSize030 = ConfigSizeEndingAt(offsetof(kvrt_config, cold_attention));
// 0.3.1 and 0.3.2 ended at cuda_device (cluster_direct_step, 0.3.3, follows it: the prefix read
// from such a caller stops before it, whatever padding the size includes).
constexpr std::size_t kConfigSize031 = ConfigSizeEndingAt(offsetof(kvrt_config, cuda_device));
// 0.3.3 ended at cluster_direct_step (worker_cpu_first and worker_cpu_count, 0.3.4, follow it).
constexpr std::size_t kConfigSize033 =
    ConfigSizeEndingAt(offsetof(kvrt_config, cluster_direct_step));
// 0.3.4 ended at worker_cpu_count (cluster_group_select and cluster_top_p, 0.3.5, follow it).
constexpr std::size_t kConfigSize034 = ConfigSizeEndingAt(offsetof(kvrt_config, worker_cpu_count));
// 0.3.5 to 0.3.8 ended at cluster_top_p. cluster_miss_penalty (0.3.9) lies in that size's tail
// padding, as hot_cache_fraction did in 0.3.0's: a caller of that size gets its default. Alone the
// new float would have left sizeof(kvrt_config) unchanged (the two sizes could not be told
// apart), hence a field after it (0.3.9: reserved0, not read; since 0.3.10 cluster_keys).
constexpr std::size_t kConfigSize035 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_top_p));
// 0.3.9 and 0.3.10 ended at cluster_keys; cluster_rescore (0.3.11) lies in that size's tail
// padding, hence reserved1 after it (as reserved0 in 0.3.9; since 0.3.13 cluster_rescore_bits).
constexpr std::size_t kConfigSize039 = ConfigSizeEndingAt(offsetof(kvrt_config, cluster_keys));
// 0.3.13 and 0.3.14 ended at cluster_rescore_bits; cluster_value_bits (0.3.15) lies in that
// size's tail padding, hence reserved2 after it (since 0.3.25 values_are_keys).
constexpr std::size_t kConfigSize0313 =
    ConfigSizeEndingAt(offsetof(kvrt_config, cluster_rescore_bits));
constexpr std::size_t kConfigSizes[] = {kConfigSize030,  kConfigSize031,     kConfigSize033,
                                        kConfigSize034,  kConfigSize035,     kConfigSize039,
                                        kConfigSize0313, sizeof(kvrt_config)};
static_assert(kConfigSize031 < kConfigSize033, "0.3.3's field must change the size");
static_assert(kConfigSize033 < kConfigSize034, "0.3.4's fields must change the size");
static_assert(kConfigSize034 < kConfigSize035, "0.3.5's fields must change the size");
static_assert(kConfigSize035 < kConfigSize039, "0.3.9's fields must change the size");
static_assert(kConfigSize039 < kConfigSize0313, "0.3.11's fields must change the size");
static_assert(kConfigSize0313 < sizeof(kvrt_config), "0.3.15's fields must change the size");
constexpr std::size_t kStatsSizes[] = {offsetof(kvrt_stats, hot_hits),
                                       offsetof(kvrt_stats, segments_built_gpu),
                                       offsetof(kvrt_stats, attends_direct),
                                       offsetof(kvrt_stats, time_background_wait_ns),
                                       offsetof(kvrt_stats, value_codes_fallbacks),
                                       offsetof(kvrt_stats, evicted_in_place),
                                       sizeof(kvrt_stats)};

template <std::size_t N>
bool KnownSize(const std::size_t (&sizes)[N], std::size_t size) {
  for (std::size_t s : sizes)
    if (s == size) return true;
  return false;
}

// The struct_size of a caller's struct (read as bytes: its type may be an older, smaller one).
std::size_t StructSize(const void* p) {
  std::size_t size;
  std::memcpy(&size, p, sizeof size);
  return size;
}

kvrt_status BadSize(const char* fn, const char* type, std::size_t size) {
  return Fail(KVRT_ERR_INVALID_ARGUMENT,
              absl::StrCat(fn, ": ", type, ".struct_size = ", size, " is not a size of ", type,
                           " this library (", kvrt_version(), ") knows; set it with ",
                           type == std::string("kvrt_config") ? "kvrt_config_default()"
                                                              : "kvrt_stats_init()",
                           ", and compile against the kvrt.h of a library no newer than the one "
                           "you run (kvrt.h before 0.3 had no struct_size)",
                           type == std::string("kvrt_config")
                               ? "; a caller through an FFI (ctypes, cffi, bindgen) calls "
                                 "kvrt_config_init(&c, sizeof c): kvrt_config_default() is a "
                                 "kvrt.h inline, and the library's symbol of that name is 0.2's, "
                                 "without struct_size"
                               : ""));
}

kvrt_config Defaults() {
  kvrt_config c;
  std::memset(&c, 0, sizeof(c));
  c.struct_size = sizeof(c);
  c.num_layers = 32;
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.dtype = KVRT_DTYPE_BF16;
  c.scale = 0.f;
  c.sink_tokens = 4;
  c.window_tokens = 2048;
  c.top_k = 100;
  c.index_kind = KVRT_INDEX_FLAT;
  c.search_effort = 0;
  c.worker_threads = 0;
  c.record_attended = 0;
  c.use_gpu = 0;
  c.host_memory_limit = 0;
  c.gpu_memory_limit = 0;
  c.check_finite = 1;
  c.group_search = 0;
  c.cold_attention = KVRT_COLD_CPU;
  c.hot_cache_fraction = 0.1f;
  c.cluster_budget_fraction = 0.03f;
  c.cuda_device = -1;
  c.cluster_direct_step = 1;
  c.worker_cpu_first = 0;
  c.worker_cpu_count = 0;
  c.cluster_group_select = 1;
  c.cluster_top_p = 0.f;
  c.cluster_miss_penalty = 0.5f;
  c.cluster_keys = kvrt::cpu_index::ClusterConfig{}.cluster_size;
  c.cluster_rescore = 0.f;
  c.cluster_rescore_bits = 0;
  c.cluster_value_bits = 0;
  return c;
}

// The caller's config as this library's: its prefix over the defaults (fields a caller's older
// header lacks keep their defaults).
kvrt_status ReadConfig(const kvrt_config* in, const char* fn, kvrt_config* out) {
  const std::size_t size = StructSize(in);
  if (!KnownSize(kConfigSizes, size)) return BadSize(fn, "kvrt_config", size);
  *out = Defaults();
  const std::size_t prefix = size == kConfigSize030    ? offsetof(kvrt_config, hot_cache_fraction)
                             : size == kConfigSize031  ? offsetof(kvrt_config, cluster_direct_step)
                             : size == kConfigSize033  ? offsetof(kvrt_config, worker_cpu_first)
                             : size == kConfigSize034  ? offsetof(kvrt_config, cluster_group_select)
                             : size == kConfigSize035  ? offsetof(kvrt_config, cluster_miss_penalty)
                             : size == kConfigSize039  ? offsetof(kvrt_config, cluster_rescore)
                             : size == kConfigSize0313 ? offsetof(kvrt_config, cluster_value_bits)
                                                       : size;
  std::memcpy(out, in, prefix);
  out->struct_size = sizeof(kvrt_config);
  return KVRT_OK;
}

// text into buf[size] (size > 0), truncated, NUL-terminated.
void WriteText(const std::string& text, char* buf, std::size_t size) {
  const std::size_t n = std::min(text.size(), size - 1);
  std::memcpy(buf, text.data(), n);
  buf[n] = '\0';
}

}  // namespace

// Every entry point body runs inside this, so that no C++ exception reaches the caller.
#define KVRT_API_TRY try {
#define KVRT_API_CATCH                                                          \
  }                                                                             \
  catch (const std::bad_alloc&) {                                               \
    return Fail(KVRT_ERR_OUT_OF_MEMORY, "out of memory");                       \
  }                                                                             \
  catch (const std::exception& e) {                                             \
    return Fail(KVRT_ERR_INTERNAL, absl::StrCat("internal error: ", e.what())); \
  }                                                                             \
  catch (...) {                                                                 \
    return Fail(KVRT_ERR_INTERNAL, "internal error: unknown exception");        \
  }

extern "C" {

const char* kvrt_status_string(kvrt_status status) {
  switch (RawEnum(status)) {
    case KVRT_OK: return "KVRT_OK";
    case KVRT_ERR_INVALID_ARGUMENT: return "KVRT_ERR_INVALID_ARGUMENT";
    case KVRT_ERR_NOT_FOUND: return "KVRT_ERR_NOT_FOUND";
    case KVRT_ERR_OUT_OF_MEMORY: return "KVRT_ERR_OUT_OF_MEMORY";
    case KVRT_ERR_FAILED_PRECONDITION: return "KVRT_ERR_FAILED_PRECONDITION";
    case KVRT_ERR_UNIMPLEMENTED: return "KVRT_ERR_UNIMPLEMENTED";
    case KVRT_ERR_INTERNAL: return "KVRT_ERR_INTERNAL";
    case KVRT_ERR_CUDA: return "KVRT_ERR_CUDA";
    case KVRT_ERR_IO: return "KVRT_ERR_IO";
  }
  return "KVRT_ERR_UNKNOWN_STATUS";
}

const char* kvrt_last_error(void) { return g_last_error.c_str(); }

const char* kvrt_version(void) {
#define KVRT_STR2_(x) #x
#define KVRT_STR_(x) KVRT_STR2_(x)
  return KVRT_STR_(KVRT_VERSION_MAJOR) "." KVRT_STR_(KVRT_VERSION_MINOR) "." KVRT_STR_(
      KVRT_VERSION_PATCH);
}

kvrt_status kvrt_config_init(kvrt_config* config, size_t struct_size) {
  if (config == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_config_init: config is NULL");
  if (!KnownSize(kConfigSizes, struct_size))
    return BadSize("kvrt_config_init", "kvrt_config", struct_size);
  const kvrt_config c = Defaults();
  std::memcpy(config, &c, struct_size);
  config->struct_size = struct_size;
  return KVRT_OK;
}

int32_t kvrt_index_kind_count(void) { return kvrt::cpu_index::kNumIndexKinds; }

const char* kvrt_index_kind_name(kvrt_index_kind kind) {
  const int32_t v = RawEnum(kind);
  if (!kvrt::cpu_index::IsIndexKind(v)) return nullptr;
  return kvrt::cpu_index::KindInfo(static_cast<kvrt::cpu_index::IndexKind>(v)).name;
}

kvrt_status kvrt_index_kind_parse(const char* name, kvrt_index_kind* out) {
  KVRT_API_TRY
  if (name == nullptr || out == nullptr)
    return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_index_kind_parse: name and out must not be NULL");
  auto kind = kvrt::cpu_index::ParseIndexKind(name);
  if (!kind.ok()) return FromStatus(kind.status());
  *out = static_cast<kvrt_index_kind>(static_cast<int>(*kind));
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_index_describe_search(kvrt_index_kind kind, int32_t top_k, int32_t effort,
                                       char* buf, size_t size) {
  KVRT_API_TRY
  if (buf == nullptr || size == 0)
    return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_index_describe_search: buf is NULL or size is 0");
  if (!kvrt::cpu_index::IsIndexKind(RawEnum(kind)))
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("kvrt_index_describe_search: kind ", RawEnum(kind), " is unknown"));
  if (top_k < 1 || top_k > kvrt::runtime::kMaxTopK)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("kvrt_index_describe_search: top_k = ", top_k, " is out of range [1, ",
                             kvrt::runtime::kMaxTopK, "]"));
  if (effort < 0 || effort > kvrt::runtime::kMaxSearchEffort)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("kvrt_index_describe_search: search_effort = ", effort,
                             " is out of range [0, ", kvrt::runtime::kMaxSearchEffort, "]"));
  // The index settings of kvrt_config_default() (the cluster kind's budget and selection are
  // config fields; an IndexConfig{} would describe the library's internal defaults instead).
  WriteText(kvrt::cpu_index::SearchSettings(static_cast<kvrt::cpu_index::IndexKind>(RawEnum(kind)),
                                            ToRuntimeConfig(Defaults()).index, top_k, effort),
            buf, size);
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_runtime_describe_search(const kvrt_runtime* rt, char* buf, size_t size) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_runtime_describe_search"); s != KVRT_OK) return s;
  if (buf == nullptr || size == 0)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                "kvrt_runtime_describe_search: buf is NULL or size is 0");
  const kvrt::runtime::RuntimeConfig& c = rt->impl->config();
  WriteText(kvrt::cpu_index::SearchSettings(c.index_kind, c.index, c.top_k, c.search_effort), buf,
            size);
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_exec kvrt_exec_default(void) { return kvrt_exec{KVRT_MEMORY_HOST, nullptr}; }

kvrt_status kvrt_runtime_create(const kvrt_config* config, kvrt_runtime** out) {
  KVRT_API_TRY
  if (config == nullptr || out == nullptr)
    return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_runtime_create: config and out must not be NULL");
  kvrt_config full;
  if (kvrt_status s = ReadConfig(config, "kvrt_runtime_create", &full); s != KVRT_OK) return s;
  config = &full;
  if (RawEnum(config->dtype) < KVRT_DTYPE_F32 || RawEnum(config->dtype) > KVRT_DTYPE_BF16)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("config.dtype = ", RawEnum(config->dtype), " is not a kvrt_dtype"));
  if (config->use_gpu < -1 || config->use_gpu > 1)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("config.use_gpu = ", config->use_gpu, " must be -1, 0 or 1"));
  // The switches: any other value is a caller's mistake, not "on" (0.3.22 took 7 or -1 as 1).
  const std::pair<const char*, int32_t> switches[] = {
      {"check_finite", config->check_finite},
      {"group_search", config->group_search},
      {"record_attended", config->record_attended},
      {"cluster_group_select", config->cluster_group_select},
      {"cluster_direct_step", config->cluster_direct_step},
      {"values_are_keys", config->values_are_keys}};
  for (const auto& [name, value] : switches)
    if (value != 0 && value != 1)
      return Fail(KVRT_ERR_INVALID_ARGUMENT,
                  absl::StrCat("config.", name, " = ", value, " must be 0 or 1"));
  auto made = kvrt::runtime::Runtime::Create(ToRuntimeConfig(*config));
  if (!made.ok()) return FromStatus(made.status());
  auto* rt = new kvrt_runtime{std::move(*made), *config, kLiveMagic};
  const auto& eff = rt->impl->config();
  rt->config.scale = eff.scale;
  rt->config.worker_threads = eff.worker_threads;
  rt->config.use_gpu = eff.use_gpu;
  rt->config.cluster_keys = eff.index.cluster.cluster_size;  // 0 given: 16
  rt->config.cluster_direct_step = eff.direct_step ? 1 : 0;  // off while rescoring (Create)
  if (eff.use_gpu == 1) rt->config.cuda_device = eff.cuda_device;
  *out = rt;
  return KVRT_OK;
  KVRT_API_CATCH
}

void kvrt_runtime_destroy(kvrt_runtime* rt) {
  if (rt == nullptr || rt->magic != kLiveMagic) return;
  rt->magic = kDeadMagic;
  rt->impl.reset();
  delete rt;
}

kvrt_status kvrt_runtime_config(const kvrt_runtime* rt, kvrt_config* out) {
  if (kvrt_status s = CheckRuntime(rt, "kvrt_runtime_config"); s != KVRT_OK) return s;
  if (out == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_runtime_config: out is NULL");
  const std::size_t size = StructSize(out);
  if (!KnownSize(kConfigSizes, size)) return BadSize("kvrt_runtime_config", "kvrt_config", size);
  {
    std::lock_guard<std::mutex> lock(rt->config_mu);
    std::memcpy(out, &rt->config, size);  // the caller's prefix only
  }
  out->struct_size = size;
  return KVRT_OK;
}

kvrt_status kvrt_seq_create(kvrt_runtime* rt, kvrt_seq_id* out) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_seq_create"); s != KVRT_OK) return s;
  if (out == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_seq_create: out is NULL");
  auto id = rt->impl->CreateSequence();
  if (!id.ok()) return FromStatus(id.status());
  *out = *id;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_seq_release(kvrt_runtime* rt, kvrt_seq_id seq) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_seq_release"); s != KVRT_OK) return s;
  return FromStatus(rt->impl->ReleaseSequence(seq));
  KVRT_API_CATCH
}

kvrt_status kvrt_seq_wait(kvrt_runtime* rt, kvrt_seq_id seq) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_seq_wait"); s != KVRT_OK) return s;
  return FromStatus(rt->impl->WaitSequence(seq));
  KVRT_API_CATCH
}

kvrt_status kvrt_seq_length(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, int64_t* out) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_seq_length"); s != KVRT_OK) return s;
  if (out == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_seq_length: out is NULL");
  auto n = rt->impl->SequenceLength(seq, layer);
  if (!n.ok()) return FromStatus(n.status());
  *out = *n;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_prefill_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                            const void* k, const void* v, int64_t n_tokens, const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_prefill"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_prefill", &ex); s != KVRT_OK) return s;
  return FromStatus(rt->impl->Prefill(seq, layer, q, k, v, n_tokens, ex));
  KVRT_API_CATCH
}

kvrt_status kvrt_prefill(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                         const void* k, const void* v, int64_t n_tokens) {
  return kvrt_prefill_ex(rt, seq, layer, q, k, v, n_tokens, nullptr);
}

kvrt_status kvrt_prefill_sampled_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                                    int64_t n_queries, const void* k, const void* v,
                                    int64_t n_tokens, const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_prefill_sampled_ex"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_prefill_sampled_ex", &ex); s != KVRT_OK) return s;
  return FromStatus(rt->impl->Prefill(seq, layer, q, n_queries, k, v, n_tokens, ex));
  KVRT_API_CATCH
}

kvrt_status kvrt_prefill_query_rows(const kvrt_runtime* rt, int64_t n_tokens, int64_t* count,
                                    int64_t* stride) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_prefill_query_rows"); s != KVRT_OK) return s;
  if (count == nullptr || stride == nullptr)
    return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_prefill_query_rows: count or stride is NULL");
  if (n_tokens < 1 || n_tokens > kvrt::runtime::kMaxTokens)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("kvrt_prefill_query_rows: n_tokens = ", n_tokens,
                             " must be in [1, 2^34] (no prefill takes more)"));
  const kvrt::runtime::QuerySample sample =
      kvrt::runtime::PromptQuerySample(rt->impl->config(), n_tokens);
  *count = sample.count;
  *stride = sample.stride;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_append_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* k,
                           const void* v, int64_t n_tokens, const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_append"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_append", &ex); s != KVRT_OK) return s;
  return FromStatus(rt->impl->Append(seq, layer, k, v, n_tokens, ex));
  KVRT_API_CATCH
}

kvrt_status kvrt_append(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* k,
                        const void* v, int64_t n_tokens) {
  return kvrt_append_ex(rt, seq, layer, k, v, n_tokens, nullptr);
}

kvrt_status kvrt_attend_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                           float* out, const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_attend"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_attend", &ex); s != KVRT_OK) return s;
  return FromStatus(rt->impl->Attend(seq, layer, q, out, ex));
  KVRT_API_CATCH
}

kvrt_status kvrt_attend(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                        float* out) {
  return kvrt_attend_ex(rt, seq, layer, q, out, nullptr);
}

kvrt_status kvrt_attend_batch_ex(kvrt_runtime* rt, const kvrt_seq_id* seqs, int32_t n_seqs,
                                 int32_t layer, const void* q, float* out, const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_attend_batch"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_attend_batch", &ex); s != KVRT_OK) return s;
  static_assert(sizeof(kvrt_seq_id) == sizeof(int64_t));
  return FromStatus(rt->impl->AttendBatch(seqs, n_seqs, layer, q, out, ex));
  KVRT_API_CATCH
}

kvrt_status kvrt_attend_batch_lse_ex(kvrt_runtime* rt, const kvrt_seq_id* seqs, int32_t n_seqs,
                                     int32_t layer, const void* q, float* out, float* lse,
                                     const kvrt_exec* exec) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_attend_batch_lse"); s != KVRT_OK) return s;
  kvrt::runtime::Exec ex;
  if (kvrt_status s = CheckExec(rt, exec, "kvrt_attend_batch_lse", &ex); s != KVRT_OK) return s;
  if (lse == nullptr)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                "kvrt_attend_batch_lse: lse is NULL (kvrt_attend_batch_ex writes out alone)");
  if (n_seqs > 0 && out != nullptr) {
    // lse must not overlap out at all (an lse inside out's rows overwrote part of them).
    const kvrt::runtime::RuntimeConfig& c = rt->impl->config();
    const auto rows = static_cast<uintptr_t>(n_seqs) * static_cast<uintptr_t>(c.num_q_heads);
    const auto o = reinterpret_cast<uintptr_t>(out), l = reinterpret_cast<uintptr_t>(lse);
    const uintptr_t o_end = o + rows * static_cast<uintptr_t>(c.head_dim) * sizeof(float);
    if (l < o_end && o < l + rows * sizeof(float))
      return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_attend_batch_lse: lse overlaps out");
  }
  return FromStatus(rt->impl->AttendBatch(seqs, n_seqs, layer, q, out, ex, lse));
  KVRT_API_CATCH
}

kvrt_status kvrt_attend_batch(kvrt_runtime* rt, const kvrt_seq_id* seqs, int32_t n_seqs,
                              int32_t layer, const void* q, float* out) {
  return kvrt_attend_batch_ex(rt, seqs, n_seqs, layer, q, out, nullptr);
}

kvrt_status kvrt_get_attended(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                              int32_t q_head, int64_t* ids, int64_t capacity, int64_t* count) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_get_attended"); s != KVRT_OK) return s;
  if (count == nullptr || capacity < 0 || (capacity > 0 && ids == nullptr))
    return Fail(
        KVRT_ERR_INVALID_ARGUMENT,
        "kvrt_get_attended: count must not be NULL, capacity >= 0, ids non-NULL if capacity > 0");
  std::vector<int64_t> got;
  if (auto s = rt->impl->GetAttended(seq, layer, q_head, &got); !s.ok()) return FromStatus(s);
  const int64_t n = static_cast<int64_t>(got.size());
  if (capacity > 0) std::memcpy(ids, got.data(), std::min(n, capacity) * sizeof(int64_t));
  *count = n;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_get_estimate_lse(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                  int32_t q_head, float* lse) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_get_estimate_lse"); s != KVRT_OK) return s;
  if (lse == nullptr)
    return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_get_estimate_lse: lse must not be NULL");
  auto got = rt->impl->GetEstimateLse(seq, layer, q_head);
  if (!got.ok()) return FromStatus(got.status());
  *lse = *got;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_set_head_policy(kvrt_runtime* rt, int32_t layer, int32_t q_head,
                                 kvrt_head_policy policy) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_set_head_policy"); s != KVRT_OK) return s;
  const int p = RawEnum(policy);
  if (p != KVRT_HEAD_RETRIEVAL && p != KVRT_HEAD_STREAMING)
    return Fail(KVRT_ERR_INVALID_ARGUMENT,
                absl::StrCat("kvrt_set_head_policy: policy = ", p, " is not a kvrt_head_policy"));
  return FromStatus(rt->impl->SetHeadStreaming(layer, q_head, p == KVRT_HEAD_STREAMING));
  KVRT_API_CATCH
}

kvrt_status kvrt_set_search_effort(kvrt_runtime* rt, int32_t effort) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_set_search_effort"); s != KVRT_OK) return s;
  if (kvrt_status s = FromStatus(rt->impl->SetSearchEffort(effort)); s != KVRT_OK) return s;
  std::lock_guard<std::mutex> lock(rt->config_mu);
  rt->config.search_effort = effort;
  return KVRT_OK;
  KVRT_API_CATCH
}

kvrt_status kvrt_get_stats(const kvrt_runtime* rt, kvrt_stats* out) {
  KVRT_API_TRY
  if (kvrt_status s = CheckRuntime(rt, "kvrt_get_stats"); s != KVRT_OK) return s;
  if (out == nullptr) return Fail(KVRT_ERR_INVALID_ARGUMENT, "kvrt_get_stats: out is NULL");
  const std::size_t size = StructSize(out);
  if (!KnownSize(kStatsSizes, size)) return BadSize("kvrt_get_stats", "kvrt_stats", size);
  const auto s = rt->impl->Stats();
  kvrt_stats all;
  std::memset(&all, 0, sizeof all);
  // The caller's size, not this header's: a caller of an older header polling with one struct
  // would otherwise pass the larger size at its next call and have it written past its struct.
  all.struct_size = size;
  all.sequences = s.sequences;
  all.gpu_bytes = s.gpu_bytes;
  all.host_bytes = s.host_bytes;
#define KVRT_COPY_STAT_(name) all.name = s.name;
  KVRT_RUNTIME_COUNTERS(KVRT_COPY_STAT_)
#undef KVRT_COPY_STAT_
  std::memcpy(out, &all, size);  // the caller's prefix only
  return KVRT_OK;
  KVRT_API_CATCH
}

}  // extern "C"
