// CUDA runtime wrappers (cuda_rt.h). With KVRT_WITH_CUDA this translation unit includes
// cuda_runtime_api.h and is linked with CUDA::cudart_static; without it every call returns
// FailedPrecondition and CudaAvailable() is false, so the same runtime code builds everywhere.
#include "kvrt_transfer/cuda_rt.h"

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "absl/strings/str_cat.h"

#if KVRT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvrt::transfer {

#if KVRT_WITH_CUDA
namespace {

absl::Status Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();  // clear a sticky-free error so the next call is not blamed
  if (e == cudaErrorMemoryAllocation)
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": out of memory (", cudaGetErrorName(e), ")"));
  return absl::InternalError(absl::StrCat(what, ": CUDA error ", static_cast<int>(e), " (",
                                          cudaGetErrorName(e), ": ", cudaGetErrorString(e), ")"));
}

cudaStream_t S(void* s) { return static_cast<cudaStream_t>(s); }
cudaEvent_t E(void* e) { return static_cast<cudaEvent_t>(e); }

}  // namespace

bool CudaAvailable() {
  static const bool available = [] {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    (void)cudaGetLastError();
    return ok;
  }();
  return available;
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int CurrentDevice() {
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return d;
}

namespace {
bool RelaxCaptureMode() {
  static const bool relax = [] {
    const char* e = std::getenv("KVRT_CAPTURE_RELAXED");
    return e == nullptr || std::string_view(e) != "0";
  }();
  return relax;
}
}  // namespace

int RelaxCaptureModeOfThisThread() {
  if (!RelaxCaptureMode()) return -1;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess) return static_cast<int>(mode);
  (void)cudaGetLastError();
  return -1;
}

void RestoreCaptureModeOfThisThread(int previous) {
  if (previous < 0) return;
  auto mode = static_cast<cudaStreamCaptureMode>(previous);
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) (void)cudaGetLastError();
}

CudaCallScope::CudaCallScope(int device) {
  if (device < 0) return;
  // A launch is checked with cudaGetLastError, which also returns an error that the caller's own
  // calls on this thread left unread: it is not kvrt's, and would fail kvrt's call (the likely
  // cause of an append that failed with error 900 on the GPU machine while nothing was captured).
  (void)cudaGetLastError();
  previous_mode_ = RelaxCaptureModeOfThisThread();
  const int current = CurrentDevice();
  if (current == device) return;
  if (cudaSetDevice(device) == cudaSuccess) previous_device_ = current;
  (void)cudaGetLastError();
}

CudaCallScope::~CudaCallScope() {
  if (previous_device_ >= 0 && cudaSetDevice(previous_device_) != cudaSuccess)
    (void)cudaGetLastError();
  RestoreCaptureModeOfThisThread(previous_mode_);
}

std::string DeviceName() {
  if (!CudaAvailable()) return "";
  int dev = 0;
  cudaDeviceProp prop;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess)
    return "";
  return absl::StrCat(prop.name, " (", prop.multiProcessorCount, " SMs)");
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(std::size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  if (absl::Status s = Check(cudaMalloc(&b.ptr_, bytes), "cudaMalloc"); !s.ok()) {
    b.ptr_ = nullptr;
    return absl::Status(s.code(), absl::StrCat(s.message(), " (", bytes, " bytes)"));
  }
  b.size_ = bytes;
  return b;
}

void DeviceBuffer::Reset() {
  if (ptr_ != nullptr) (void)cudaFree(ptr_);
  ptr_ = nullptr;
  size_ = 0;
}

absl::StatusOr<Stream> Stream::Create(bool high_priority) {
  Stream s;
  cudaStream_t raw = nullptr;
  int least = 0, greatest = 0;
  if (high_priority) {
    if (absl::Status st = Check(cudaDeviceGetStreamPriorityRange(&least, &greatest),
                                "cudaDeviceGetStreamPriorityRange");
        !st.ok())
      return st;
  }
  if (absl::Status st = Check(cudaStreamCreateWithPriority(&raw, cudaStreamNonBlocking, greatest),
                              "cudaStreamCreate");
      !st.ok())
    return st;
  s.s_ = raw;
  return s;
}

void Stream::Reset() {
  if (s_ != nullptr) (void)cudaStreamDestroy(S(s_));
  s_ = nullptr;
}

absl::StatusOr<Event> Event::Create(bool timing) {
  Event ev;
  cudaEvent_t raw = nullptr;
  if (absl::Status st =
          Check(cudaEventCreateWithFlags(&raw, timing ? cudaEventDefault : cudaEventDisableTiming),
                "cudaEventCreate");
      !st.ok())
    return st;
  ev.e_ = raw;
  return ev;
}

void Event::Reset() {
  if (e_ != nullptr) (void)cudaEventDestroy(E(e_));
  e_ = nullptr;
}

