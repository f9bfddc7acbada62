#include "kvrt_cpu_index/head_store.h"

#include <algorithm>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "absl/strings/str_cat.h"
#include "kvrt_common/finite_bits.h"
#include "kvrt_cpu_index/dot.h"
#include "parallel_range.h"

namespace kvrt::cpu_index {
namespace {

// A prompt's rows arrive, are checked and are permuted in blocks on the workers
// (internal::ParallelRange): one kv head's rows (an MQA model's only one) had been one thread's
// copies.
constexpr int64_t kRowBlock = 1024;

}  // namespace

void AdviseHugePages([[maybe_unused]] void* p, [[maybe_unused]] std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
}

absl::Status HeadStore::Reserve(int64_t rows) {
  const std::size_t need = static_cast<std::size_t>(rows) * row_bytes();
  if (keys_.capacity() >= need && (values_are_keys_ || values_.capacity() >= need))
    return absl::OkStatus();
  const std::size_t want = std::max(need, 2 * keys_.capacity());
  try {
    // Both grown before any row is written, so a failure leaves the store unchanged.
    keys_.reserve(want);
    if (!values_are_keys_) values_.reserve(want);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host KV store: cannot grow to ", want, " bytes for keys and for values"));
  }
  return absl::OkStatus();
}

void HeadStore::Prefault(int64_t rows) noexcept {
  constexpr std::size_t kPage = 4096;  // a huge page faults in whole at its first byte
  const std::size_t end = static_cast<std::size_t>(std::min(rows, capacity())) * row_bytes();
  const std::size_t begin = static_cast<std::size_t>(size_) * row_bytes();
  // NOTE: past size() but within capacity: raw memory of UninitializedAllocator, which a later
  // resize leaves as it is and Append overwrites.
  for (unsigned char* p : {keys_.data(), values_are_keys_ ? nullptr : values_.data()}) {
    if (p == nullptr) continue;
    volatile unsigned char* b = p;
    for (std::size_t at = begin; at < end; at += kPage) b[at] = 0;
  }
}

namespace {

// True if one of the d elements at p is NaN or Inf.
bool NonFinite(const unsigned char* p, int d, DType t) {
  return FirstNonFinite(p, static_cast<std::size_t>(d), t) != static_cast<std::size_t>(d);
}

}  // namespace

std::vector<int64_t> HeadStore::NonFiniteRows(const void* k, const void* v, int64_t n,
                                              std::size_t stride_bytes) const {
  // Each block of kRowBlock rows lists its own, so the list comes out in row order.
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<std::vector<int64_t>> found(blocks);
  internal::ParallelRange(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * kRowBlock; i < std::min(n, b1 * kRowBlock); ++i) {
      const auto* kr = static_cast<const unsigned char*>(k) + i * stride_bytes;
      const auto* vr = static_cast<const unsigned char*>(v) + i * stride_bytes;
      if (NonFinite(kr, dim_, dtype_) || (!values_are_keys_ && NonFinite(vr, dim_, dtype_)))
        found[i / kRowBlock].push_back(size_ + i);
    }
  });
  std::vector<int64_t> bad;
  for (const auto& f : found) bad.insert(bad.end(), f.begin(), f.end());
  return bad;
}

absl::Status HeadStore::AppendWritten(int64_t n) {
  if (n <= 0) return absl::OkStatus();
  if (n > capacity() - size_)
    return absl::FailedPreconditionError(absl::StrCat("host KV store: ", n,
                                                      " rows written past its capacity of ",
                                                      capacity(), " (", size_, " held)"));
  const std::vector<int64_t> bad = NonFiniteRows(next_keys(), next_values(), n, row_bytes());
  try {
    nonfinite_rows_.insert(nonfinite_rows_.end(), bad.begin(), bad.end());
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("host KV store: out of memory");
  }
  // Within capacity: no reallocation, and the allocator leaves the written bytes as they are.
  const std::size_t bytes = static_cast<std::size_t>(size_ + n) * row_bytes();
  keys_.resize(bytes);
  if (!values_are_keys_) values_.resize(bytes);
  size_ += n;
  return absl::OkStatus();
}

absl::Status HeadStore::Append(const void* k, const void* v, int64_t n, std::size_t stride_elems) {
  if (n <= 0) return absl::OkStatus();
  const std::size_t rb = row_bytes();
  const std::size_t stride_bytes = stride_elems * DTypeSize(dtype_);
  const std::size_t old_bytes = static_cast<std::size_t>(size_) * rb;
  const std::size_t add_bytes = static_cast<std::size_t>(n) * rb;
  // Found before anything changes, so that a failure changes nothing.
  if (values_are_keys_) v = k;
  const std::vector<int64_t> bad = NonFiniteRows(k, v, n, stride_bytes);
  if (auto s = Reserve(size_ + n); !s.ok()) return s;
  try {
    nonfinite_rows_.reserve(nonfinite_rows_.size() + bad.size());
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("host KV store: out of memory");
  }
  nonfinite_rows_.insert(nonfinite_rows_.end(), bad.begin(), bad.end());
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);
  for (auto [data, src] : {std::pair{&keys_, ks}, std::pair{&values_, vs}}) {
    if (data == &values_ && values_are_keys_) break;
    data->resize(old_bytes + add_bytes);
    unsigned char* dst = data->data() + old_bytes;
    const unsigned char* from = src;  // (a structured binding: not capturable before C++20)
    internal::ParallelRange(n, kRowBlock, [&](int64_t b0, int64_t b1) {
      if (stride_bytes == rb) {  // contiguous rows: one copy
        std::memcpy(dst + b0 * rb, from + b0 * rb, (b1 - b0) * rb);
      } else {
        for (int64_t i = b0; i < b1; ++i) std::memcpy(dst + i * rb, from + i * stride_bytes, rb);
      }
    });
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

absl::Status HeadStore::PermuteRows(int64_t begin, const std::vector<int64_t>& order) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (begin < 0 || begin + n > size_)
    return absl::InvalidArgumentError(absl::StrCat("store permute: rows [", begin, ", ", begin + n,
                                                   ") exceed the store's ", size_));
  if (n == 0) return absl::OkStatus();  // (memcpy from an empty vector's null data is undefined)
  std::vector<char> seen(n, 0);
  for (int64_t o : order) {
    if (o < 0 || o >= n || seen[o])
      return absl::InvalidArgumentError("store permute: order is not a permutation");
    seen[o] = 1;
  }
  const std::size_t rb = row_bytes();
  std::vector<unsigned char> tmp(static_cast<std::size_t>(n) * rb);
  for (auto* data : {&keys_, &values_}) {
    if (data == &values_ && values_are_keys_) break;
    unsigned char* base = data->data() + static_cast<std::size_t>(begin) * rb;
    internal::ParallelRange(n, kRowBlock, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i)
        std::memcpy(tmp.data() + static_cast<std::size_t>(i) * rb,
                    base + static_cast<std::size_t>(order[i]) * rb, rb);
    });
    internal::ParallelRange(n, kRowBlock, [&](int64_t b0, int64_t b1) {
      std::memcpy(base + b0 * rb, tmp.data() + b0 * rb, (b1 - b0) * rb);
    });
  }
  // Rows with NaN/Inf move with their data.
  std::vector<int64_t> new_row(n);
  for (int64_t i = 0; i < n; ++i) new_row[order[i]] = begin + i;
  for (auto& r : nonfinite_rows_)
    if (r >= begin && r < begin + n) r = new_row[r - begin];
  return absl::OkStatus();
}

}  // namespace kvrt::cpu_index

namespace kvrt::cpu_index {}  // namespace kvrt::cpu_index
