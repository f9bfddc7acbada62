#pragma once
// Host KV store of one kv head of one (sequence, layer): cold keys and values, append-only,
// contiguous rows [n, head_dim] in the storage dtype. Rows arrive in position order; an index kind
// may permute them (PermuteRows), so the owner keeps each row's position (runtime ColdTier).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"

namespace kvrt::cpu_index {

// madvise(MADV_HUGEPAGE) on Linux (a hint: ignored where THP is off or unsupported).
void AdviseHugePages(void* p, std::size_t bytes) noexcept;

// Leaves new elements uninitialised on resize (and allocates whole pages, below): a store's rows
// are written right after they are added (hundreds of MB for a prompt), so zeroing them first would
// be a second pass for nothing.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <typename U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  // Whole, aligned pages: the GPU backend registers a store's memory for the device
  // (cudaHostRegister pins whole pages), and two registrations must not share a page. A store
  // of 2 MiB or more is 2 MiB-aligned and asks for transparent huge pages: on the H200 machine
  // (THP "madvise") that made first touch 2.8x and cudaHostRegister 4.5x faster than 4 KiB pages
  // (tools/gpu_bench/host_register.py: 3.9 vs 1.4 GB/s, 36 vs 8 GB/s), and a decode step's first
  // token waits for both after a long prompt (docs/benchmarks.md, "The first decode token").
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;
  static std::size_t Alignment(std::size_t bytes) { return bytes >= kHugePage ? kHugePage : kPage; }
  T* allocate(std::size_t n) {
    const std::size_t align = Alignment(n * sizeof(T));
    const std::size_t bytes = (n * sizeof(T) + align - 1) / align * align;
    void* p = ::operator new(bytes, std::align_val_t(align));
    if (align == kHugePage) AdviseHugePages(p, bytes);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    ::operator delete(p, std::align_val_t(Alignment(n * sizeof(T))));
  }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

class HeadStore {
 public:
  // values_are_keys: each row's value is its key (RuntimeConfig::values_are_keys): one row is
  // stored, value() and values() are the keys, and Append does not read v.
  HeadStore(int head_dim, DType dtype, bool values_are_keys = false)
      : dim_(head_dim), dtype_(dtype), values_are_keys_(values_are_keys) {}

  int dim() const { return dim_; }
  DType dtype() const { return dtype_; }
  int64_t size() const { return size_; }
  bool values_are_keys() const { return values_are_keys_; }
  std::size_t row_bytes() const { return static_cast<std::size_t>(dim_) * DTypeSize(dtype_); }
  std::size_t bytes() const {
    return (values_are_keys_ ? 1 : 2) * static_cast<std::size_t>(size_) * row_bytes();
  }

  const void* key(int64_t i) const {
    return keys_.data() + static_cast<std::size_t>(i) * row_bytes();
  }
  const void* value(int64_t i) const {
    return values_data() + static_cast<std::size_t>(i) * row_bytes();
  }
  const void* keys() const { return keys_.data(); }
  const void* values() const { return values_data(); }

  // Rows the current allocation holds: appends up to it keep keys() and values() in place.
  int64_t capacity() const {
    const std::size_t bytes =
        values_are_keys_ ? keys_.capacity() : std::min(keys_.capacity(), values_.capacity());
    return static_cast<int64_t>(bytes / row_bytes());
  }
  // Makes room for `rows` rows in total so that Appends up to it cannot fail.
  absl::Status Reserve(int64_t rows);
  // Faults in the memory of rows [size(), rows) (within capacity) by writing a byte per page,
  // so that the first write or a registration with the GPU driver (which faults pages in at a
  // fraction of the speed) does not pay for it later. Contents stay unspecified until appended.
  void Prefault(int64_t rows) noexcept;

  // Appends n rows; key/value rows are strided by `stride` elements (to read one head out of a
  // [tokens, kv_heads, d] tensor); v is not read with values_are_keys (may be null). Returns
  // ResourceExhausted if memory runs out (store unchanged).
  // NOTE: growth doubles capacity; a chunked store would avoid the copy (left for the transfer
  // engine, which appends from worker threads).
  absl::Status Append(const void* k, const void* v, int64_t n, std::size_t stride_elems);
  // Where the next rows go (keys, values): memory past size() that a caller may fill in place
  // within capacity (e.g. a device copy into the registered store), then AppendWritten.
  unsigned char* next_keys() {
    return keys_.data() + static_cast<std::size_t>(size_) * row_bytes();
  }
  unsigned char* next_values() {
    return (values_are_keys_ ? keys_.data() : values_.data()) +
           static_cast<std::size_t>(size_) * row_bytes();
  }
  // Appends the n rows written there (FailedPrecondition past capacity; scanned for NaN/Inf as
  // Append scans).
  absl::Status AppendWritten(int64_t n);

  // Permutes rows [begin, begin + order.size()): new row begin + i holds old row begin + order[i]
  // (order is a permutation of 0..n-1). InvalidArgument if it is not; store unchanged then.
  absl::Status PermuteRows(int64_t begin, const std::vector<int64_t>& order);

  // Scores rows [begin, end) against q (f32, [dim]) into out[end-begin], unscaled dot products.
  void Dot(const float* q, int64_t begin, int64_t end, float* out) const;
  // Scores the given rows.
  void DotIds(const float* q, const int64_t* ids, int64_t n, float* out) const;
  // Row i of the keys as f32.
  void KeyF32(int64_t i, float* out) const { ConvertToF32(key(i), dtype_, dim_, out); }
  // Rows whose key or value holds a NaN or an Inf (possible with check_finite = 0), ascending.
  // The runtime attends to them whatever the index returns, so that their NaN reaches the output
  // instead of the token being dropped silently (kvrt.h). Found at Append by a bit test per
  // element, a fraction of the copy's cost.
  const std::vector<int64_t>& nonfinite_rows() const { return nonfinite_rows_; }

 private:
  const unsigned char* values_data() const {
    return values_are_keys_ ? keys_.data() : values_.data();
  }
  // Rows of k, v (n rows, stride_bytes apart) with a NaN or Inf, numbered from size().
  std::vector<int64_t> NonFiniteRows(const void* k, const void* v, int64_t n,
                                     std::size_t stride_bytes) const;
  int dim_;
  DType dtype_;
  bool values_are_keys_ = false;
  int64_t size_ = 0;
  std::vector<unsigned char, UninitializedAllocator<unsigned char>> keys_;
  std::vector<unsigned char, UninitializedAllocator<unsigned char>> values_;
  std::vector<int64_t> nonfinite_rows_;
};

}  // namespace kvrt::cpu_index
