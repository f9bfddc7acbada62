#include "head_pad.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_transfer/cuda_rt.h"

namespace kvrt::runtime {

PaddedCall::~PaddedCall() {
  if (device_ != nullptr) (void)transfer::FreeAsync(device_, stream_);
}

int HeadPad::WidthFor(int d) {
  for (int w : {64, 128, 256})
    if (d <= w) return w;
  return 0;
}

namespace {
// Each buffer of the scratch starts 256-byte aligned (the kernels' vector loads).
std::size_t Aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }
}  // namespace

absl::Status HeadPad::In(std::initializer_list<Tensor> inputs, int64_t out_rows, const Exec& exec,
                         PaddedCall* call) const {
  if (inputs.size() > 3) return absl::InternalError("HeadPad::In: at most three inputs");
  const std::size_t es = DTypeSize(dtype_);
  std::size_t in_bytes = 0;
  for (const Tensor& t : inputs)
    if (t.data != nullptr) in_bytes += Aligned(static_cast<std::size_t>(t.rows) * to_ * es);
  const std::size_t out_bytes = static_cast<std::size_t>(std::max<int64_t>(out_rows, 0)) * to_ * 4;
  unsigned char* base = nullptr;
  if (exec.device) {
    call->stream_ = exec.stream;
    if (in_bytes + out_bytes > 0) {
      KVRT_ASSIGN_OR_RETURN(call->device_,
                            transfer::MallocAsync(in_bytes + out_bytes, exec.stream));
      base = static_cast<unsigned char*>(call->device_);
      if (in_bytes > 0) KVRT_RETURN_IF_ERROR(transfer::MemsetAsync(base, 0, in_bytes, exec.stream));
    }
  } else {
    call->host_.assign(in_bytes + out_bytes, 0);
    base = call->host_.data();
  }
  std::size_t at = 0;
  int i = 0;
  for (const Tensor& t : inputs) {
    if (t.data != nullptr) {
      unsigned char* dst = base + at;
      const std::size_t rows = static_cast<std::size_t>(t.rows);
      if (exec.device) {
        KVRT_RETURN_IF_ERROR(transfer::Memcpy2DAsync(dst, to_ * es, t.data, from_ * es, from_ * es,
                                                     rows, exec.stream));
      } else {
        const auto* src = static_cast<const unsigned char*>(t.data);
        for (std::size_t r = 0; r < rows; ++r)
          std::memcpy(dst + r * to_ * es, src + r * from_ * es, from_ * es);
      }
      call->in_[i] = dst;
      at += Aligned(rows * to_ * es);
    }
    ++i;
  }
  if (out_bytes > 0) call->out_ = reinterpret_cast<float*>(base + at);
  return absl::OkStatus();
}

absl::Status HeadPad::Out(const PaddedCall& call, float* out, int64_t rows, const Exec& exec,
                          int64_t first) const {
  const std::size_t n = static_cast<std::size_t>(rows), f = static_cast<std::size_t>(first);
  float* dst = out + f * from_;
  const float* src = call.out() + f * to_;
  if (exec.device)
    return transfer::Memcpy2DAsync(dst, from_ * 4, src, to_ * 4, from_ * 4, n, exec.stream);
  for (std::size_t r = 0; r < n; ++r) std::memcpy(dst + r * from_, src + r * to_, from_ * 4);
  return absl::OkStatus();
}

}  // namespace kvrt::runtime
