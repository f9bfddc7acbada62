// The rest from value codes: launcher and host reference (code_rest.h).
#include "kvrt_gpu/code_rest.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "code_rest_launch.h"
#include "code_scan_check.h"
#include "kvrt_common/dtype.h"
#include "launch_status.h"

namespace kvrt::gpu {
namespace {

absl::Status CheckRest(const CodeScanView& keys, const CodeValueView& values, const float* q,
                       int q_heads, const int64_t* begin, const int32_t* size,
                       const uint8_t* attended, float scale, const float* o, const float* lse,
                       const char* what) {
  if (auto st = detail::CheckCodeMass(keys, q, q_heads, begin, size, scale, lse, what); !st.ok())
    return st;
  if (values.bits != 1 && values.bits != 2 && values.bits != 4 && values.bits != 8)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": value bits = ", values.bits, " must be 1, 2, 4 or 8"));
  if (o == nullptr || lse == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(what, ": null output"));
  if (keys.num_clusters > 0 && keys.rows > 0 &&
      (values.code == nullptr || values.value_mean == nullptr || values.offset == nullptr ||
       values.step == nullptr || attended == nullptr))
    return absl::InvalidArgumentError(absl::StrCat(what, ": null array"));
  return absl::OkStatus();
}

}  // namespace

bool CodeValueRestTakes(int value_bits, int head_dim, int group) {
  return value_bits == 2 && group <= 8 && (head_dim == 64 || head_dim == 128 || head_dim == 256);
}

int64_t CodeValueRestWorkspaceFloats(const CodeScanView& keys, int q_heads) {
#if KVRT_WITH_CUDA
  // top [q_heads], then the partials' sums [chunks, q_heads] and, 16-byte aligned, states
  // [chunks, q_heads, d].
  return q_heads + 3 +
         detail::CodeValueRestChunks(keys.num_clusters, keys.kv_heads) * q_heads *
             (static_cast<int64_t>(keys.head_dim) + 1);
#else
  (void)keys;
  return q_heads;
#endif
}

absl::Status CodeValueRest(const CodeScanView& keys, const CodeValueView& values, const float* q,
                           int q_heads, const int64_t* begin, const int32_t* size,
                           const uint8_t* attended, const float* cluster_lse, float scale,
                           float* workspace, float* o, float* lse, void* stream) {
  if (auto st = CheckRest(keys, values, q, q_heads, begin, size, attended, scale, o, lse,
                          "CodeValueRest");
      !st.ok())
    return st;
  const int g = q_heads / keys.kv_heads;
  if (!CodeValueRestTakes(values.bits, keys.head_dim, g))
    return absl::InvalidArgumentError(absl::StrCat(
        "CodeValueRest: the device form takes 2-bit value codes, at most 8 q heads per kv head "
        "and head_dim 64, 128 or 256 (got ",
        values.bits, "-bit codes, ", g, " q heads per kv head, head_dim ", keys.head_dim, ")"));
  if (auto st = detail::CheckCodeMassAlignment(keys, q, "CodeValueRest"); !st.ok()) return st;
  const auto misaligned = [](const void* p, uintptr_t a) {
    return reinterpret_cast<uintptr_t>(p) % a != 0;
  };
  if (misaligned(values.code, 16) || misaligned(values.value_mean, 4) ||
      misaligned(values.offset, 16) || misaligned(values.step, 16))
    return absl::InvalidArgumentError(
        "CodeValueRest: value codes must be 16-byte aligned, value means 4-byte, value offsets "
        "and steps 16-byte");
  if (keys.num_clusters > 0 && (cluster_lse == nullptr || workspace == nullptr))
    return absl::InvalidArgumentError("CodeValueRest: null cluster_lse or workspace");
  if (misaligned(workspace, 16))
    return absl::InvalidArgumentError("CodeValueRest: the workspace must be 16-byte aligned");
#if KVRT_WITH_CUDA
  return detail::ToStatus(
      detail::LaunchCodeValueRest(keys, values, q, q_heads, begin, size, attended, cluster_lse,
                                  scale, workspace, o, lse, stream),
      "CodeValueRest");
#else
  (void)stream;
  return detail::NoCuda("CodeValueRest");
#endif
}

