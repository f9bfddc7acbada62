// Instantiates the attention kernels for f32 storage (one dtype per translation unit).
#include "attend.cuh"

namespace kvrt::gpu::detail {
template Err TierAttentionT<float>(const TierBatch&, const void*, const AttnParams&, float,
                                   const SplitPlan&, float*, float*, float*, void*);
template Err GatherAttendT<float>(const GatherBatch&, const void*, bool, float, const SplitPlan&,
                                  float*, float*, float*, void*);
}  // namespace kvrt::gpu::detail
