#pragma once
// KVRT_MULTIVERSION: build a hot loop for AVX-512, AVX2 and baseline x86-64 and pick one at load
// time (CI's CPU may lack AVX-512, the GPU machine's has it). Write the loop so GCC vectorises
// it (independent accumulators, branch-free bodies).
// NOTE: empty under TSan: GCC's ifunc resolver would be instrumented and run at relocation time,
// before the TSan runtime exists, and the binary would crash at load (scripts/sanitize.sh --tsan).
#if defined(__SANITIZE_THREAD__) || !defined(__x86_64__)
#define KVRT_MULTIVERSION
#else
#define KVRT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
