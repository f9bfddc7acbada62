// kernel_trace_inject: the device timeline of any CUDA program (its kernels and memory copies,
// start and end on the GPU's clock), for machines without Nsight Systems. Loaded by the CUDA
// driver at initialization through CUDA_INJECTION64_PATH (no change to the program):
//
//   KVRT_KERNEL_TRACE=out.csv CUDA_INJECTION64_PATH=libkernel_trace_inject.so kvrt bench decode ...
//
// writes one line per activity: `K,start_ns,end_ns,stream,name` for a kernel and
// `M,start_ns,end_ns,stream,bytes` for a copy or memset (`S`), read by tools/gpu_bench/gpu_busy.py.
// Concurrent-kernel records, so kernels of different streams keep their real overlap.
#include <cupti.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {

std::FILE* g_out = nullptr;
std::mutex g_mu;
constexpr std::size_t kBufferBytes = 16u << 20;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mu);
  CUpti_Activity* rec = nullptr;
  while (g_out != nullptr && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
      std::fprintf(g_out, "K,%llu,%llu,%u,%s\n", static_cast<unsigned long long>(k->start),
                   static_cast<unsigned long long>(k->end), k->streamId,
                   k->name != nullptr ? k->name : "?");
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
      std::fprintf(g_out, "M,%llu,%llu,%u,%llu\n", static_cast<unsigned long long>(m->start),
                   static_cast<unsigned long long>(m->end), m->streamId,
                   static_cast<unsigned long long>(m->bytes));
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
      std::fprintf(g_out, "S,%llu,%llu,%u,%llu\n", static_cast<unsigned long long>(m->start),
                   static_cast<unsigned long long>(m->end), m->streamId,
                   static_cast<unsigned long long>(m->bytes));
    }
  }
  std::free(buffer);
}

void FlushAtExit() {
  (void)cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_out != nullptr) std::fclose(g_out);
  g_out = nullptr;
}

}  // namespace

// The driver calls this once, at cuInit, when CUDA_INJECTION64_PATH names this library (exported
// by name: the project builds with hidden visibility).
extern "C" __attribute__((visibility("default"))) int InitializeInjection() {
  const char* path = std::getenv("KVRT_KERNEL_TRACE");
  g_out = std::fopen(path != nullptr ? path : "kernel_trace.csv", "w");
  if (g_out == nullptr) {
    std::fprintf(stderr, "kernel_trace_inject: cannot write %s\n",
                 path ? path : "kernel_trace.csv");
    return 0;
  }
  if (cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel_trace_inject: CUPTI activity tracing could not start\n");
    return 0;
  }
  std::atexit(FlushAtExit);
  return 1;
}
