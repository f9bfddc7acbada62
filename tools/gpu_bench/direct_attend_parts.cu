// direct_attend_parts: the direct step's attention kernel taken apart (docs/benchmarks.md). Built
// three times from gpu/src/direct_attend.cu: as it is, without its arithmetic
// (KVRT_DIRECT_PARTS=1) and without its K/V loads (=2); each times DirectAttend over rows that
// all come from the device pool (8 kv heads, 32 q heads, d = 128, bf16, --rows per kv head, every
// q head attending every row: the case of a step whose selection is cached).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// The parts left out make the loops after them unreachable: expected here.
#pragma nv_diag_suppress 128
// The kernel itself, built with this target's KVRT_DIRECT_PARTS.
#include "direct_attend.cu"  // NOLINT

namespace {

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "direct_attend_parts: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 10240;
  int iters = 200;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--rows") == 0 && i + 1 < argc) {
      rows = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::printf(
          "usage: %s [--rows N (per kv head, multiple of 8; 10240)] [--iters N (200)]\n"
          "Times the direct step's attention kernel, every row from the device pool.\n",
          argv[0]);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  if (rows <= 0 || rows % kvrt::gpu::kDirectBlockRows != 0 || iters <= 0) {
    std::fprintf(stderr, "direct_attend_parts: --rows must be a positive multiple of 8\n");
    return 2;
  }
  namespace g = kvrt::gpu;
  const int kv = 8, qh = 32, d = 128;
  const std::size_t row_bytes = d * 2;
  const int64_t blocks = rows / g::kDirectBlockRows, pages = kv * blocks;
  const std::size_t pool_bytes = static_cast<std::size_t>(pages) * g::kDirectBlockRows * row_bytes;
  void *pool_k = nullptr, *pool_v = nullptr, *ptrs = nullptr, *table = nullptr, *tail = nullptr;
  float *q = nullptr, *o = nullptr, *lse = nullptr, *ws = nullptr;
  std::vector<int32_t> page(pages);
  for (int64_t i = 0; i < pages; ++i) page[i] = static_cast<int32_t>(i);
  const std::vector<int64_t> tail_begin(kv, 0);  // every row is in the "tail": all heads take it
  std::vector<float> qv(static_cast<std::size_t>(qh) * d);
  for (std::size_t i = 0; i < qv.size(); ++i) qv[i] = 0.01f * static_cast<float>(i % 97);
  if (!Ok(cudaMalloc(&pool_k, pool_bytes), "pool") ||
      !Ok(cudaMalloc(&pool_v, pool_bytes), "pool") ||
      !Ok(cudaMemset(pool_k, 0x3c, pool_bytes), "pool") ||
      !Ok(cudaMemset(pool_v, 0x3c, pool_bytes), "pool") ||
      !Ok(cudaMalloc(&ptrs, kv * sizeof(void*)), "stores") ||
      !Ok(cudaMalloc(&table, pages * 4), "table") || !Ok(cudaMalloc(&tail, kv * 8), "tail") ||
      !Ok(cudaMalloc(&q, qv.size() * 4), "q") || !Ok(cudaMalloc(&o, qv.size() * 4), "o") ||
      !Ok(cudaMalloc(&lse, qh * 4), "lse")) {
    return 1;
  }
  const std::vector<const void*> stores(kv, pool_k);  // never read: every block has a page
  cudaMemcpy(ptrs, stores.data(), kv * sizeof(void*), cudaMemcpyHostToDevice);
  cudaMemcpy(table, page.data(), pages * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(tail, tail_begin.data(), kv * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(q, qv.data(), qv.size() * 4, cudaMemcpyHostToDevice);
  g::DirectRowsView v;
  v.kv_heads = kv;
  v.q_heads = qh;
  v.head_dim = d;
  v.dtype = kvrt::DType::kBF16;
  v.rows = rows;
  v.store_k = v.store_v = static_cast<const void* const*>(ptrs);
  v.block_page = static_cast<int32_t*>(table);
  v.blocks_per_head = blocks;
  v.pool_k = pool_k;
  v.pool_v = pool_v;
  v.pages = pages;
  v.tail_begin = static_cast<const int64_t*>(tail);
  if (!Ok(cudaMalloc(&ws, g::detail::DirectWorkspaceFloats(v) * 4), "workspace")) return 1;
  auto run = [&] {
    return g::detail::LaunchDirectAttend(v, nullptr, q, 0.0884f, o, lse, nullptr, ws, nullptr);
  };
  for (int i = 0; i < 5; ++i) (void)run();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  for (int i = 0; i < iters; ++i) (void)run();
  cudaEventRecord(e1);
  if (!Ok(cudaEventSynchronize(e1), "DirectAttend")) return 1;
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  const double us = 1e3 * ms / iters, mb = 2.0 * rows * kv * row_bytes / 1e6;
  const char* part = KVRT_DIRECT_PARTS == 1   ? "without arithmetic"
                     : KVRT_DIRECT_PARTS == 2 ? "without K/V loads"
                                              : "whole kernel";
  std::printf(
      "direct attend (%s): %.1f us per call, %lld rows x %d kv heads from the pool "
      "(%.1f MB, %.0f GB/s)\n",
      part, us, static_cast<long long>(rows), kv, mb, mb / us * 1e3);
  return Ok(cudaGetLastError(), "DirectAttend") ? 0 : 1;
}
