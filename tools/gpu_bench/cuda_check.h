#pragma once
// The benchmark programs' check of a CUDA runtime call: on failure, the call, where it is and
// CUDA's message on stderr, then exit(1) (a benchmark has nothing to recover).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define KVRT_BENCH_CUDA(expr)                                                                    \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
