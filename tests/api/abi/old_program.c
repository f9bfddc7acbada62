/* A program written and compiled against kvrt.h 0.2 (kvrt_0_2.h), linked against the current
 * libkvrt. 0.3 put struct_size first in kvrt_config and kvrt_stats and changed the soname, so a
 * 0.2 binary keeps loading libkvrt.so.0; one rebuilt against the new library with the old header
 * must get a clean error, never a read or write past its structs. Exits 0 when it does. */
#include <stdio.h>
#include <string.h>

#include "kvrt_0_2.h"

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                                \
    }                                                                          \
  } while (0)

struct guarded_config {
  kvrt_config config;
  unsigned char canary[64];
};

static int canary_intact(const unsigned char* c, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i)
    if (c[i] != 0xAB) return 0;
  return 1;
}

int main(void) {
  struct guarded_config g;
  kvrt_runtime* rt = NULL;
  kvrt_stats stats;
  kvrt_status st;
  CHECK(sizeof(kvrt_config) == 88); /* the 0.2 layout */
  printf("compiled against kvrt.h %d.%d, running libkvrt %s\n", KVRT_VERSION_MAJOR,
         KVRT_VERSION_MINOR, kvrt_version());
  CHECK(strcmp(kvrt_version(), "0.2.0") != 0);

  memset(g.canary, 0xAB, sizeof g.canary);
  g.config = kvrt_config_default(); /* the library's 0.2-layout export: 88 bytes, not more */
  CHECK(canary_intact(g.canary, sizeof g.canary));
  CHECK(g.config.num_layers == 32 && g.config.window_tokens == 2048 && g.config.check_finite == 1);

  /* A typical 0.2 program: defaults, a few fields, create. */
  g.config.num_layers = 2;
  g.config.num_q_heads = 4;
  g.config.num_kv_heads = 2;
  g.config.head_dim = 8;
  g.config.dtype = KVRT_DTYPE_F32;
  st = kvrt_runtime_create(&g.config, &rt);
  printf("kvrt_runtime_create: %s: %s\n", kvrt_status_string(st), kvrt_last_error());
  CHECK(st == KVRT_ERR_INVALID_ARGUMENT);
  CHECK(rt == NULL); /* out untouched */
  CHECK(strstr(kvrt_last_error(), "struct_size") != NULL);
  /* What a binding through an FFI that called the exported symbol does instead (0.3.37). */
  CHECK(strstr(kvrt_last_error(), "kvrt_config_init(&c, sizeof c)") != NULL);
  CHECK(canary_intact(g.canary, sizeof g.canary));

  /* Whatever the first fields hold (a zeroed struct too), the size check refuses it. */
  memset(&g.config, 0, sizeof g.config);
  g.config.num_layers = 1;
  g.config.num_q_heads = 1;
  g.config.num_kv_heads = 1;
  g.config.head_dim = 8;
  CHECK(kvrt_runtime_create(&g.config, &rt) == KVRT_ERR_INVALID_ARGUMENT && rt == NULL);

  /* Without a runtime nothing else can touch the program's structs. */
  memset(&stats, 0x5A, sizeof stats);
  CHECK(kvrt_get_stats(rt, &stats) == KVRT_ERR_INVALID_ARGUMENT);
  CHECK(kvrt_seq_release(rt, 0) == KVRT_ERR_INVALID_ARGUMENT);
  kvrt_runtime_destroy(rt); /* NULL: a no-op */
  printf("a program compiled against kvrt.h 0.2 gets a clean error\n");
  return 0;
}
