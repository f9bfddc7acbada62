#include "config_dict.h"

#include <nanobind/stl/string.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "errors.h"
#include "tensor_arg.h"

namespace kvrt_py {
namespace {

constexpr const char* kCall = "Config";

[[noreturn]] void BadField(const std::string& field, const std::string& what) {
  Raise(KVRT_ERR_INVALID_ARGUMENT, kCall, "config." + field + " " + what);
}

int64_t ToInt(const std::string& field, nb::handle v, int64_t lo, int64_t hi) {
  // An int, a bool, or any integer with __index__ (NumPy's and torch's integer scalars); never a
  // float, which would be truncated.
  if (!PyLong_Check(v.ptr()) && !PyIndex_Check(v.ptr())) {
    BadField(field, "must be an integer, not " + nb::cast<std::string>(nb::str(v.type())));
  }
  nb::object n = nb::steal(PyNumber_Index(v.ptr()));
  if (!n.is_valid()) {
    PyErr_Clear();
    BadField(field, "must be an integer, not " + nb::cast<std::string>(nb::str(v.type())));
  }
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
  if (overflow != 0 || x < lo || x > hi) {
    BadField(field, "= " + nb::cast<std::string>(nb::str(v)) + " does not fit its C type");
  }
  return x;
}

// A float field: any real number (int, float, NumPy's and torch's scalars; not a string), as the
// f32 the library stores. A value that f32 cannot hold is refused rather than turned into inf,
// or into 0, which means "the default" for scale.
float ToF32(const std::string& field, nb::handle v) {
  if (nb::isinstance<nb::str>(v) || !PyNumber_Check(v.ptr())) BadField(field, "must be a number");
  const double x = PyFloat_AsDouble(v.ptr());
  if (x == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    BadField(field, "must be a number");
  }
  const float f = float(x);
  if (std::isfinite(x) && !std::isfinite(f))
    BadField(field, "= " + nb::cast<std::string>(nb::str(v)) + " is past f32's range");
  if (x != 0 && f == 0)
    BadField(field, "= " + nb::cast<std::string>(nb::str(v)) + " rounds to 0 in f32" +
                        (field == "scale" ? ", which means the default 1/sqrt(head_dim)" : ""));
  return f;
}

int32_t ToI32(const std::string& f, nb::handle v) {
  return int32_t(
      ToInt(f, v, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
}

template <typename Enum>
Enum ToEnum(const std::string& field, nb::handle v, std::initializer_list<const char*> names) {
  if (PyLong_Check(v.ptr())) return Enum(ToI32(field, v));
  if (!nb::isinstance<nb::str>(v)) BadField(field, "must be a name or an integer");
  std::string s = nb::cast<std::string>(v);
  int i = 0;
  std::string list;
  for (const char* n : names) {
    if (s == n) return Enum(i);
    list += std::string(i ? ", " : "") + n;
    ++i;
  }
  BadField(field, "= '" + s + "' is not one of " + list);
}

kvrt_dtype ToDtype(nb::handle v) {
  if (nb::isinstance<nb::str>(v)) {
    std::string s = nb::cast<std::string>(v);
    if (s == "float32") return KVRT_DTYPE_F32;
    if (s == "float16") return KVRT_DTYPE_F16;
    if (s == "bfloat16") return KVRT_DTYPE_BF16;
  }
  return ToEnum<kvrt_dtype>("dtype", v, {"f32", "f16", "bf16"});
}

// A float field as the Python float with the shortest decimal that names the same f32 (0.1f
// reads back as 0.1, not 0.10000000149011612), so that a Config round-trips.
double ShortFloat(float x) {
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf - 1, x);
  if (ec != std::errc()) return double(x);
  *end = '\0';
  return std::strtod(buf, nullptr);
}

kvrt_index_kind ToIndexKind(nb::handle v) {
  if (PyLong_Check(v.ptr())) return kvrt_index_kind(ToI32("index_kind", v));
  if (!nb::isinstance<nb::str>(v)) BadField("index_kind", "must be a name such as 'flat'");
  std::string s = nb::cast<std::string>(v);
  kvrt_index_kind kind = KVRT_INDEX_FLAT;
  kvrt_status st = kvrt_index_kind_parse(s.c_str(), &kind);
  if (st != KVRT_OK) Raise(st, kCall, std::string("config.index_kind: ") + kvrt_last_error());
  return kind;
}

}  // namespace

kvrt_config ConfigFromDict(const nb::dict& fields) {
  kvrt_config c = kvrt_config_default();
  for (auto [key, value] : fields) {
    std::string k = nb::cast<std::string>(nb::str(key));
    if (value.is_none()) continue;  // None: the library's default
    if (k == "num_layers")
      c.num_layers = ToI32(k, value);
    else if (k == "num_q_heads")
      c.num_q_heads = ToI32(k, value);
    else if (k == "num_kv_heads")
      c.num_kv_heads = ToI32(k, value);
    else if (k == "head_dim")
      c.head_dim = ToI32(k, value);
    else if (k == "dtype")
      c.dtype = ToDtype(value);
    else if (k == "scale")
      c.scale = ToF32(k, value);
    else if (k == "sink_tokens")
      c.sink_tokens = ToI32(k, value);
    else if (k == "window_tokens")
      c.window_tokens = ToI32(k, value);
    else if (k == "top_k")
      c.top_k = ToI32(k, value);
    else if (k == "index_kind")
      c.index_kind = ToIndexKind(value);
    else if (k == "search_effort")
      c.search_effort = ToI32(k, value);
    else if (k == "worker_threads")
      c.worker_threads = ToI32(k, value);
    else if (k == "record_attended")
      c.record_attended = ToI32(k, value);
    else if (k == "use_gpu")
      c.use_gpu = ToI32(k, value);
    else if (k == "host_memory_limit") {
      c.host_memory_limit =
          ToInt(k, value, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
    } else if (k == "gpu_memory_limit") {
      c.gpu_memory_limit =
          ToInt(k, value, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
    } else if (k == "check_finite")
      c.check_finite = ToI32(k, value);
    else if (k == "group_search")
      c.group_search = ToI32(k, value);
    else if (k == "cuda_device")
      c.cuda_device = ToI32(k, value);
    else if (k == "cluster_direct_step")
      c.cluster_direct_step = ToI32(k, value);
    else if (k == "worker_cpu_first")
      c.worker_cpu_first = ToI32(k, value);
    else if (k == "worker_cpu_count")
      c.worker_cpu_count = ToI32(k, value);
    else if (k == "cluster_group_select")
      c.cluster_group_select = ToI32(k, value);
    else if (k == "cluster_keys")
      c.cluster_keys = ToI32(k, value);
    else if (k == "cluster_rescore_bits")
      c.cluster_rescore_bits = ToI32(k, value);
    else if (k == "cluster_value_bits")
      c.cluster_value_bits = ToI32(k, value);
    else if (k == "values_are_keys")
      c.values_are_keys = ToI32(k, value);
    else if (k == "cold_attention") {
      c.cold_attention = ToEnum<kvrt_cold_attention>(k, value, {"cpu", "fetch", "auto"});
    } else if (k == "hot_cache_fraction" || k == "cluster_budget_fraction" ||
               k == "cluster_top_p" || k == "cluster_miss_penalty" || k == "cluster_rescore") {
      (k == "hot_cache_fraction"        ? c.hot_cache_fraction
       : k == "cluster_budget_fraction" ? c.cluster_budget_fraction
       : k == "cluster_top_p"           ? c.cluster_top_p
       : k == "cluster_miss_penalty"    ? c.cluster_miss_penalty
                                        : c.cluster_rescore) = ToF32(k, value);
    } else {
      Raise(KVRT_ERR_INVALID_ARGUMENT, kCall, "unknown config field '" + k + "'");
    }
  }
  return c;
}

nb::dict ConfigToDict(const kvrt_config& c) {
  static const char* const kCold[] = {"cpu", "fetch", "auto"};
  nb::dict d;
  d["num_layers"] = c.num_layers;
  d["num_q_heads"] = c.num_q_heads;
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["dtype"] = std::string(DtypeName(c.dtype));
  d["scale"] = ShortFloat(c.scale);
  d["sink_tokens"] = c.sink_tokens;
  d["window_tokens"] = c.window_tokens;
  d["top_k"] = c.top_k;
  const char* kind = kvrt_index_kind_name(c.index_kind);
  d["index_kind"] = kind ? nb::cast(std::string(kind)) : nb::cast(int(c.index_kind));
  d["search_effort"] = c.search_effort;
  d["worker_threads"] = c.worker_threads;
  d["record_attended"] = c.record_attended;
  d["use_gpu"] = c.use_gpu;
  d["host_memory_limit"] = c.host_memory_limit;
  d["gpu_memory_limit"] = c.gpu_memory_limit;
  d["check_finite"] = c.check_finite;
  d["group_search"] = c.group_search;
  d["cold_attention"] = (c.cold_attention >= 0 && c.cold_attention <= 2)
                            ? nb::cast(std::string(kCold[c.cold_attention]))
                            : nb::cast(int(c.cold_attention));
  d["hot_cache_fraction"] = ShortFloat(c.hot_cache_fraction);
  d["cluster_budget_fraction"] = ShortFloat(c.cluster_budget_fraction);
  d["cuda_device"] = c.cuda_device;
  d["cluster_direct_step"] = c.cluster_direct_step;
  d["worker_cpu_first"] = c.worker_cpu_first;
  d["worker_cpu_count"] = c.worker_cpu_count;
  d["cluster_group_select"] = c.cluster_group_select;
  d["cluster_top_p"] = ShortFloat(c.cluster_top_p);
  d["cluster_miss_penalty"] = ShortFloat(c.cluster_miss_penalty);
  d["cluster_keys"] = c.cluster_keys;
  d["cluster_rescore"] = ShortFloat(c.cluster_rescore);
  d["cluster_rescore_bits"] = c.cluster_rescore_bits;
  d["cluster_value_bits"] = c.cluster_value_bits;
  d["values_are_keys"] = c.values_are_keys;
  return d;
}

nb::dict StatsToDict(const kvrt_stats& s) {
  nb::dict d;
#define KVRT_PY_STAT(f) d[#f] = s.f
  KVRT_PY_STAT(sequences);
  KVRT_PY_STAT(gpu_tokens);
  KVRT_PY_STAT(host_tokens);
  KVRT_PY_STAT(gpu_bytes);
  KVRT_PY_STAT(host_bytes);
  KVRT_PY_STAT(index_bytes);
  KVRT_PY_STAT(attend_calls);
  KVRT_PY_STAT(keys_scored);
  KVRT_PY_STAT(cold_keys_searchable);
  KVRT_PY_STAT(cold_tokens_attended);
  KVRT_PY_STAT(evicted_tokens);
  KVRT_PY_STAT(gpu_allocated_bytes);
  KVRT_PY_STAT(time_attend_ns);
  KVRT_PY_STAT(time_gpu_attention_ns);
  KVRT_PY_STAT(time_d2h_ns);
  KVRT_PY_STAT(time_cpu_search_ns);
  KVRT_PY_STAT(time_cpu_attention_ns);
  KVRT_PY_STAT(time_h2d_ns);
  KVRT_PY_STAT(time_merge_ns);
  KVRT_PY_STAT(time_idle_ns);
  KVRT_PY_STAT(eviction_batches);
  KVRT_PY_STAT(index_update_failures);
  KVRT_PY_STAT(keys_read);
  KVRT_PY_STAT(attends_fetch);
  KVRT_PY_STAT(attends_gpu_select);
  KVRT_PY_STAT(summary_gpu_bytes);
  KVRT_PY_STAT(hot_hits);
  KVRT_PY_STAT(hot_misses);
  KVRT_PY_STAT(hot_h2d_bytes);
  KVRT_PY_STAT(hot_cache_gpu_bytes);
  KVRT_PY_STAT(time_hot_cache_ns);
  KVRT_PY_STAT(segments_built_gpu);
  KVRT_PY_STAT(time_segment_build_ns);
  KVRT_PY_STAT(attends_direct);
  KVRT_PY_STAT(direct_host_bytes);
  KVRT_PY_STAT(time_background_wait_ns);
  KVRT_PY_STAT(value_codes_fallbacks);
  KVRT_PY_STAT(evicted_in_place);
#undef KVRT_PY_STAT
  return d;
}

}  // namespace kvrt_py

// A field appended to kvrt.h must be added above (and to kvrt/_config.py / _stats.py).
static_assert(sizeof(kvrt_stats) == sizeof(size_t) + 38 * sizeof(int64_t),
              "kvrt_stats changed: update StatsToDict and kvrt/_stats.py");
static_assert(sizeof(kvrt_config) == 152,
              "kvrt_config changed: update ConfigFromDict/ConfigToDict and kvrt/_config.py");
