#pragma once
// Thin CUDA runtime wrappers usable from g++-compiled code (no CUDA header here): device buffers,
// streams and events as RAII values, async copies, stream-ordered allocation. Streams are `void*`
// (a cudaStream_t; null = the legacy default stream). Every call returns an absl::Status:
// FailedPrecondition when kvrt was built without CUDA, Internal naming the CUDA error otherwise,
// ResourceExhausted when an allocation fails.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvrt::transfer {

// True when built with CUDA and at least one device is visible.
bool CudaAvailable();
// The current device's name and SM count ("" / 0 without a device), for reports.
std::string DeviceName();
// Visible CUDA devices (0 without CUDA).
int DeviceCount();
// The calling thread's current device (0 without CUDA).
int CurrentDevice();

// The calling thread makes kvrt's CUDA calls for the scope: `device` is its current device and
// its stream-capture mode is relaxed (cudaThreadExchangeStreamCaptureMode); both are restored at
// exit. A runtime on one GPU is driven from threads that may use another. And a capture begun in
// cudaStreamCaptureModeGlobal (PyTorch's default) on any thread forbids the "potentially unsafe"
// calls (allocations, synchronisations, event queries, host registrations) on every thread whose
// mode is global, and a forbidden call invalidates that capture: a decoder capturing its own work
// while kvrt works (its API call on another thread, its background jobs on the workers) would
// lose its graph. kvrt never enqueues on a capturing stream (calls on one are refused), so the
// relaxed mode costs the caller's capture no check that guards it. On entry it also discards an
// error the thread's earlier CUDA calls left unread (cudaGetLastError), which kvrt's launch checks
// would otherwise report as their own. device < 0 (the host backend) or a build without CUDA:
// does nothing. KVRT_CAPTURE_RELAXED=0 (diagnostics) leaves the mode.
class CudaCallScope {
 public:
  explicit CudaCallScope(int device);
  ~CudaCallScope();
  CudaCallScope(const CudaCallScope&) = delete;
  CudaCallScope& operator=(const CudaCallScope&) = delete;

 private:
  int previous_device_ = -1;
  int previous_mode_ = -1;  // RelaxCaptureModeOfThisThread's result
};

// CudaCallScope's capture mode alone, for a thread that enters and leaves kvrt's work through
// callbacks (a oneTBB observer): Relax returns what Restore takes back (-1: nothing changed).
int RelaxCaptureModeOfThisThread();
void RestoreCaptureModeOfThisThread(int previous);

// Device memory (cudaMalloc / cudaFree). Move-only; an empty buffer holds null.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(std::size_t bytes);
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  void* data() const { return ptr_; }
  std::size_t size() const { return size_; }
  bool empty() const { return ptr_ == nullptr; }
  void Reset();

 private:
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

// Whether `stream` is a created stream, whose order two calls that pass it share: not null (the
// legacy default stream) nor the special handles cudaStreamLegacy (1) and cudaStreamPerThread (2,
// one handle for a different stream on each thread). A wait that stream order already gives is
// skipped only on such a stream.
inline bool IsCreatedStream(void* stream) { return reinterpret_cast<uintptr_t>(stream) > 2; }

// A non-blocking stream (cudaStreamNonBlocking: no implicit sync with the legacy default stream).
class Stream {
 public:
  Stream() = default;
  // high: the device's greatest stream priority (its kernels' blocks are scheduled before those
  // of default-priority streams, e.g. a caller's long attention kernel).
  static absl::StatusOr<Stream> Create(bool high_priority = false);
  ~Stream() { Reset(); }
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      Reset();
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  void* get() const { return s_; }
  void Reset();

 private:
  void* s_ = nullptr;
};

