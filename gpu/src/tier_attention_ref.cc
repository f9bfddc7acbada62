// Host references of the tier attention and merge kernels: the host backend's own attention and
// merge (cpu_index/attention.h), so the kernels are tested against what runs without a GPU.
#include <vector>

#include "kvrt_cpu_index/attention.h"
#include "kvrt_gpu/tier_attention.h"

namespace kvrt::gpu {
namespace {

const unsigned char* HeadBase(const void* base, int kv_head, const TierView& t) {
  if (base == nullptr) return nullptr;
  return static_cast<const unsigned char*>(base) +
         static_cast<std::size_t>(kv_head) * t.head_dim * DTypeSize(t.dtype);
}

}  // namespace

void TierAttentionHost(const TierView& t, const float* q, int q_heads, float scale, float* o,
                       float* lse) {
  const int d = t.head_dim;
  const int group = q_heads / t.kv_heads;
  const std::size_t stride = static_cast<std::size_t>(t.kv_heads) * d;
  std::vector<float> o2(d);
  for (int h = 0; h < q_heads; ++h) {
    const int g = h / group;
    const float* qh = q + static_cast<std::size_t>(h) * d;
    float* oh = o + static_cast<std::size_t>(h) * d;
    float lse2;
    cpu_index::AttendDense(qh, d, scale, HeadBase(t.sink_k, g, t), HeadBase(t.sink_v, g, t), stride,
                           t.dtype, t.n_sink, oh, &lse[h]);
    cpu_index::AttendDense(qh, d, scale, HeadBase(t.window_k, g, t), HeadBase(t.window_v, g, t),
                           stride, t.dtype, t.n_window, o2.data(), &lse2);
    cpu_index::MergeInto(oh, &lse[h], o2.data(), lse2, d);
  }
}

void MergeStatesHost(float* o, float* lse, const float* o2, const float* lse2, int heads, int d) {
  for (int h = 0; h < heads; ++h) {
    const std::size_t off = static_cast<std::size_t>(h) * d;
    cpu_index::MergeInto(o + off, &lse[h], o2 + off, lse2[h], d);
  }
}

}  // namespace kvrt::gpu
