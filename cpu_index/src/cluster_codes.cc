// cluster kind: compact key codes for the second stage (ClusterConfig::rescore_bits, cluster.h).
// A key is coded as its residual from its cluster's bf16 centroid (the summary's, so that a
// device holding the summary needs only the codes), channel by channel on a uniform grid whose
// step is a multiple of the channel's residual deviation over the segment: the step that
// minimises a unit Gaussian's mean squared error for the level count (Max, 1960), centred on the
// channel's mean residual. Residuals are narrower than keys (a cluster's keys lie near its mean),
// so few bits still order a candidate's rows.
#include <algorithm>
#include <cmath>

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

CodeScorer::CodeScorer(const float* q, int dim, int bits, const float* offset, const float* step)
    : q_(q), dim_(dim), bits_(bits), row_bytes_(CodeRowBytes(dim, bits)) {
  for (int t = 0; t < dim; ++t) base_ += q[t] * offset[t];
  if (bits == 8) {
    weight_.resize(dim);
    for (int t = 0; t < dim; ++t) weight_[t] = q[t] * step[t];
    return;
  }
  // One table of 16 partial sums per 4-bit nibble of a row: 4 / bits channels each.
  const int per = 4 / bits, mask = (1 << bits) - 1;
  const int64_t nibbles = row_bytes_ * 2;
  weight_.assign(static_cast<std::size_t>(nibbles) * 16, 0.f);
  for (int64_t p = 0; p < nibbles; ++p)
    for (int v = 0; v < 16; ++v) {
      float s = 0.f;
      for (int j = 0; j < per; ++j) {
        const int64_t t = p * per + j;
        if (t < dim) s += q[t] * step[t] * static_cast<float>((v >> (j * bits)) & mask);
      }
      weight_[p * 16 + v] = s;
    }
}

void CodeScorer::Score(const uint16_t* centroid, const uint8_t* code, int64_t rows,
                       float* out) const {
  float base = base_;
  for (int t = 0; t < dim_; ++t) base += q_[t] * Bf16ToF32(centroid[t]);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = code + r * row_bytes_;
    float s = 0.f;
    if (bits_ == 8) {
      for (int t = 0; t < dim_; ++t) s += weight_[t] * static_cast<float>(row[t]);
    } else {
      // Four running sums: one would chain every lookup's add on the one before.
      const float* w = weight_.data();
      float a[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t b = 0;
      for (; b + 2 <= row_bytes_; b += 2, w += 64) {
        a[0] += w[row[b] & 15];
        a[1] += w[16 + (row[b] >> 4)];
        a[2] += w[32 + (row[b + 1] & 15)];
        a[3] += w[48 + (row[b + 1] >> 4)];
      }
      for (; b < row_bytes_; ++b, w += 32) a[0] += w[row[b] & 15] + w[16 + (row[b] >> 4)];
      s = (a[0] + a[1]) + (a[2] + a[3]);
    }
    out[r] = base + s;
  }
}

}  // namespace kvrt::cpu_index
