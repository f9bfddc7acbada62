// kvrt_config_default as libkvrt 0.2 exported it, for programs compiled against kvrt.h 0.2 or
// older and linked against this library (a 0.2 binary itself keeps loading libkvrt.so.0: the
// soname changed with 0.3). Since 0.3 kvrt.h makes kvrt_config_default inline over
// kvrt_config_init, so this symbol only serves old callers. It returns the 0.2 layout, which has
// no struct_size: its first 8 bytes (num_layers, num_q_heads) are never a size the library knows,
// so kvrt_runtime_create refuses such a config with KVRT_ERR_INVALID_ARGUMENT and a message,
// instead of reading past the caller's struct (tests/api/abi).
//
// NOTE: deliberately does not include kvrt.h, whose inline kvrt_config_default has this name.
#include <cstdint>

namespace {

struct ConfigV02 {  // kvrt.h 0.2's kvrt_config, 88 bytes
  int32_t num_layers, num_q_heads, num_kv_heads, head_dim, dtype;
  float scale;
  int32_t sink_tokens, window_tokens, top_k, index_kind, search_effort, worker_threads,
      record_attended, use_gpu;
  int64_t host_memory_limit, gpu_memory_limit;
  int32_t check_finite, group_search, cold_attention;
};
static_assert(sizeof(ConfigV02) == 88, "the 0.2 layout");

}  // namespace

extern "C" __attribute__((visibility("default"))) ConfigV02 kvrt_config_default(void) {
  ConfigV02 c{};
  c.num_layers = 32;
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.dtype = 2;  // bf16
  c.sink_tokens = 4;
  c.window_tokens = 2048;
  c.top_k = 100;
  c.index_kind = 1;  // flat
  c.check_finite = 1;
  return c;
}
