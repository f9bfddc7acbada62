#pragma once
// What the *_parts benchmarks (tools/gpu_bench/*_parts.cu) share: their two arguments, CUDA
// error reports, device buffers and the event timing of a launch.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace kvrt::gpu_bench {

// argv: `--<count_flag> N` (its default in *count) and `--iters N` (*iters). -1: go on; else the
// exit code (0 after --help, 2 for a bad or non-positive argument, with the usage printed).
inline int ParsePartsArgs(int argc, char** argv, const char* tool, const char* count_flag,
                          const char* count_help, const char* what, int64_t* count, int* iters) {
  const std::string flag = std::string("--") + count_flag;
  for (int i = 1; i < argc; ++i) {
    if (flag == argv[i] && i + 1 < argc) {
      *count = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      *iters = std::atoi(argv[++i]);
    } else {
      std::printf("usage: %s [%s N (%s)] [--iters N (200)]\n%s\n", argv[0], flag.c_str(),
                  count_help, what);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  if (*count <= 0 || *iters <= 0) {
    std::fprintf(stderr, "%s: %s and --iters must be positive\n", tool, flag.c_str());
    return 2;
  }
  return -1;
}

inline bool CudaOk(const char* tool, cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s: %s\n", tool, what, cudaGetErrorString(e));
  return false;
}

// Device copies; *ok turns false (and stays so) at the first failure, reported.
template <typename T>
T* Alloc(const char* tool, std::size_t n, bool* ok) {
  void* p = nullptr;
  *ok = *ok && CudaOk(tool, cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(p);
}
template <typename T>
T* Upload(const char* tool, const std::vector<T>& v, bool* ok) {
  T* p = Alloc<T>(tool, v.size(), ok);
  *ok = *ok && CudaOk(tool, cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
                      "upload");
  return p;
}

// Microseconds per launch() over iters launches on the default stream, after 5 unmeasured ones;
// -1 (reported) on a CUDA error.
template <typename Launch>
double TimeUs(const char* tool, const char* what, int iters, Launch launch) {
  for (int i = 0; i < 5; ++i) launch();
  cudaEvent_t e0, e1;
  if (!CudaOk(tool, cudaEventCreate(&e0), what) || !CudaOk(tool, cudaEventCreate(&e1), what))
    return -1.0;
  cudaEventRecord(e0);
  for (int i = 0; i < iters; ++i) launch();
  cudaEventRecord(e1);
  const bool ok =
      CudaOk(tool, cudaEventSynchronize(e1), what) && CudaOk(tool, cudaGetLastError(), what);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ok ? 1e3 * ms / iters : -1.0;
}

}  // namespace kvrt::gpu_bench
