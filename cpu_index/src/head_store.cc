#include "kvrt_cpu_index/head_store.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kvrt_cpu_index/dot.h"

namespace kvrt::cpu_index {

absl::Status HeadStore::Reserve(int64_t rows) {
  const std::size_t need = static_cast<std::size_t>(rows) * row_bytes();
  if (keys_.capacity() >= need && values_.capacity() >= need) return absl::OkStatus();
  const std::size_t want = std::max(need, 2 * keys_.capacity());
  try {
    // Both grown before any row is written, so a failure leaves the store unchanged.
    keys_.reserve(want);
    values_.reserve(want);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host KV store: cannot grow to ", want, " bytes for keys and for values"));
  }
  return absl::OkStatus();
}

absl::Status HeadStore::Append(const void* k, const void* v, int64_t n, std::size_t stride_elems) {
  if (n <= 0) return absl::OkStatus();
  const std::size_t rb = row_bytes();
  const std::size_t stride_bytes = stride_elems * DTypeSize(dtype_);
  const std::size_t old_bytes = static_cast<std::size_t>(size_) * rb;
  const std::size_t add_bytes = static_cast<std::size_t>(n) * rb;
  if (auto s = Reserve(size_ + n); !s.ok()) return s;
  keys_.resize(old_bytes + add_bytes);
  values_.resize(old_bytes + add_bytes);
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(keys_.data() + old_bytes + i * rb, ks + i * stride_bytes, rb);
    std::memcpy(values_.data() + old_bytes + i * rb, vs + i * stride_bytes, rb);
  }
  size_ += n;
  return absl::OkStatus();
}

void HeadStore::Dot(const float* q, int64_t begin, int64_t end, float* out) const {
  DotRows(q, keys_.data() + static_cast<std::size_t>(begin) * row_bytes(), dim_, dtype_,
          end - begin, dim_, out);
}

void HeadStore::DotIds(const float* q, const int64_t* ids, int64_t n, float* out) const {
  for (int64_t i = 0; i < n; ++i) out[i] = DotRow(q, key(ids[i]), dim_, dtype_);
}

}  // namespace kvrt::cpu_index

namespace kvrt::cpu_index {

absl::Status HeadStore::PermuteRows(int64_t begin, const std::vector<int64_t>& order) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (begin < 0 || begin + n > size_) {
    return absl::InvalidArgumentError(absl::StrCat("PermuteRows: rows [", begin, ", ", begin + n,
                                                   ") outside the store's ", size_));
  }
  if (n == 0) return absl::OkStatus();
  std::vector<char> seen(n, 0);
  for (int64_t r : order) {
    if (r < 0 || r >= n || seen[r]) return absl::InvalidArgumentError("PermuteRows: not a permutation");
    seen[r] = 1;
  }
  const std::size_t rb = row_bytes();
  std::vector<unsigned char> tmp(static_cast<std::size_t>(n) * rb);
  for (auto* buf : {&keys_, &values_}) {
    unsigned char* base = buf->data() + static_cast<std::size_t>(begin) * rb;
    for (int64_t i = 0; i < n; ++i) std::memcpy(tmp.data() + i * rb, base + order[i] * rb, rb);
    std::memcpy(base, tmp.data(), tmp.size());
  }
  return absl::OkStatus();
}

}  // namespace kvrt::cpu_index
