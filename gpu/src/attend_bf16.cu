// Instantiates the attention kernels for bf16 storage (one dtype per translation unit).
#include "attend.cuh"

namespace kvrt::gpu::detail {
template Err TierAttentionT<__nv_bfloat16>(const TierBatch&, const void*, const AttnParams&, float,
                                           const SplitPlan&, float*, float*, float*, void*);
template Err GatherAttendT<__nv_bfloat16>(const GatherBatch&, const void*, bool, float,
                                          const SplitPlan&, float*, float*, float*, void*);
}  // namespace kvrt::gpu::detail
