#pragma once
// A small f32 configuration for API tests: `layers` layers, `q_heads` q heads over one kv head,
// head_dim 4. Tests set the fields their case is about on top of it.
#include "kvrt.h"

inline kvrt_config TinyConfig(int layers = 1, int q_heads = 2) {
  kvrt_config c = kvrt_config_default();
  c.num_layers = layers;
  c.num_q_heads = q_heads;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.dtype = KVRT_DTYPE_F32;
  return c;
}
