/* c_replay TRACE: feeds a kvrt trace (safetensors) to libkvrt through the C API only: prefill of
 * each layer's prompt, then for each decode step an append and an attend. Prints the first
 * outputs and the runtime's statistics. The safetensors header is read with a few string
 * searches; a real decoder hands kvrt its own tensors instead. */
#include <kvrt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char* g_header;        /* the JSON header */
static unsigned char* g_data; /* the tensor bytes */
static uint64_t g_data_size;  /* bytes after the header */

static long meta_int(const char* key) {
  char pat[96];
  const char* p;
  snprintf(pat, sizeof pat, "\"%s\":\"", key);
  p = strstr(g_header, pat);
  return p ? atol(p + strlen(pat)) : -1;
}

/* Tensor `layer.part`, or NULL when it is missing or its [begin, end) offsets do not hold `bytes`
 * inside the file (a truncated or corrupt trace). */
static const void* tensor(int layer, const char* part, uint64_t bytes) {
  char pat[96];
  const char* p;
  char* rest;
  long long begin, end;
  snprintf(pat, sizeof pat, "\"%d.%s\":", layer, part);
  p = strstr(g_header, pat);
  if (p == NULL || (p = strstr(p, "\"data_offsets\":[")) == NULL) return NULL;
  begin = strtoll(p + strlen("\"data_offsets\":["), &rest, 10);
  if (*rest != ',') return NULL;
  end = strtoll(rest + 1, NULL, 10);
  if (begin < 0 || end < begin || (uint64_t)end > g_data_size || (uint64_t)(end - begin) < bytes)
    return NULL;
  return g_data + begin;
}

int main(int argc, char** argv) {
  FILE* f;
  uint64_t header_len = 0;
  long size;
  unsigned char* file;
  kvrt_config cfg = kvrt_config_default();
  kvrt_runtime* rt = NULL;
  kvrt_seq_id seq;
  kvrt_stats st = kvrt_stats_init();
  float* out;
  long layers, steps, prompt, step, layer;
  size_t es, kv_row, q_row;
  char dtype[8] = {0};
  const char* d;

  if (argc != 2) {
    fprintf(stderr, "usage: %s TRACE.safetensors\n", argv[0]);
    return 2;
  }
  if ((f = fopen(argv[1], "rb")) == NULL) {
    perror(argv[1]);
    return 1;
  }
  fseek(f, 0, SEEK_END);
  size = ftell(f);
  rewind(f);
  file = malloc((size_t)size + 1);
  if (file == NULL || fread(file, 1, (size_t)size, f) != (size_t)size || size < 8) {
    fprintf(stderr, "%s: cannot read\n", argv[1]);
    return 1;
  }
  fclose(f);
  memcpy(&header_len, file, 8); /* little-endian hosts only, as this is an example */
  if (header_len == 0 || header_len > (uint64_t)size - 8) {
    fprintf(stderr, "%s: corrupt header\n", argv[1]);
    return 1;
  }
  g_header = (char*)file + 8;
  g_data = file + 8 + header_len;
  g_data_size = (uint64_t)size - 8 - header_len;
  g_header[header_len - 1] = '\0'; /* the last byte is '}' or padding */

  layers = meta_int("num_layers");
  steps = meta_int("decode_steps");
  prompt = meta_int("prompt_tokens");
  if (layers < 1 || steps < 0 || prompt < 1) {
    fprintf(stderr, "%s: not a kvrt trace (num_layers, decode_steps or prompt_tokens missing)\n",
            argv[1]);
    return 1;
  }
  cfg.num_layers = (int32_t)layers;
  cfg.num_q_heads = (int32_t)meta_int("num_q_heads");
  cfg.num_kv_heads = (int32_t)meta_int("num_kv_heads");
  cfg.head_dim = (int32_t)meta_int("head_dim");
  d = strstr(g_header, "\"dtype\":\"");
  if (d) strncpy(dtype, d + 9, 4);
  /* The first "dtype" is the metadata's ("f32") or a tensor's ("F32"): all tensors share it. */
  cfg.dtype = (dtype[0] == 'f' || dtype[0] == 'F') && dtype[1] == '3'   ? KVRT_DTYPE_F32
              : (dtype[0] == 'f' || dtype[0] == 'F') && dtype[1] == '1' ? KVRT_DTYPE_F16
                                                                        : KVRT_DTYPE_BF16;
  cfg.window_tokens = 256;
  cfg.top_k = 64;
  cfg.index_kind = KVRT_INDEX_FLAT;
  if (kvrt_runtime_create(&cfg, &rt) != KVRT_OK || kvrt_seq_create(rt, &seq) != KVRT_OK) {
    fprintf(stderr, "kvrt: %s\n", kvrt_last_error());
    return 1;
  }
  es = cfg.dtype == KVRT_DTYPE_F32 ? 4 : 2;
  kv_row = (size_t)cfg.num_kv_heads * cfg.head_dim * es;
  q_row = (size_t)cfg.num_q_heads * cfg.head_dim * es;
  out = malloc(sizeof(float) * cfg.num_q_heads * cfg.head_dim);
  for (layer = 0; layer < layers; ++layer) {
    const unsigned char *dk = tensor(layer, "decode.k", steps * kv_row),
                        *dv = tensor(layer, "decode.v", steps * kv_row),
                        *dq = tensor(layer, "decode.q", steps * q_row);
    const void *pk = tensor(layer, "prefill.k", prompt * kv_row),
               *pv = tensor(layer, "prefill.v", prompt * kv_row),
               *pq = tensor(layer, "prefill.q", prompt * q_row);
    int n_print = cfg.num_q_heads * cfg.head_dim < 4 ? cfg.num_q_heads * cfg.head_dim : 4, i;
    if (!dk || !dv || !dq || !pk || !pv) {
      fprintf(stderr, "layer %ld: a tensor is missing or runs past the file (truncated?)\n", layer);
      return 1;
    }
    if (kvrt_prefill(rt, seq, layer, pq, pk, pv, prompt) != KVRT_OK) {
      fprintf(stderr, "layer %ld: %s\n", layer, kvrt_last_error());
      return 1;
    }
    for (step = 0; step < steps; ++step) {
      if (kvrt_append(rt, seq, layer, dk + step * kv_row, dv + step * kv_row, 1) != KVRT_OK ||
          kvrt_attend(rt, seq, layer, dq + step * q_row, out) != KVRT_OK) {
        fprintf(stderr, "layer %ld step %ld: %s\n", layer, step, kvrt_last_error());
        return 1;
      }
      if (!isfinite(out[0])) return 1;
    }
    printf("layer %ld: %ld prompt tokens + %ld steps", layer, prompt, steps);
    if (steps > 0) {
      printf(", out[0][0..%d] =", n_print - 1);
      for (i = 0; i < n_print; ++i) printf(" %.4f", out[i]);
    }
    printf("\n");
  }
  kvrt_get_stats(rt, &st);
  printf("kvrt %s: %lld attends, GPU tier %lld tokens, host %lld tokens, %lld keys scored\n",
         kvrt_version(), (long long)st.attend_calls, (long long)st.gpu_tokens,
         (long long)st.host_tokens, (long long)st.keys_scored);
  kvrt_runtime_destroy(rt);
  free(out);
  free(file);
  return 0;
}
