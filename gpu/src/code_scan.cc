// The code scan's launcher and host reference (code_scan.h).
#include "kvrt_gpu/code_scan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "code_scan_check.h"
#include "code_scan_launch.h"
#include "kvrt_common/dtype.h"
#include "launch_status.h"

namespace kvrt::gpu {
namespace {

// The shape both calls share: kv heads, and q heads in whole groups of at most
// kCodeScanMaxGroup.
absl::Status CheckGroups(const CodeScanView& v, int q_heads, const char* what) {
  if (v.kv_heads <= 0 || q_heads <= 0 || q_heads % v.kv_heads != 0 ||
      q_heads / v.kv_heads > kCodeScanMaxGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": need kv_heads > 0 and q_heads a multiple of kv_heads with at most ",
                     kCodeScanMaxGroup, " per kv head"));
  }
  return absl::OkStatus();
}

absl::Status Check(const CodeScanView& v, const float* q, int q_heads, const float* scores,
                   const char* what, bool needs_cluster = true) {
  if (auto st = CheckGroups(v, q_heads, what); !st.ok()) return st;
  if (v.head_dim <= 0 || v.head_dim > 256 || v.rows < 0 || v.segment_rows <= 0 ||
      v.num_clusters < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": need head_dim in [1, 256], rows >= 0, segment_rows > 0, num_clusters >= 0"));
  }
  if (v.bits != 1 && v.bits != 2 && v.bits != 4 && v.bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": bits = ", v.bits, " must be 1, 2, 4 or 8"));
  }
  if (v.rows > 0 && (v.code == nullptr || (needs_cluster && v.cluster == nullptr) ||
                     v.offset == nullptr || v.step == nullptr || q == nullptr ||
                     scores == nullptr || (v.num_clusters > 0 && v.centroid == nullptr))) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": null array"));
  }
  return absl::OkStatus();
}

absl::Status CheckLse(const CodeScanView& v, int q_heads, const float* scores, const int64_t* begin,
                      const int32_t* size, float scale, const float* lse, const char* what) {
  if (auto st = CheckGroups(v, q_heads, what); !st.ok()) return st;
  if (v.rows < 0 || v.num_clusters < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": need rows and num_clusters >= 0"));
  }
  if (!(std::isfinite(scale) && scale > 0.f))
    return absl::InvalidArgumentError(absl::StrCat(what, ": scale must be finite and > 0"));
  if (v.num_clusters > 0 &&
      (scores == nullptr || begin == nullptr || size == nullptr || lse == nullptr))
    return absl::InvalidArgumentError(absl::StrCat(what, ": null array"));
  return absl::OkStatus();
}

}  // namespace

namespace detail {

// CodeClusterMass's shapes: Check's (no row clusters) and CheckLse's, a head_dim of whole words.
absl::Status CheckCodeMass(const CodeScanView& v, const float* q, int q_heads, const int64_t* begin,
                           const int32_t* size, float scale, const float* lse, const char* what) {
  // The scores CheckLse asks for are not needed here: lse stands in for them.
  if (auto st = Check(v, q, q_heads, lse, what, /*needs_cluster=*/false); !st.ok()) return st;
  if (auto st = CheckLse(v, q_heads, lse, begin, size, scale, lse, what); !st.ok()) return st;
  if (v.head_dim % 32 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": head_dim = ", v.head_dim, " must be a multiple of 32"));
  if (v.num_clusters > 0 && (q == nullptr || v.centroid == nullptr))
    return absl::InvalidArgumentError(absl::StrCat(what, ": null array"));
  return absl::OkStatus();
}

absl::Status CheckCodeMassAlignment(const CodeScanView& v, const float* q, const char* what) {
  const auto misaligned = [](const void* p, uintptr_t a) {
    return reinterpret_cast<uintptr_t>(p) % a != 0;
  };
  if (misaligned(v.code, 4) || misaligned(q, 16) || misaligned(v.offset, 16) ||
      misaligned(v.step, 16) || misaligned(v.centroid, 8))
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ": codes must be 4-byte aligned, q, offset and step 16-byte aligned, "
                     "the centroids 8-byte aligned"));
  return absl::OkStatus();
}

std::vector<int32_t> RowClusters(const CodeScanView& v, const int64_t* begin, const int32_t* size) {
  std::vector<int32_t> cluster(static_cast<std::size_t>(v.kv_heads) * v.rows, -1);
  for (int kv = 0; kv < v.kv_heads; ++kv)
    for (int c = 0; c < v.num_clusters; ++c) {
      const int64_t at = static_cast<int64_t>(kv) * v.num_clusters + c;
      for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r)
        cluster[static_cast<std::size_t>(kv) * v.rows + r] = c;
    }
  return cluster;
}

}  // namespace detail

absl::Status CodeClusterMass(const CodeScanView& v, const float* q, int q_heads,
                             const int64_t* begin, const int32_t* size, float scale, float* lse,
                             void* stream) {
  if (auto st = detail::CheckCodeMass(v, q, q_heads, begin, size, scale, lse, "CodeClusterMass");
      !st.ok())
    return st;
  if (auto st = detail::CheckCodeMassAlignment(v, q, "CodeClusterMass"); !st.ok()) return st;
#if KVRT_WITH_CUDA
  if (v.num_clusters == 0) return absl::OkStatus();
  return detail::ToStatus(
      detail::LaunchCodeClusterMass(v, q, q_heads, begin, size, scale, lse, stream),
      "CodeClusterMass");
#else
  (void)stream;
  return detail::NoCuda("CodeClusterMass");
#endif
}

