// kvrt._kvrt.Runtime: one kvrt_runtime* and the C calls on it, with tensors checked and passed
// by pointer (no copy) and the GIL released while the library works. The Pythonic surface
// (Config, Sequence, Stats) is kvrt/_runtime.py.
#pragma once

#include <kvrt.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tensor_arg.h"

namespace kvrt_py {

namespace nb = nanobind;

class PyRuntime {
 public:
  explicit PyRuntime(const nb::dict& config);
  ~PyRuntime();
  PyRuntime(const PyRuntime&) = delete;
  PyRuntime& operator=(const PyRuntime&) = delete;

  // Destroys the runtime once the calls other threads are making on it have returned; a call
  // that starts after it raises FailedPreconditionError.
  void Close();
  bool closed() const { return rt_ == nullptr; }
  nb::dict Config() const;
  std::string DescribeSearch() const;
  nb::dict Stats() const;

  int64_t SeqCreate();
  void SeqRelease(int64_t seq);
  void SeqWait(int64_t seq);
  int64_t SeqLength(int64_t seq, int64_t layer) const;

  // stream: a cudaStream_t as an integer (0 = the legacy default stream); used for device
  // tensors only.
  // sampled: q holds some of the prompt's queries (kvrt_prefill_sampled_ex), not one per token.
  void Prefill(int64_t seq, int64_t layer, const InArray* q, const InArray& k, const InArray& v,
               uintptr_t stream, bool sampled);
  // kvrt_prefill_query_rows: (count, stride) of the rows whose queries a prefill of n reads.
  std::pair<int64_t, int64_t> PrefillQueryRows(int64_t n_tokens) const;
  void Append(int64_t seq, int64_t layer, const InArray& k, const InArray& v, uintptr_t stream);
  // lse: null, or f32 [q_heads] ([n, q_heads] for a batch) beside out, which receives each
  // head's merged log-sum-exp (kvrt_attend_batch_lse_ex).
  void Attend(int64_t seq, int64_t layer, const InArray& q, const OutArray& out,
              const OutArray* lse, uintptr_t stream);
  void AttendBatch(const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
                   const OutArray& out, const OutArray* lse, uintptr_t stream);
  // A decoder's layer-step in one crossing (one GIL release, one set of checks): kvrt_append of
  // k, v then kvrt_attend of q. An append that fails raises before the attend; an attend that
  // fails leaves the appended rows in place, as the two calls would.
  void AppendAttend(int64_t seq, int64_t layer, const InArray& q, const InArray& k,
                    const InArray& v, const OutArray& out, const OutArray* lse, uintptr_t stream);
  // The same for a batch: row i of k, v [n, kv_heads, head_dim] is appended to seqs[i] (in
  // order; the first failure raises, naming the sequence, and the appends before it stand), then
  // kvrt_attend_batch of q [n, q_heads, head_dim].
  void AppendAttendBatch(const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
                         const InArray& k, const InArray& v, const OutArray& out,
                         const OutArray* lse, uintptr_t stream);

  void SetHeadPolicy(int64_t layer, int64_t q_head, int64_t policy);
  void SetSearchEffort(int64_t effort);
  std::vector<int64_t> GetAttended(int64_t seq, int64_t layer, int64_t q_head) const;
  float GetEstimateLse(int64_t seq, int64_t layer, int64_t q_head) const;

 private:
  // A call on the runtime, from Live() (the runtime open, the GIL held) to the end of the method:
  // Close() waits for every one to end before it destroys the runtime, since another thread may
  // be inside the library without the GIL. Converts to the handle for the C calls.
  class LiveCall {
   public:
    LiveCall(const PyRuntime* owner, kvrt_runtime* rt);
    ~LiveCall();
    LiveCall(const LiveCall&) = delete;
    LiveCall& operator=(const LiveCall&) = delete;
    operator kvrt_runtime*() const { return rt_; }

   private:
    const PyRuntime* owner_;
    kvrt_runtime* rt_;
  };

  // Raises FailedPreconditionError once the runtime is closed.
  LiveCall Live(const char* call) const;

  kvrt_runtime* rt_ = nullptr;  // read and cleared with the GIL held
  kvrt_config cfg_{};           // the effective configuration (kvrt_runtime_config)
  mutable std::mutex calls_mu_;
  mutable std::condition_variable calls_done_;
  mutable int64_t calls_ = 0;  // LiveCalls alive
};

}  // namespace kvrt_py