// An event; `timing` = false creates it with cudaEventDisableTiming (cheaper to record and wait).
class Event {
 public:
  Event() = default;
  static absl::StatusOr<Event> Create(bool timing);
  ~Event() { Reset(); }
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&& o) noexcept {
    if (this != &o) {
      Reset();
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  void* get() const { return e_; }
  bool empty() const { return e_ == nullptr; }
  // Records the event on stream; an empty one is first created without timing (the events a
  // decode step records every call are made once, at their first record).
  absl::Status Record(void* stream);
  // Waits for the work before the last Record; OK at once for an empty event (never recorded:
  // nothing to wait for), so that a "wait for the previous step" needs no first-call branch.
  absl::Status Synchronize() const;
  // OK and *done = whether the work before the last Record has completed.
  absl::Status Query(bool* done) const;
  void Reset();

 private:
  void* e_ = nullptr;
};

// Milliseconds between two recorded, completed timing events; Unavailable if not complete yet.
absl::StatusOr<float> ElapsedMs(const Event& start, const Event& end);

// cudaMemcpyAsync with cudaMemcpyDefault (unified addressing decides the direction). A pageable
// host source of an H2D copy may be reused as soon as the call returns (the driver stages it); a
// pageable host destination makes the copy synchronous with the host.
absl::Status MemcpyAsync(void* dst, const void* src, std::size_t bytes, void* stream);
// `rows` rows of `width` bytes, src rows `src_pitch` apart, dst rows `dst_pitch` apart (one
// cudaMemcpy2DAsync: e.g. every k-th row of a device tensor to host in one copy).
absl::Status Memcpy2DAsync(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                           std::size_t width, std::size_t rows, void* stream);
// cudaMemsetAsync of device memory (`value` as a byte).
absl::Status MemsetAsync(void* dst, int value, std::size_t bytes, void* stream);
absl::Status StreamWaitEvent(void* stream, const Event& event);
// fn(arg) on CUDA's callback thread once the work queued on `stream` before this call is done,
// also after a failure there (so that whatever waits on fn is released). fn must not call CUDA
// and should return quickly: the stream's later work waits for it.
absl::Status AddStreamCallback(void* stream, void (*fn)(void*), void* arg);
absl::Status StreamSynchronize(void* stream);
// Stream-ordered allocation from the device's default memory pool (cudaMallocAsync / FreeAsync).
absl::StatusOr<void*> MallocAsync(std::size_t bytes, void* stream);
absl::Status FreeAsync(void* ptr, void* stream);
// Keeps freed stream-ordered memory cached in the default pool (release threshold = max), so the
// per-step scratch of the decode path does not go back to the driver at every synchronisation.
absl::Status KeepPoolMemory();
// Page-locked host memory (cudaHostAlloc, portable) and its release.
absl::Status HostAlloc(std::size_t bytes, void** out);
void HostFree(void* ptr);
// Existing host memory page-locked and mapped into the device's address space
// (cudaHostRegister, mapped, read-only where the device supports it), so that kernels read it
// over PCIe without a copy. The memory must stay allocated until the registration is reset, and
// no two registrations may share a page. Move-only; an empty registration holds null.
class HostRegistration {
 public:
  HostRegistration() = default;
  // device_writes: copies from the device may write the memory (else it is mapped read-only
  // where the device supports that, which lets it cache the reads).
  static absl::StatusOr<HostRegistration> Register(const void* ptr, std::size_t bytes,
                                                   bool device_writes = false);
  ~HostRegistration() { Reset(); }
  HostRegistration(HostRegistration&& o) noexcept
      : host_(std::exchange(o.host_, nullptr)),
        device_(std::exchange(o.device_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  HostRegistration& operator=(HostRegistration&& o) noexcept {
    if (this != &o) {
      Reset();
      host_ = std::exchange(o.host_, nullptr);
      device_ = std::exchange(o.device_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  const void* host() const { return host_; }
  // The address kernels use for host() (equal to it under unified addressing).
  const void* device() const { return device_; }
  std::size_t size() const { return size_; }
  bool empty() const { return host_ == nullptr; }
  void Reset();

 private:
  const void* host_ = nullptr;
  const void* device_ = nullptr;
  std::size_t size_ = 0;
};
// True when `ptr` is device (or managed) memory by unified addressing.
bool IsDevicePointer(const void* ptr);
// Whether work on `stream` is being captured into a CUDA graph (false without CUDA).
bool StreamIsCapturing(void* stream);

}  // namespace kvrt::transfer