absl::Status CodeClusterMassHost(const CodeScanView& v, const float* q, int q_heads,
                                 const int64_t* begin, const int32_t* size, float scale,
                                 float* lse) {
  if (auto st =
          detail::CheckCodeMass(v, q, q_heads, begin, size, scale, lse, "CodeClusterMassHost");
      !st.ok())
    return st;
  // The two passes it stands for, over the rows of the clusters.
  const std::vector<int32_t> cluster = detail::RowClusters(v, begin, size);
  CodeScanView with = v;
  with.cluster = cluster.data();
  std::vector<float> scores(static_cast<std::size_t>(q_heads) * v.rows);
  if (auto st = CodeScanHost(with, q, q_heads, scores.data()); !st.ok()) return st;
  return CodeClusterLseHost(with, q_heads, scores.data(), begin, size, scale, lse);
}

absl::Status CodeClusterLse(const CodeScanView& v, int q_heads, const float* scores,
                            const int64_t* begin, const int32_t* size, float scale, float* lse,
                            void* stream) {
  if (auto st = CheckLse(v, q_heads, scores, begin, size, scale, lse, "CodeClusterLse"); !st.ok())
    return st;
#if KVRT_WITH_CUDA
  if (v.num_clusters == 0) return absl::OkStatus();
  return detail::ToStatus(
      detail::LaunchCodeClusterLse(v, q_heads, scores, begin, size, scale, lse, stream),
      "CodeClusterLse");
#else
  (void)stream;
  return detail::NoCuda("CodeClusterLse");
#endif
}

absl::Status CodeClusterLseHost(const CodeScanView& v, int q_heads, const float* scores,
                                const int64_t* begin, const int32_t* size, float scale,
                                float* lse) {
  if (auto st = CheckLse(v, q_heads, scores, begin, size, scale, lse, "CodeClusterLseHost");
      !st.ok())
    return st;
  const int g = q_heads / v.kv_heads;
  for (int kv = 0; kv < v.kv_heads; ++kv)
    for (int h = 0; h < g; ++h) {
      const int64_t qh = static_cast<int64_t>(kv) * g + h;
      const float* s = scores + qh * v.rows;
      for (int c = 0; c < v.num_clusters; ++c) {
        const int64_t at = static_cast<int64_t>(kv) * v.num_clusters + c;
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r)
          m = std::max(m, double(scale) * s[r]);
        double l = 0;
        for (int64_t r = begin[at]; r < begin[at] + size[at]; ++r)
          l += std::exp(double(scale) * s[r] - m);
        lse[qh * v.num_clusters + c] = size[at] > 0 && std::isfinite(m)
                                           ? static_cast<float>(m + std::log(l))
                                           : -std::numeric_limits<float>::infinity();
      }
    }
  return absl::OkStatus();
}

absl::Status CodeScan(const CodeScanView& v, const float* q, int q_heads, float* scores,
                      void* stream) {
  if (auto st = Check(v, q, q_heads, scores, "CodeScan"); !st.ok()) return st;
#if KVRT_WITH_CUDA
  if (v.rows == 0) return absl::OkStatus();
  return detail::ToStatus(detail::LaunchCodeScan(v, q, q_heads, scores, stream), "CodeScan");
#else
  (void)stream;
  return detail::NoCuda("CodeScan");
#endif
}

absl::Status CodeScanHost(const CodeScanView& v, const float* q, int q_heads, float* scores) {
  if (auto st = Check(v, q, q_heads, scores, "CodeScanHost"); !st.ok()) return st;
  const int d = v.head_dim, g = q_heads / v.kv_heads;
  const int64_t row_bytes = (static_cast<int64_t>(d) * v.bits + 7) / 8;
  const int64_t segments = (v.rows + v.segment_rows - 1) / v.segment_rows;
  const unsigned mask = (1u << v.bits) - 1;
  std::vector<double> key(d);
  for (int kv = 0; kv < v.kv_heads; ++kv) {
    for (int64_t r = 0; r < v.rows; ++r) {
      const int64_t at = static_cast<int64_t>(kv) * v.rows + r;
      const int32_t c = v.cluster[at];
      if (c < 0 || c >= v.num_clusters) {
        for (int h = 0; h < g; ++h)
          scores[(static_cast<int64_t>(kv) * g + h) * v.rows + r] =
              -std::numeric_limits<float>::infinity();
        continue;
      }
      const uint8_t* code = v.code + at * row_bytes;
      const uint16_t* cen = v.centroid + (static_cast<int64_t>(kv) * v.num_clusters + c) * d;
      const int64_t grid = (static_cast<int64_t>(kv) * segments + r / v.segment_rows) * d;
      for (int t = 0; t < d; ++t) {
        const int64_t bit = static_cast<int64_t>(t) * v.bits;
        const unsigned k = (code[bit / 8] >> (bit % 8)) & mask;
        key[t] = double(Bf16ToF32(cen[t])) + v.offset[grid + t] + double(v.step[grid + t]) * k;
      }
      for (int h = 0; h < g; ++h) {
        const float* qh = q + (static_cast<int64_t>(kv) * g + h) * d;
        double s = 0;
        for (int t = 0; t < d; ++t) s += double(qh[t]) * key[t];
        scores[(static_cast<int64_t>(kv) * g + h) * v.rows + r] = static_cast<float>(s);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrt::gpu
