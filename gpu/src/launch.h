#pragma once
// Internal interface between the launchers (kernels.cc, C++20 + Abseil) and the CUDA translation
// units (*.cu, compiled by nvcc in C++17 without Abseil). Arguments are validated in kernels.cc;
// these functions only dispatch on dtype / head_dim and enqueue kernels.
#include <cstddef>
#include <cstdint>

#include "kvrt_gpu/kernel_types.h"

namespace kvrt::gpu::detail {

// cuda: a cudaError_t (0 = success); msg: static text of a dispatch failure (e.g. head_dim).
struct Err {
  int cuda = 0;
  const char* msg = nullptr;
  bool ok() const { return cuda == 0 && msg == nullptr; }
};

const char* CudaErrorName(int code);
int DeviceCount();  // 0 when the driver or a device is missing
int SmCount();      // multiprocessors of the current device (cached)

// Split-K plan shared by the launcher (workspace size) and the kernels.
struct SplitPlan {
  int num_splits = 1;
  int chunk = 0;  // tokens per split
};
SplitPlan PlanSplits(int units, int max_tokens, int split_tokens, int sm_count);

Err LaunchTierAttention(const TierBatch& tier, const void* q, const AttnParams& p, float scale,
                        const SplitPlan& plan, float* o, float* lse, float* workspace,
                        void* stream);
Err LaunchGatherAttend(const GatherBatch& g, const void* q, bool q_is_f32, float scale,
                       const SplitPlan& plan, float* o, float* lse, float* workspace, void* stream);
Err LaunchMergeStates(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                      int rows, int head_dim, void* out, DType out_dtype, float* lse_out,
                      void* stream);
// Preloads (LoadKernel) of a decode step's kernels in these files: the n-way merge into f32, the
// ring's row append and the conversion of q to f32.
Err PreloadMergeStatesN(int head_dim);
Err PreloadRing(DType dtype);
Err LaunchMergeStatesN(const float* o, const float* lse, int n, int rows, int head_dim, void* out,
                       DType out_dtype, float* lse_out, void* stream);
Err LaunchRingAppendToStore(const RingBatch& ring, const void* new_k, const void* new_v, int n_new,
                            const RingStoreTarget& store, int64_t* write_pos, int64_t* rows,
                            void* stream);
Err LaunchRingAppend(const RingBatch& ring, const void* new_k, const void* new_v, int n_new,
                     void* evict_k, void* evict_v, void* stream);
Err LaunchRingAppendRows(const RingRows& ring, const void* new_k, const void* new_v, int64_t n,
                         void* evict_k, void* evict_v, void* stream);
Err LaunchRingAppendRowsToHeads(const RingRows& ring, const void* new_k, const void* new_v,
                                int64_t n, const HeadRows& evict, void* stream);
Err LaunchRingGather(const RingBatch& ring, const int64_t* start, int count, void* out_k,
                     void* out_v, void* stream);
Err LaunchScatterRows(const void* src_k, const void* src_v, void* dst_k, void* dst_v,
                      const int32_t* dst_rows, int64_t n, std::size_t row_bytes, void* stream);
Err LaunchExpandRowRuns(const int32_t* runs, int64_t n_runs, int32_t* ids, void* stream);
Err LaunchFillF32(float* out, float value, int64_t n, void* stream);
Err LaunchCopySpans(const CopySpan* spans, int n, void* stream);
Err LaunchConvertToF32(const void* in, DType t, int64_t n, float* out, void* stream);
Err LaunchExactTopK(const TopKProblem& pr, int32_t* ids, float* scores, void* stream);
// Stream-ordered scratch (cudaMallocAsync / cudaFreeAsync).
Err AllocAsync(void** p, std::size_t bytes, void* stream);
Err FreeAsync(void* p, void* stream);

}  // namespace kvrt::gpu::detail
