#include "kvrt_cpu_index/dot.h"

#include <vector>

#include "kvrt_common/multiversion.h"

namespace kvrt::cpu_index {
namespace {

// The loops are multiversioned (kvrt_common/multiversion.h) and written so GCC vectorises them
// (16 independent accumulators).

// Pairwise sum of the 16 accumulators: 4 vector adds instead of a chain of 16 dependent scalar
// adds (~60 cycles, a third of a 128-wide dot product).
inline float SumLanes(float* acc) {
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

KVRT_MULTIVERSION float DotF32(const float* q, const float* k, int d) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += q[i + j] * k[i + j];
  float s = 0.f;
  for (; i < d; ++i) s += q[i] * k[i];
  return s + SumLanes(acc);
}

KVRT_MULTIVERSION float DotBf16(const float* q, const uint16_t* k, int d) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) {
      const uint32_t u = static_cast<uint32_t>(k[i + j]) << 16;
      float f;
      __builtin_memcpy(&f, &u, 4);
      acc[j] += q[i + j] * f;
    }
  float s = 0.f;
  for (; i < d; ++i) s += q[i] * Bf16ToF32(k[i]);
  return s + SumLanes(acc);
}

// DotF32 of four queries (q, q + stride, ...) against one row: each of the row's chunks loaded
// once for the four. Each query's arithmetic is DotF32's, in its order, so the scores are
// bit-identical to it.
KVRT_MULTIVERSION void DotF32x4(const float* q, std::size_t stride, const float* k, int d,
                                float* out) {
  float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
  const float *q0 = q, *q1 = q + stride, *q2 = q + 2 * stride, *q3 = q + 3 * stride;
  int i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float x = k[i + j];
      a0[j] += q0[i + j] * x;
      a1[j] += q1[i + j] * x;
      a2[j] += q2[i + j] * x;
      a3[j] += q3[i + j] * x;
    }
  float s[4] = {};
  for (; i < d; ++i) {
    s[0] += q0[i] * k[i];
    s[1] += q1[i] * k[i];
    s[2] += q2[i] * k[i];
    s[3] += q3[i] * k[i];
  }
  out[0] = s[0] + SumLanes(a0);
  out[1] = s[1] + SumLanes(a1);
  out[2] = s[2] + SumLanes(a2);
  out[3] = s[3] + SumLanes(a3);
}

float DotF16(const float* q, const uint16_t* k, int d) {
  float buf[512];
  float s = 0.f;
  for (int base = 0; base < d; base += 512) {
    const int n = d - base < 512 ? d - base : 512;
    for (int i = 0; i < n; ++i) buf[i] = F16ToF32(k[base + i]);
    s += DotF32(q + base, buf, n);
  }
  return s;
}

}  // namespace

float DotRow(const float* q, const void* row, int d, DType t) {
  switch (t) {
    case DType::kF32: return DotF32(q, static_cast<const float*>(row), d);
    case DType::kBF16: return DotBf16(q, static_cast<const uint16_t*>(row), d);
    case DType::kF16: return DotF16(q, static_cast<const uint16_t*>(row), d);
  }
  return 0.f;
}

void DotRowMulti(const float* qs, int nq, const void* row, int d, DType t, float* out) {
  // NOTE: each score is bit-identical to DotRow's, a single search's (tests and the tail merge
  // compare them); after the first query the row is in L1, which is the saving, and a bf16 row is
  // widened once for all the queries.
  constexpr int kWidest = 1024;  // the runtime's head_dim limit
  if (t == DType::kBF16 && nq > 1 && d <= kWidest) {
    // The row widened once (exact), then DotF32 per query: DotBf16's arithmetic in its order
    // (no contraction in this file), without widening the row again for every query.
    float buf[kWidest];
    ConvertToF32(row, DType::kBF16, d, buf);
    int j = 0;
    for (; j + 4 <= nq; j += 4) DotF32x4(qs + static_cast<std::size_t>(j) * d, d, buf, d, out + j);
    for (; j < nq; ++j) out[j] = DotF32(qs + static_cast<std::size_t>(j) * d, buf, d);
    return;
  }
  for (int j = 0; j < nq; ++j) out[j] = DotRow(qs + static_cast<std::size_t>(j) * d, row, d, t);
}

KVRT_MULTIVERSION void AddScaledRow(const float* w, std::size_t w_stride, int nq, const float* x,
                                    float* y, int d) {
  for (int h = 0; h < nq; ++h) {
    const float wh = w[h * w_stride];
    float* yh = y + static_cast<std::size_t>(h) * d;
    for (int i = 0; i < d; ++i) yh[i] += wh * x[i];
  }
}

