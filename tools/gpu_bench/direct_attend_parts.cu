// direct_attend_parts: the direct step's attention kernel taken apart (docs/benchmarks.md). Built
// three times from gpu/src/direct_attend.cu: as it is, without its arithmetic
// (KVRT_DIRECT_PARTS=1) and without its K/V loads (=2); each times DirectAttend over rows that
// all come from the device pool (8 kv heads, 32 q heads, d = 128, bf16, --rows per kv head, every
// q head attending every row: the case of a step whose selection is cached).
#include <cstdio>
#include <vector>

#include "parts_harness.h"

// The parts left out make the loops after them unreachable: expected here.
#pragma nv_diag_suppress 128
// The kernel itself, built with this target's KVRT_DIRECT_PARTS.
#include "direct_attend.cu"  // NOLINT

int main(int argc, char** argv) {
  namespace g = kvrt::gpu;
  namespace b = kvrt::gpu_bench;
  constexpr const char* kTool = "direct_attend_parts";
  int64_t rows = 10240;
  int iters = 200;
  if (const int rc = b::ParsePartsArgs(
          argc, argv, kTool, "rows", "per kv head, multiple of 8; 10240",
          "Times the direct step's attention kernel, every row from the device pool.", &rows,
          &iters);
      rc >= 0) {
    return rc;
  }
  if (rows % g::kDirectBlockRows != 0) {
    std::fprintf(stderr, "%s: --rows must be a positive multiple of 8\n", kTool);
    return 2;
  }
  const int kv = 8, qh = 32, d = 128;
  const std::size_t row_bytes = d * 2;
  const int64_t blocks = rows / g::kDirectBlockRows, pages = kv * blocks;
  const std::size_t pool_rows = static_cast<std::size_t>(pages) * g::kDirectBlockRows;
  std::vector<int32_t> page(pages);
  for (int64_t i = 0; i < pages; ++i) page[i] = static_cast<int32_t>(i);
  std::vector<float> qv(static_cast<std::size_t>(qh) * d);
  for (std::size_t i = 0; i < qv.size(); ++i) qv[i] = 0.01f * static_cast<float>(i % 97);
  bool ok = true;
  uint16_t* pool_k = b::Alloc<uint16_t>(kTool, pool_rows * d, &ok);
  uint16_t* pool_v = b::Alloc<uint16_t>(kTool, pool_rows * d, &ok);
  ok = ok && b::CudaOk(kTool, cudaMemset(pool_k, 0x3c, pool_rows * row_bytes), "pool") &&
       b::CudaOk(kTool, cudaMemset(pool_v, 0x3c, pool_rows * row_bytes), "pool");
  // Never read: every block has a page.
  const void* const* stores = b::Upload(kTool, std::vector<const void*>(kv, pool_k), &ok);
  int32_t* table = b::Upload(kTool, page, &ok);
  // Every row is in the "tail": all heads take it.
  const int64_t* tail = b::Upload(kTool, std::vector<int64_t>(kv, 0), &ok);
  const float* q = b::Upload(kTool, qv, &ok);
  float* o = b::Alloc<float>(kTool, qv.size(), &ok);
  float* lse = b::Alloc<float>(kTool, qh, &ok);
  if (!ok) return 1;
  g::DirectRowsView v;
  v.kv_heads = kv;
  v.q_heads = qh;
  v.head_dim = d;
  v.dtype = kvrt::DType::kBF16;
  v.rows = rows;
  v.store_k = v.store_v = stores;
  v.block_page = table;
  v.blocks_per_head = blocks;
  v.pool_k = pool_k;
  v.pool_v = pool_v;
  v.pages = pages;
  v.tail_begin = tail;
  float* ws = b::Alloc<float>(kTool, g::detail::DirectWorkspaceFloats(v), &ok);
  if (!ok) return 1;
  const double us = b::TimeUs(kTool, "DirectAttend", iters, [&] {
    (void)g::detail::LaunchDirectAttend(v, nullptr, q, 0.0884f, o, lse, nullptr, ws, nullptr,
                                        nullptr);
  });
  if (us < 0) return 1;
  const double mb = 2.0 * rows * kv * row_bytes / 1e6;
  const char* part = KVRT_DIRECT_PARTS == 1   ? "without arithmetic"
                     : KVRT_DIRECT_PARTS == 2 ? "without K/V loads"
                                              : "whole kernel";
  std::printf(
      "direct attend (%s): %.1f us per call, %lld rows x %d kv heads from the pool "
      "(%.1f MB, %.0f GB/s)\n",
      part, us, static_cast<long long>(rows), kv, mb, mb / us * 1e3);
  return 0;
}
