#pragma once
// A GPU backend whose head_dim has no kernel instantiation (Phi-3-mini's 96, for one) runs its
// layers at the next one the kernels take (64, 128 or 256): each call's q, k, v are copied into
// rows of that width with zeros after the caller's elements, and an attend's output comes back
// without the extra columns. Zeros change no score (q . k sums nothing more) and add no value, so
// the results are the caller's head_dim's; the cost is the wider rows in every store (96 -> 128:
// a third more bytes on the GPU and in host memory, counted in the stats and the memory limits)
// and a few stream-ordered copies per call. The scale stays 1 / sqrt(caller's head_dim).
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"
#include "kvrt_runtime/runtime.h"

namespace kvrt::runtime {

// The call's padded tensors: inputs in order (null where the caller passed null), and an f32
// output of the padded width where the call attends. Device scratch is freed in stream order.
class PaddedCall {
 public:
  PaddedCall() = default;
  ~PaddedCall();
  PaddedCall(const PaddedCall&) = delete;
  PaddedCall& operator=(const PaddedCall&) = delete;

  const void* in(int i) const { return in_[i]; }
  float* out() const { return out_; }

 private:
  friend class HeadPad;
  std::vector<unsigned char> host_;
  void* device_ = nullptr;
  void* stream_ = nullptr;
  const void* in_[3] = {};
  float* out_ = nullptr;
};

class HeadPad {
 public:
  // The width the GPU kernels take for head_dim d: 64, 128 or 256; 0 past 256.
  static int WidthFor(int d);

  HeadPad(int from, int to, DType dtype) : from_(from), to_(to), dtype_(dtype) {}
  bool on() const { return from_ != to_; }

  struct Tensor {
    const void* data;  // [rows, from] in the dtype, or null
    int64_t rows;
  };
  // Pads up to three inputs into *call (device tensors on exec.stream, host ones here) and sets
  // aside an f32 [out_rows, to] output when out_rows > 0.
  absl::Status In(std::initializer_list<Tensor> inputs, int64_t out_rows, const Exec& exec,
                  PaddedCall* call) const;
  // The output's first `from` columns of rows [first, first + rows) into the same rows of out
  // ([.., from] f32), in stream order for device memory.
  absl::Status Out(const PaddedCall& call, float* out, int64_t rows, const Exec& exec,
                   int64_t first = 0) const;

 private:
  int from_, to_;
  DType dtype_;
};

}  // namespace kvrt::runtime