// Four heads' weighted sums over a run of bf16 rows, 16 dims at a time: each row's 16 values
// widened once for the four and their sums held in registers over the whole run (AddScaledRow
// per row reads and writes every head's sum once per row). Heads past nk get weight 0 and are
// not stored, so a head's sums are the same whatever its place in a group.
KVRT_MULTIVERSION void AddWeightedRowsBf16x4(const float* w, std::size_t w_stride, int nk,
                                             const void* const* rows, int64_t n, int d, float* y) {
  // Heads past nk read a weight of 0 (a step of 0 over `zeros`) into sums that are never stored.
  float zeros[1] = {0.f};
  const float* wp[4];
  for (int k = 0; k < 4; ++k) wp[k] = k < nk ? w + k * w_stride : zeros;
  const std::size_t step[4] = {1, nk > 1 ? 1u : 0u, nk > 2 ? 1u : 0u, nk > 3 ? 1u : 0u};
  int t0 = 0;
  for (; t0 + 16 <= d; t0 += 16) {
    float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
    for (int l = 0; l < 16; ++l) a0[l] = y[t0 + l];
    if (nk > 1)
      for (int l = 0; l < 16; ++l) a1[l] = y[static_cast<std::size_t>(d) + t0 + l];
    if (nk > 2)
      for (int l = 0; l < 16; ++l) a2[l] = y[2 * static_cast<std::size_t>(d) + t0 + l];
    if (nk > 3)
      for (int l = 0; l < 16; ++l) a3[l] = y[3 * static_cast<std::size_t>(d) + t0 + l];
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* r = static_cast<const uint16_t*>(rows[j]) + t0;
      const float w0 = wp[0][j * step[0]], w1 = wp[1][j * step[1]], w2 = wp[2][j * step[2]],
                  w3 = wp[3][j * step[3]];
      for (int l = 0; l < 16; ++l) {
        const uint32_t u = static_cast<uint32_t>(r[l]) << 16;
        float x;
        __builtin_memcpy(&x, &u, 4);
        a0[l] += w0 * x;
        a1[l] += w1 * x;
        a2[l] += w2 * x;
        a3[l] += w3 * x;
      }
    }
    for (int l = 0; l < 16; ++l) y[t0 + l] = a0[l];
    if (nk > 1)
      for (int l = 0; l < 16; ++l) y[static_cast<std::size_t>(d) + t0 + l] = a1[l];
    if (nk > 2)
      for (int l = 0; l < 16; ++l) y[2 * static_cast<std::size_t>(d) + t0 + l] = a2[l];
    if (nk > 3)
      for (int l = 0; l < 16; ++l) y[3 * static_cast<std::size_t>(d) + t0 + l] = a3[l];
  }
  for (; t0 < d; ++t0)
    for (int64_t j = 0; j < n; ++j) {
      const float x = Bf16ToF32(static_cast<const uint16_t*>(rows[j])[t0]);
      for (int k = 0; k < nk; ++k)
        y[static_cast<std::size_t>(k) * d + t0] += w[k * w_stride + j] * x;
    }
}

void AddWeightedRowPointers(const float* w, std::size_t w_stride, int nh, const void* const* rows,
                            DType t, int64_t n, int d, float* y) {
  if (t == DType::kBF16) {
    for (int k = 0; k < nh; k += 4)
      AddWeightedRowsBf16x4(w + k * w_stride, w_stride, nh - k < 4 ? nh - k : 4, rows, n, d,
                            y + static_cast<std::size_t>(k) * d);
    return;
  }
  std::vector<float> x(d);
  for (int64_t j = 0; j < n; ++j) {
    ConvertToF32(rows[j], t, d, x.data());
    AddScaledRow(w + j, w_stride, nh, x.data(), y, d);
  }
}

void AddWeightedRows(const float* w, std::size_t w_stride, int nh, const void* rows, DType t,
                     int64_t n, int d, float* y) {
  // In runs of row pointers (the kernel takes scattered rows: the attention's selected ones).
  constexpr int64_t kRun = 256;
  const void* at[kRun];
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(t);
  for (int64_t j0 = 0; j0 < n; j0 += kRun) {
    const int64_t len = n - j0 < kRun ? n - j0 : kRun;
    for (int64_t j = 0; j < len; ++j)
      at[j] = static_cast<const unsigned char*>(rows) + (j0 + j) * row_bytes;
    AddWeightedRowPointers(w + j0, w_stride, nh, at, t, len, d, y);
  }
}

void DotRows(const float* q, const void* rows, int d, DType t, int64_t n, std::size_t stride_elems,
             float* out) {
  const std::size_t stride_bytes = stride_elems * DTypeSize(t);
  auto* base = static_cast<const unsigned char*>(rows);
  for (int64_t i = 0; i < n; ++i) out[i] = DotRow(q, base + i * stride_bytes, d, t);
}

}  // namespace kvrt::cpu_index