absl::Status Event::Record(void* stream) {
  if (e_ == nullptr) {
    absl::StatusOr<Event> made = Create(false);
    if (!made.ok()) return made.status();
    *this = std::move(*made);
  }
  return Check(cudaEventRecord(E(e_), S(stream)), "cudaEventRecord");
}

absl::Status Event::Synchronize() const {
  if (e_ == nullptr) return absl::OkStatus();
  return Check(cudaEventSynchronize(E(e_)), "cudaEventSynchronize");
}

absl::Status Event::Query(bool* done) const {
  const cudaError_t e = cudaEventQuery(E(e_));
  *done = e == cudaSuccess;
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return absl::OkStatus();
  }
  return Check(e, "cudaEventQuery");
}

absl::StatusOr<float> ElapsedMs(const Event& start, const Event& end) {
  float ms = 0.f;
  const cudaError_t e = cudaEventElapsedTime(&ms, E(start.get()), E(end.get()));
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return absl::UnavailableError("event not complete");
  }
  if (absl::Status s = Check(e, "cudaEventElapsedTime"); !s.ok()) return s;
  return ms;
}

absl::Status MemcpyAsync(void* dst, const void* src, std::size_t bytes, void* stream) {
  if (bytes == 0) return absl::OkStatus();
  return Check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, S(stream)), "cudaMemcpyAsync");
}

absl::Status Memcpy2DAsync(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                           std::size_t width, std::size_t rows, void* stream) {
  if (width == 0 || rows == 0) return absl::OkStatus();
  return Check(
      cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDefault, S(stream)),
      "cudaMemcpy2DAsync");
}

absl::Status MemsetAsync(void* dst, int value, std::size_t bytes, void* stream) {
  if (bytes == 0) return absl::OkStatus();
  return Check(cudaMemsetAsync(dst, value, bytes, S(stream)), "cudaMemsetAsync");
}

absl::Status StreamWaitEvent(void* stream, const Event& event) {
  return Check(cudaStreamWaitEvent(S(stream), E(event.get()), 0), "cudaStreamWaitEvent");
}

absl::Status AddStreamCallback(void* stream, void (*fn)(void*), void* arg) {
  struct Call {
    void (*fn)(void*);
    void* arg;
  };
  auto* call = new Call{fn, arg};
  // NOTE: cudaStreamAddCallback, not cudaLaunchHostFunc: the latter is not called at all once the
  // context has failed, which would leave whatever waits on fn waiting for ever.
  const cudaError_t e = cudaStreamAddCallback(
      S(stream),
      [](cudaStream_t, cudaError_t, void* p) {
        auto* c = static_cast<Call*>(p);
        c->fn(c->arg);
        delete c;
      },
      call, 0);
  if (e != cudaSuccess) delete call;
  return Check(e, "cudaStreamAddCallback");
}

absl::Status StreamSynchronize(void* stream) {
  return Check(cudaStreamSynchronize(S(stream)), "cudaStreamSynchronize");
}

absl::StatusOr<void*> MallocAsync(std::size_t bytes, void* stream) {
  void* p = nullptr;
  if (bytes == 0) return p;
  if (absl::Status s = Check(cudaMallocAsync(&p, bytes, S(stream)), "cudaMallocAsync"); !s.ok())
    return s;
  return p;
}

absl::Status FreeAsync(void* ptr, void* stream) {
  if (ptr == nullptr) return absl::OkStatus();
  return Check(cudaFreeAsync(ptr, S(stream)), "cudaFreeAsync");
}

absl::Status KeepPoolMemory() {
  int dev = 0;
  if (absl::Status s = Check(cudaGetDevice(&dev), "cudaGetDevice"); !s.ok()) return s;
  cudaMemPool_t pool;
  if (absl::Status s =
          Check(cudaDeviceGetDefaultMemPool(&pool, dev), "cudaDeviceGetDefaultMemPool");
      !s.ok())
    return s;
  uint64_t threshold = UINT64_MAX;
  return Check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold),
               "cudaMemPoolSetAttribute");
}

absl::Status HostAlloc(std::size_t bytes, void** out) {
  *out = nullptr;
  // Mapped (implied under unified addressing, said for the reader): kernels write eviction blocks
  // straight into them (DeviceTier's fused decode append).
  if (absl::Status s = Check(cudaHostAlloc(out, bytes, cudaHostAllocPortable | cudaHostAllocMapped),
                             "cudaHostAlloc");
      !s.ok()) {
    *out = nullptr;
    return s;
  }
  return absl::OkStatus();
}

void HostFree(void* ptr) {
  if (ptr != nullptr) (void)cudaFreeHost(ptr);
}