absl::Status CodeValueRestHost(const CodeScanView& keys, const CodeValueView& values,
                               const float* q, int q_heads, const int64_t* begin,
                               const int32_t* size, const uint8_t* attended, float scale, float* o,
                               float* lse) {
  if (auto st = CheckRest(keys, values, q, q_heads, begin, size, attended, scale, o, lse,
                          "CodeValueRestHost");
      !st.ok())
    return st;
  const int d = keys.head_dim, g = q_heads / keys.kv_heads, C = keys.num_clusters;
  const int64_t segments = (keys.rows + keys.segment_rows - 1) / keys.segment_rows;
  const int64_t vrb = (static_cast<int64_t>(d) * values.bits + 7) / 8;
  // Every row's scaled score per q head (CodeScanHost over the clusters' rows).
  const std::vector<int32_t> cluster = detail::RowClusters(keys, begin, size);
  CodeScanView with = keys;
  with.cluster = cluster.data();
  std::vector<float> scores(static_cast<std::size_t>(q_heads) * keys.rows);
  if (keys.rows > 0)
    if (auto st = CodeScanHost(with, q, q_heads, scores.data()); !st.ok()) return st;
  std::vector<double> acc(d);
  for (int h = 0; h < q_heads; ++h) {
    const int kv = h / g;
    const float* s = scores.data() + static_cast<std::size_t>(h) * keys.rows;
    const auto rest = [&](int c) { return attended[static_cast<int64_t>(h) * C + c] == 0; };
    double m = -std::numeric_limits<double>::infinity();
    for (int c = 0; c < C; ++c) {
      if (!rest(c)) continue;
      const int64_t at = static_cast<int64_t>(kv) * C + c;
      for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r)
        m = std::max(m, double(scale) * s[r]);
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double l = 0;
    if (std::isfinite(m)) {
      for (int c = 0; c < C; ++c) {
        if (!rest(c)) continue;
        const int64_t at = static_cast<int64_t>(kv) * C + c;
        const uint16_t* mean = values.value_mean + at * d;
        for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r) {
          const double p = std::exp(double(scale) * s[r] - m);
          l += p;
          const int64_t grid = (static_cast<int64_t>(kv) * segments + r / keys.segment_rows) * d;
          const uint8_t* row = values.code + (static_cast<int64_t>(kv) * keys.rows + r) * vrb;
          for (int t = 0; t < d; ++t) {
            const int64_t bit = static_cast<int64_t>(t) * values.bits;
            const unsigned k = (row[bit / 8] >> (bit % 8)) & ((1u << values.bits) - 1);
            acc[t] += p * (double(Bf16ToF32(mean[t])) + values.offset[grid + t] +
                           double(values.step[grid + t]) * k);
          }
        }
      }
    }
    for (int t = 0; t < d; ++t)
      o[static_cast<std::size_t>(h) * d + t] = l > 0 ? static_cast<float>(acc[t] / l) : 0.f;
    lse[h] = l > 0 ? static_cast<float>(m + std::log(l)) : -std::numeric_limits<float>::infinity();
  }
  return absl::OkStatus();
}

namespace {

absl::Status CheckSelection(const int32_t* selected, const int32_t* count, int q_heads,
                            int num_clusters, const uint8_t* attended, const char* what) {
  if (q_heads < 0 || num_clusters < 0)
    return absl::InvalidArgumentError(absl::StrCat(what, ": q_heads = ", q_heads,
                                                   " and num_clusters = ", num_clusters,
                                                   " must not be negative"));
  if (q_heads > 0 && num_clusters > 0 &&
      (selected == nullptr || count == nullptr || attended == nullptr))
    return absl::InvalidArgumentError(absl::StrCat(what, ": null array"));
  return absl::OkStatus();
}

}  // namespace

absl::Status AttendedFromSelection(const int32_t* selected, const int32_t* count, int q_heads,
                                   int num_clusters, uint8_t* attended, void* stream) {
  if (auto st =
          CheckSelection(selected, count, q_heads, num_clusters, attended, "AttendedFromSelection");
      !st.ok())
    return st;
#if KVRT_WITH_CUDA
  return detail::ToStatus(
      detail::LaunchAttendedFromSelection(selected, count, q_heads, num_clusters, attended, stream),
      "AttendedFromSelection");
#else
  (void)stream;
  return detail::NoCuda("AttendedFromSelection");
#endif
}

absl::Status AttendedFromSelectionHost(const int32_t* selected, const int32_t* count, int q_heads,
                                       int num_clusters, uint8_t* attended) {
  if (auto st = CheckSelection(selected, count, q_heads, num_clusters, attended,
                               "AttendedFromSelectionHost");
      !st.ok())
    return st;
  const auto C = static_cast<std::size_t>(num_clusters);
  if (q_heads == 0 || C == 0) return absl::OkStatus();
  std::fill(attended, attended + static_cast<std::size_t>(q_heads) * C, uint8_t{0});
  for (int h = 0; h < q_heads; ++h) {
    const int32_t* row = selected + static_cast<std::size_t>(h) * C;
    for (int32_t j = 0; j < std::min<int32_t>(count[h], num_clusters); ++j)
      if (row[j] >= 0 && row[j] < num_clusters)
        attended[h * C + static_cast<std::size_t>(row[j])] = 1;
  }
  return absl::OkStatus();
}

}  // namespace kvrt::gpu
