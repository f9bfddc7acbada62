#include "kvrt_cpu_index/dot.h"

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
  // NOTE: each query through DotRow, so a score is bit-identical to a single search's (tests and
  // the tail merge compare them); after the first query the row is in L1, which is the saving.
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

void DotRows(const float* q, const void* rows, int d, DType t, int64_t n, std::size_t stride_elems,
             float* out) {
  const std::size_t stride_bytes = stride_elems * DTypeSize(t);
  auto* base = static_cast<const unsigned char*>(rows);
  for (int64_t i = 0; i < n; ++i) out[i] = DotRow(q, base + i * stride_bytes, d, t);
}

}  // namespace kvrt::cpu_index
