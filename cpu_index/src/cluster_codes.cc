// cluster kind: compact key codes for the second stage (ClusterConfig::rescore_bits, cluster.h).
// A key is coded as its residual from its cluster's bf16 centroid (the summary's, so that a
// device holding the summary needs only the codes), channel by channel on a uniform grid whose
// step is a multiple of the channel's residual deviation over the segment: the step that
// minimises a unit Gaussian's mean squared error for the level count (Max, 1960), centred on the
// channel's mean residual. Residuals are narrower than keys (a cluster's keys lie near its mean),
// so few bits still order a candidate's rows.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kvrt_common/dtype.h"
#include "kvrt_cpu_index/cluster.h"

namespace kvrt::cpu_index {
namespace {

float GaussianStep(int bits) {
  switch (bits) {
    case 1: return 1.596f;
    case 2: return 0.9957f;
    case 4: return 0.3352f;
    default: return 0.0308f;  // 8
  }
}

}  // namespace

bool ValidCodeBits(int bits) { return bits == 1 || bits == 2 || bits == 4 || bits == 8; }

int64_t CodeRowBytes(int dim, int bits) { return (static_cast<int64_t>(dim) * bits + 7) / 8; }

void EncodeResiduals(const float* keys, const SegmentClustering& part, const uint16_t* centroid,
                     int dim, int bits, SegmentCodes* out, bool laid_out) {
  const int64_t n = static_cast<int64_t>(part.order.size());
  const int64_t clustered = n - part.num_outliers;
  const int64_t row_bytes = CodeRowBytes(dim, bits);
  const int levels = 1 << bits;
  out->code.assign(static_cast<std::size_t>(n * row_bytes), 0);
  out->offset.assign(dim, 0.f);
  out->step.assign(dim, 0.f);
  std::vector<float> res(static_cast<std::size_t>(clustered) * dim);  // layout order
  {
    int64_t row = 0;
    for (std::size_t j = 0; j < part.size.size(); ++j) {
      const uint16_t* c = centroid + j * dim;
      for (int32_t m = 0; m < part.size[j]; ++m, ++row) {
        const float* k = keys + (laid_out ? row : part.order[row]) * dim;
        float* r = res.data() + row * dim;
        for (int t = 0; t < dim; ++t) r[t] = k[t] - Bf16ToF32(c[t]);
      }
    }
  }
  std::vector<double> mean(dim, 0.0), sq(dim, 0.0);
  for (int64_t i = 0; i < clustered; ++i)
    for (int t = 0; t < dim; ++t) {
      const double x = res[i * dim + t];
      mean[t] += x;
      sq[t] += x * x;
    }
  const float half = 0.5f * static_cast<float>(levels - 1);
  for (int t = 0; t < dim; ++t) {
    const double m = clustered > 0 ? mean[t] / clustered : 0.0;
    const double var = clustered > 0 ? std::max(0.0, sq[t] / clustered - m * m) : 0.0;
    const float step = GaussianStep(bits) * static_cast<float>(std::sqrt(var));
    // A constant channel (padding dims, say): step 0, every code decodes to its value exactly.
    out->step[t] = step > 0.f ? step : 0.f;
    out->offset[t] = static_cast<float>(m) - (step > 0.f ? half * step : 0.f);
  }
  for (int64_t i = 0; i < clustered; ++i) {
    uint8_t* row = out->code.data() + i * row_bytes;
    for (int t = 0; t < dim; ++t) {
      if (out->step[t] == 0.f) continue;  // code 0
      const float q = std::nearbyint((res[i * dim + t] - out->offset[t]) / out->step[t]);
      const auto c = static_cast<unsigned>(std::clamp(q, 0.f, static_cast<float>(levels - 1)));
      const int64_t bit = static_cast<int64_t>(t) * bits;
      row[bit / 8] |= static_cast<uint8_t>(c << (bit % 8));
    }
  }
}

namespace {

// Four queries' partial sums side by side: one lookup address serves the four, and each lane's
// additions are those of a scalar sum, in the same order (no reassociation across lanes). A
// single query keeps scalar tables, a quarter of the cache.
constexpr int kLanes = 4;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

template <typename Acc>
inline Acc Load(const float* p) {
  Acc v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Scores of `rows` packed rows for the queries of one lane group: tables `w` [nibbles or dim,
// 16 or 1, lanes], bases `base` (one per lane); lane l's scores to out[l * out_stride + r].
template <typename Acc>
void ScoreRows(const float* w0, int lanes, int bits, int dim, int64_t row_bytes,
               const uint8_t* code, int64_t rows, const float* base, int n, float* out,
               int64_t out_stride) {
  const Acc vbase = Load<Acc>(base);
  const int64_t stride = int64_t{16} * lanes;  // one nibble's table
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = code + r * row_bytes;
    Acc s{};
    const float* w = w0;
    if (bits == 8) {
      for (int t = 0; t < dim; ++t, w += lanes) s += Load<Acc>(w) * static_cast<float>(row[t]);
    } else {
      // Four running sums: one would chain every lookup's add on the one before.
      Acc a0{}, a1{}, a2{}, a3{};
      int64_t b = 0;
      for (; b + 2 <= row_bytes; b += 2, w += 4 * stride) {
        a0 += Load<Acc>(w + (row[b] & 15) * lanes);
        a1 += Load<Acc>(w + stride + (row[b] >> 4) * lanes);
        a2 += Load<Acc>(w + 2 * stride + (row[b + 1] & 15) * lanes);
        a3 += Load<Acc>(w + 3 * stride + (row[b + 1] >> 4) * lanes);
      }
      for (; b < row_bytes; ++b, w += 2 * stride)
        a0 += Load<Acc>(w + (row[b] & 15) * lanes) + Load<Acc>(w + stride + (row[b] >> 4) * lanes);
      s = (a0 + a1) + (a2 + a3);
    }
    const Acc o = vbase + s;
    if constexpr (sizeof(Acc) == sizeof(float)) {
      out[r] = o;
    } else {
      for (int l = 0; l < n; ++l) out[l * out_stride + r] = o[l];
    }
  }
}

}  // namespace

CodeScorer::CodeScorer(const float* qs, int nq, int dim, int bits, const float* offset,
                       const float* step)
    : qs_(qs),
      nq_(nq),
      lanes_(nq == 1 ? 1 : (nq + kLanes - 1) / kLanes * kLanes),
      dim_(dim),
      bits_(bits),
      row_bytes_(CodeRowBytes(dim, bits)),
      base_(nq, 0.f) {
  for (int j = 0; j < nq; ++j)
    for (int t = 0; t < dim; ++t) base_[j] += qs[j * dim + t] * offset[t];
  if (bits == 8) {
    weight_.assign(static_cast<std::size_t>(dim) * lanes_, 0.f);
    for (int t = 0; t < dim; ++t)
      for (int j = 0; j < nq; ++j) weight_[t * lanes_ + j] = qs[j * dim + t] * step[t];
    return;
  }
  // One table of 16 partial sums per 4-bit nibble of a row: 4 / bits channels each.
  const int per = 4 / bits, mask = (1 << bits) - 1;
  const int64_t nibbles = row_bytes_ * 2;
  weight_.assign(static_cast<std::size_t>(nibbles) * 16 * lanes_, 0.f);
  for (int j = 0; j < nq; ++j) {
    const float* q = qs + static_cast<std::size_t>(j) * dim;
    for (int64_t p = 0; p < nibbles; ++p)
      for (int v = 0; v < 16; ++v) {
        float s = 0.f;
        for (int i = 0; i < per; ++i) {
          const int64_t t = p * per + i;
          if (t < dim) s += q[t] * step[t] * static_cast<float>((v >> (i * bits)) & mask);
        }
        weight_[(p * 16 + v) * lanes_ + j] = s;
      }
  }
}

void CodeScorer::Score(const uint16_t* centroid, const uint8_t* code, int64_t rows, float* out,
                       int64_t out_stride) const {
  if (out_stride == 0) out_stride = rows;
  for (int j0 = 0; j0 < nq_; j0 += kLanes) {
    const int n = std::min(kLanes, nq_ - j0);
    float base[kLanes] = {0.f, 0.f, 0.f, 0.f};
    for (int l = 0; l < n; ++l) {  // q . (offset + centroid), in the order of a scalar sum
      const float* q = qs_ + static_cast<std::size_t>(j0 + l) * dim_;
      base[l] = base_[j0 + l];
      // The bf16 centroid widened in place (exact): no buffer per cluster on the search path.
      for (int t = 0; t < dim_; ++t) base[l] += q[t] * Bf16ToF32(centroid[t]);
    }
    float* o = out + j0 * out_stride;
    if (lanes_ == 1)
      ScoreRows<float>(weight_.data(), 1, bits_, dim_, row_bytes_, code, rows, base, 1, o,
                       out_stride);
    else
      ScoreRows<Lanes>(weight_.data() + j0, lanes_, bits_, dim_, row_bytes_, code, rows, base, n, o,
                       out_stride);
  }
}

}  // namespace kvrt::cpu_index
