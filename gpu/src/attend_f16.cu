// Instantiates the attention kernels for f16 storage (one dtype per translation unit).
#include "attend.cuh"

namespace kvrt::gpu::detail {
template Err TierAttentionT<__half>(const TierBatch&, const void*, const AttnParams&, float,
                                    const SplitPlan&, float*, float*, float*, void*);
template Err GatherAttendT<__half>(const GatherBatch&, const void*, bool, float, const SplitPlan&,
                                   float*, float*, float*, void*);
}  // namespace kvrt::gpu::detail