absl::StatusOr<HostRegistration> HostRegistration::Register(const void* ptr, std::size_t bytes,
                                                            bool device_writes) {
  HostRegistration r;
  if (ptr == nullptr || bytes == 0) return r;
  void* p = const_cast<void*>(ptr);
  // Read-only mappings let the device cache the reads; not every device supports them. A copy
  // from the device into read-only registered memory fails (cudaErrorInvalidValue).
  int dev = 0, read_only = 0;
  if (!device_writes && cudaGetDevice(&dev) == cudaSuccess)
    (void)cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, dev);
  unsigned flags = cudaHostRegisterMapped | (read_only ? cudaHostRegisterReadOnly : 0u);
  absl::Status s = Check(cudaHostRegister(p, bytes, flags), "cudaHostRegister");
  if (!s.ok()) return s;
  void* d = nullptr;
  s = Check(cudaHostGetDevicePointer(&d, p, 0), "cudaHostGetDevicePointer");
  if (!s.ok()) {
    (void)cudaHostUnregister(p);
    return s;
  }
  r.host_ = ptr;
  r.device_ = d;
  r.size_ = bytes;
  return r;
}

void HostRegistration::Reset() {
  if (host_ != nullptr) (void)cudaHostUnregister(const_cast<void*>(host_));
  host_ = device_ = nullptr;
  size_ = 0;
}

bool StreamIsCapturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(S(stream), &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

bool IsDevicePointer(const void* ptr) {
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

#else  // !KVRT_WITH_CUDA

namespace {
absl::Status NoCuda(const char* what) {
  return absl::FailedPreconditionError(absl::StrCat(what, ": kvrt was built without CUDA"));
}
}  // namespace

bool CudaAvailable() { return false; }
std::string DeviceName() { return ""; }
int DeviceCount() { return 0; }
int CurrentDevice() { return 0; }
int RelaxCaptureModeOfThisThread() { return -1; }
void RestoreCaptureModeOfThisThread(int) {}
CudaCallScope::CudaCallScope(int) {}
CudaCallScope::~CudaCallScope() = default;
absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(std::size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  return NoCuda("cudaMalloc");
}
void DeviceBuffer::Reset() {
  ptr_ = nullptr;
  size_ = 0;
}
absl::StatusOr<Stream> Stream::Create(bool) { return NoCuda("cudaStreamCreate"); }
void Stream::Reset() { s_ = nullptr; }
absl::StatusOr<Event> Event::Create(bool) { return NoCuda("cudaEventCreate"); }
void Event::Reset() { e_ = nullptr; }
absl::Status Event::Record(void*) { return NoCuda("cudaEventRecord"); }
absl::Status Event::Synchronize() const {
  return e_ == nullptr ? absl::OkStatus() : NoCuda("cudaEventSynchronize");
}
absl::Status Event::Query(bool* done) const {
  *done = true;
  return NoCuda("cudaEventQuery");
}
absl::StatusOr<float> ElapsedMs(const Event&, const Event&) {
  return NoCuda("cudaEventElapsedTime");
}
absl::Status MemcpyAsync(void*, const void*, std::size_t bytes, void*) {
  return bytes == 0 ? absl::OkStatus() : NoCuda("cudaMemcpyAsync");
}
absl::Status Memcpy2DAsync(void*, std::size_t, const void*, std::size_t, std::size_t width,
                           std::size_t rows, void*) {
  return width == 0 || rows == 0 ? absl::OkStatus() : NoCuda("cudaMemcpy2DAsync");
}
absl::Status MemsetAsync(void*, int, std::size_t bytes, void*) {
  return bytes == 0 ? absl::OkStatus() : NoCuda("cudaMemsetAsync");
}
absl::Status StreamWaitEvent(void*, const Event&) { return NoCuda("cudaStreamWaitEvent"); }
absl::Status StreamSynchronize(void*) { return NoCuda("cudaStreamSynchronize"); }
absl::Status AddStreamCallback(void*, void (*)(void*), void*) {
  return NoCuda("cudaStreamAddCallback");
}
absl::StatusOr<void*> MallocAsync(std::size_t, void*) { return NoCuda("cudaMallocAsync"); }
absl::Status FreeAsync(void* ptr, void*) {
  return ptr == nullptr ? absl::OkStatus() : NoCuda("cudaFreeAsync");
}
absl::Status KeepPoolMemory() { return NoCuda("cudaMemPoolSetAttribute"); }
absl::Status HostAlloc(std::size_t, void** out) {
  *out = nullptr;
  return NoCuda("cudaHostAlloc");
}
void HostFree(void*) {}
absl::StatusOr<HostRegistration> HostRegistration::Register(const void* ptr, std::size_t bytes,
                                                            bool) {
  if (ptr == nullptr || bytes == 0) return HostRegistration();
  return NoCuda("cudaHostRegister");
}
void HostRegistration::Reset() {
  host_ = device_ = nullptr;
  size_ = 0;
}
bool IsDevicePointer(const void*) { return false; }
bool StreamIsCapturing(void*) { return false; }

#endif

}  // namespace kvrt::transfer
