// Dtype dispatch of the attention kernels (instantiated in attend_{f32,f16,bf16}.cu), split-K
// planning and the device queries.
#include <algorithm>

#include "common.cuh"

namespace kvrt::gpu::detail {

template <typename T>
Err TierAttentionT(const TierBatch&, const void*, const AttnParams&, float, const SplitPlan&,
                   float*, float*, float*, void*);
template <typename T>
Err GatherAttendT(const GatherBatch&, const void*, bool, float, const SplitPlan&, float*, float*,
                  float*, void*);
extern template Err TierAttentionT<float>(const TierBatch&, const void*, const AttnParams&, float,
                                          const SplitPlan&, float*, float*, float*, void*);
extern template Err TierAttentionT<__half>(const TierBatch&, const void*, const AttnParams&, float,
                                           const SplitPlan&, float*, float*, float*, void*);
extern template Err TierAttentionT<__nv_bfloat16>(const TierBatch&, const void*, const AttnParams&,
                                                  float, const SplitPlan&, float*, float*, float*,
                                                  void*);
extern template Err GatherAttendT<float>(const GatherBatch&, const void*, bool, float,
                                         const SplitPlan&, float*, float*, float*, void*);
extern template Err GatherAttendT<__half>(const GatherBatch&, const void*, bool, float,
                                          const SplitPlan&, float*, float*, float*, void*);
extern template Err GatherAttendT<__nv_bfloat16>(const GatherBatch&, const void*, bool, float,
                                                 const SplitPlan&, float*, float*, float*, void*);

const char* CudaErrorName(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

int SmCount() {
  // NOTE: cached per device ordinal; cudaDeviceGetAttribute is cheap but not free on the decode
  // path.
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      n = 132;
    }
    cache[dev] = n;
  }
  return cache[dev];
}

SplitPlan PlanSplits(int units, int max_tokens, int split_tokens, int sm_count) {
  SplitPlan p;
  if (max_tokens <= 0) {
    p.chunk = 1;
    return p;
  }
  int chunk;
  if (split_tokens > 0) {
    chunk = split_tokens;
  } else {
    // NOTE: aim for ~4 CTAs per SM (enough loads in flight to approach HBM bandwidth at batch 1)
    // but no chunk under 64 rows, where the split merge starts to cost more than it hides.
    const int want = std::max(1, (4 * sm_count + std::max(units, 1) - 1) / std::max(units, 1));
    const int most = (max_tokens + 63) / 64;
    const int splits = std::min(want, most);
    chunk = (max_tokens + splits - 1) / splits;
    chunk = (chunk + 31) / 32 * 32;
  }
  p.num_splits = (max_tokens + chunk - 1) / chunk;
  if (p.num_splits > 65535) {  // grid.y limit
    p.num_splits = 65535;
    chunk = (max_tokens + p.num_splits - 1) / p.num_splits;
    p.num_splits = (max_tokens + chunk - 1) / chunk;
  }
  p.chunk = chunk;
  return p;
}

Err LaunchTierAttention(const TierBatch& tier, const void* q, const AttnParams& p, float scale,
                        const SplitPlan& plan, float* o, float* lse, float* workspace,
                        void* stream) {
  KVRT_DISPATCH_DTYPE(tier.dtype, T, {
    return TierAttentionT<T>(tier, q, p, scale, plan, o, lse, workspace, stream);
  })
  return {};
}

Err LaunchGatherAttend(const GatherBatch& g, const void* q, bool q_is_f32, float scale,
                       const SplitPlan& plan, float* o, float* lse, float* workspace,
                       void* stream) {
  KVRT_DISPATCH_DTYPE(g.dtype, T, {
    return GatherAttendT<T>(g, q, q_is_f32, scale, plan, o, lse, workspace, stream);
  })
  return {};
}

Err AllocAsync(void** p, std::size_t bytes, void* stream) {
  return CudaErr(cudaMallocAsync(p, bytes, AsStream(stream)));
}
Err FreeAsync(void* p, void* stream) { return CudaErr(cudaFreeAsync(p, AsStream(stream))); }

}  // namespace kvrt::gpu::detail
