/* Written in C on purpose: the header must compile as C99 and every entry point be callable. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvrt.h"

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
              kvrt_last_error());                                                              \
      return 1;                                                                                \
    }                                                                                          \
  } while (0)

int main(void) {
  enum { H = 4, G = 2, D = 8, T = 40 };
  float q[T * H * D], k[T * G * D], v[T * G * D], out[H * D];
  int64_t ids[T], count = 0, len = 0;
  int i;
  kvrt_config cfg = kvrt_config_default(), eff = kvrt_config_default();
  kvrt_runtime* rt = NULL;
  kvrt_seq_id seq = -1;
  kvrt_stats stats = kvrt_stats_init();
  kvrt_exec exec = kvrt_exec_default();

  for (i = 0; i < T * H * D; ++i) q[i] = (float)sin(i * 0.37);
  for (i = 0; i < T * G * D; ++i) {
    k[i] = (float)cos(i * 0.11);
    v[i] = (float)sin(i * 0.07);
  }
  CHECK(strlen(kvrt_version()) >= 5);
  CHECK(strcmp(kvrt_status_string(KVRT_OK), "KVRT_OK") == 0);
  cfg.num_layers = 2;
  cfg.num_q_heads = H;
  cfg.num_kv_heads = G;
  cfg.head_dim = D;
  cfg.dtype = KVRT_DTYPE_F32;
  cfg.sink_tokens = 2;
  cfg.window_tokens = 8;
  cfg.top_k = 4;
  cfg.index_kind = KVRT_INDEX_FLAT;
  cfg.worker_threads = 2;
  cfg.record_attended = 1;
  CHECK(kvrt_runtime_create(&cfg, &rt) == KVRT_OK);
  CHECK(kvrt_runtime_config(rt, &eff) == KVRT_OK);
  CHECK(fabsf(eff.scale - 1.0f / sqrtf((float)D)) < 1e-7f);
  CHECK(kvrt_seq_create(rt, &seq) == KVRT_OK && seq >= 0);
  CHECK(kvrt_prefill(rt, seq, 0, q, k, v, T - 1) == KVRT_OK);
  CHECK(kvrt_append(rt, seq, 0, k + (T - 1) * G * D, v + (T - 1) * G * D, 1) == KVRT_OK);
  CHECK(kvrt_attend(rt, seq, 0, q, out) == KVRT_OK);
  CHECK(kvrt_seq_length(rt, seq, 0, &len) == KVRT_OK && len == T);
  CHECK(kvrt_get_attended(rt, seq, 0, 0, ids, T, &count) == KVRT_OK);
  CHECK(count == 2 + 8 + 4);
  CHECK(kvrt_prefill_ex(rt, seq, 1, NULL, k, v, T, &exec) == KVRT_OK);
  CHECK(kvrt_append_ex(rt, seq, 1, k, v, 1, &exec) == KVRT_OK);
  CHECK(kvrt_attend_ex(rt, seq, 1, q, out, &exec) == KVRT_OK);
  CHECK(kvrt_set_search_effort(rt, 7) == KVRT_OK);
  CHECK(kvrt_runtime_config(rt, &eff) == KVRT_OK && eff.search_effort == 7);
  CHECK(kvrt_set_search_effort(rt, -1) == KVRT_ERR_INVALID_ARGUMENT);
  CHECK(kvrt_set_head_policy(rt, 1, 3, KVRT_HEAD_STREAMING) == KVRT_OK);
  CHECK(kvrt_attend(rt, seq, 1, q, out) == KVRT_OK);
  CHECK(kvrt_get_attended(rt, seq, 1, 3, ids, T, &count) == KVRT_OK && count == 2 + 8);
  CHECK(kvrt_attend_batch(rt, &seq, 1, 0, q, out) == KVRT_OK);
  CHECK(kvrt_attend_batch_ex(rt, &seq, 1, 1, q, out, &exec) == KVRT_OK);
  CHECK(kvrt_get_stats(rt, &stats) == KVRT_OK);
  CHECK(stats.sequences == 1 && stats.attend_calls == 5);
  CHECK(stats.gpu_tokens == 2 * (2 + 8) && stats.host_tokens == (T - 10) + (T + 1 - 10));
  for (i = 0; i < H * D; ++i) CHECK(isfinite(out[i]));
  /* One error path from C: the message is set and names the problem. */
  CHECK(kvrt_attend(rt, seq, 7, q, out) == KVRT_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvrt_last_error(), "layer 7") != NULL);
  CHECK(kvrt_seq_release(rt, seq) == KVRT_OK);
  kvrt_runtime_destroy(rt);
  kvrt_runtime_destroy(NULL);
  printf("C API: every entry point called\n");
  return 0;
}
