#pragma once
// Decode partial attention over the GPU tier of one (sequence, layer): the sinks and the window
// ring. Host reference here; the CUDA kernel (tier_attention.cu) computes the same thing.
#include <cstdint>

#include "kvrt_common/dtype.h"

namespace kvrt::gpu {

// Tensors of one tier, in storage dtype, [rows, kv_heads, head_dim] contiguous.
struct TierView {
  const void* sink_k = nullptr;  // [n_sink, kv_heads, d]
  const void* sink_v = nullptr;
  int64_t n_sink = 0;
  const void* window_k = nullptr;  // [window_capacity, kv_heads, d] ring; rows [0, n_window) valid
  const void* window_v = nullptr;
  int64_t n_window = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
};

// q: f32 [q_heads, d]. o: f32 [q_heads, d] (normalised), lse: f32 [q_heads] (-inf if the tier is
// empty). q head h reads kv head h / (q_heads / kv_heads).
void TierAttentionHost(const TierView& tier, const float* q, int q_heads, float scale, float* o,
                       float* lse);

// In place: (o, lse)[h] = merge((o, lse)[h], (o2, lse2)[h]) for h < heads; o rows of d floats.
// Two empty states merge to an empty state (lse -inf, o 0), never NaN.
void MergeStatesHost(float* o, float* lse, const float* o2, const float* lse2, int heads, int d);

}  // namespace kvrt::gpu
