#include "py_runtime.h"

#include <string>
#include <string_view>

#include "config_dict.h"
#include "errors.h"

namespace kvrt_py {
namespace {

// Runs a kvrt call without the GIL and returns its status with kvrt_last_error() read on the
// same thread right after it.
template <typename F>
kvrt_status Call(std::string* error, F&& f) {
  nb::gil_scoped_release release;
  kvrt_status s = f();
  if (s != KVRT_OK) *error = kvrt_last_error();
  return s;
}

kvrt_exec Exec(const TensorArg& t, uintptr_t stream) {
  kvrt_exec e = kvrt_exec_default();
  e.memory = t.memory;
  e.cuda_stream = t.memory == KVRT_MEMORY_DEVICE ? reinterpret_cast<void*>(stream) : nullptr;
  return e;
}

// The optional lse argument of an attend of n sequences (n < 0: one, shape [q_heads]).
TensorArg LseArg(const char* call, const OutArray* lse, int64_t n, int32_t q_heads) {
  if (lse == nullptr) return {};
  return n < 0 ? CheckTensor(call, "lse", InArray(*lse), KVRT_DTYPE_F32, {q_heads})
               : CheckTensor(call, "lse", InArray(*lse), KVRT_DTYPE_F32, {n, q_heads});
}

// kvrt_attend_batch_ex, or its lse form when lse is given (lse.data non-null).
kvrt_status AttendRows(kvrt_runtime* rt, const int64_t* seqs, int32_t n, int32_t layer,
                       const TensorArg& q, const TensorArg& out, const TensorArg& lse,
                       const kvrt_exec* ex) {
  float* o = static_cast<float*>(out.data);
  if (lse.data == nullptr) return kvrt_attend_batch_ex(rt, seqs, n, layer, q.data, o, ex);
  return kvrt_attend_batch_lse_ex(rt, seqs, n, layer, q.data, o, static_cast<float*>(lse.data), ex);
}

// One sequence's attend: kvrt_attend_ex without lse, else the lse form of a batch of one.
kvrt_status AttendOne(kvrt_runtime* rt, int64_t seq, int32_t layer, const TensorArg& q,
                      const TensorArg& out, const TensorArg& lse, const kvrt_exec* ex) {
  if (lse.data != nullptr) return AttendRows(rt, &seq, 1, layer, q, out, lse, ex);
  return kvrt_attend_ex(rt, seq, layer, q.data, static_cast<float*>(out.data), ex);
}

// AttendOne's error as one attend's where it came from a batch of one (the lse form): the batch's
// prefixes ("attend_batch: sequence 7: ", "kvrt_attend_batch_lse: ") and its row ("batch row 0")
// are not the caller's.
std::string AsOneAttend(std::string e) {
  auto starts = [&](std::string_view p) { return e.compare(0, p.size(), p) == 0; };
  constexpr std::string_view kMember = "attend_batch: sequence ";
  if (starts(kMember)) {
    const std::size_t colon = e.find(": ", kMember.size());
    if (colon != std::string::npos) e.erase(0, colon + 2);
  }
  for (std::string_view p : {"kvrt_attend_batch_lse: ", "attend_batch: "})
    if (starts(p)) e.replace(0, p.size(), "attend: ");
  const std::size_t row = e.find(" at batch row 0,");
  if (row != std::string::npos) e.replace(row, 16, " at token 0,");
  return e;
}

}  // namespace

PyRuntime::PyRuntime(const nb::dict& config) {
  kvrt_config c = ConfigFromDict(config);
  std::string err;
  kvrt_runtime* rt = nullptr;
  Check(Call(&err, [&] { return kvrt_runtime_create(&c, &rt); }), "Runtime", err);
  rt_ = rt;
  cfg_ = kvrt_config_default();
  Check(Call(&err, [&] { return kvrt_runtime_config(rt_, &cfg_); }), "Runtime", err);
}

PyRuntime::~PyRuntime() { Close(); }

void PyRuntime::Close() {
  if (rt_ == nullptr) return;
  kvrt_runtime* rt = rt_;
  rt_ = nullptr;  // with the GIL held, as Live reads it: no call starts after this
  // NOTE: the wait is without the GIL, which the calls in flight take back before they end.
  // Destroying at once freed the runtime under them (a worker's attend beside close() crashed
  // the interpreter).
  nb::gil_scoped_release release;
  {
    std::unique_lock<std::mutex> lock(calls_mu_);
    calls_done_.wait(lock, [this] { return calls_ == 0; });
  }
  kvrt_runtime_destroy(rt);
}

PyRuntime::LiveCall::LiveCall(const PyRuntime* owner, kvrt_runtime* rt) : owner_(owner), rt_(rt) {
  std::lock_guard<std::mutex> lock(owner_->calls_mu_);
  ++owner_->calls_;
}

PyRuntime::LiveCall::~LiveCall() {
  std::lock_guard<std::mutex> lock(owner_->calls_mu_);
  if (--owner_->calls_ == 0) owner_->calls_done_.notify_all();
}

PyRuntime::LiveCall PyRuntime::Live(const char* call) const {
  if (rt_ == nullptr) Raise(KVRT_ERR_FAILED_PRECONDITION, call, "the runtime is closed");
  return LiveCall(this, rt_);
}

nb::dict PyRuntime::Config() const {
  Live("Runtime.config");
  return ConfigToDict(cfg_);
}

std::string PyRuntime::DescribeSearch() const {
  const LiveCall rt = Live("Runtime.describe_search");
  char buf[512];
  std::string err;
  Check(Call(&err, [&] { return kvrt_runtime_describe_search(rt, buf, sizeof buf); }),
        "Runtime.describe_search", err);
  return std::string(buf);
}

nb::dict PyRuntime::Stats() const {
  const LiveCall rt = Live("Runtime.stats");
  kvrt_stats s = kvrt_stats_init();
  std::string err;
  Check(Call(&err, [&] { return kvrt_get_stats(rt, &s); }), "Runtime.stats", err);
  return StatsToDict(s);
}

int64_t PyRuntime::SeqCreate() {
  const LiveCall rt = Live("Runtime.sequence");
  kvrt_seq_id id = -1;
  std::string err;
  Check(Call(&err, [&] { return kvrt_seq_create(rt, &id); }), "Runtime.sequence", err);
  return id;
}

void PyRuntime::SeqRelease(int64_t seq) {
  const LiveCall rt = Live("Sequence.release");
  std::string err;
  Check(Call(&err, [&] { return kvrt_seq_release(rt, seq); }), "Sequence.release", err);
}

void PyRuntime::SeqWait(int64_t seq) {
  const LiveCall rt = Live("Sequence.wait");
  std::string err;
  Check(Call(&err, [&] { return kvrt_seq_wait(rt, seq); }), "Sequence.wait", err);
}

int64_t PyRuntime::SeqLength(int64_t seq, int64_t layer) const {
  CheckI32("Sequence.length", {{"layer", layer}});
  const LiveCall rt = Live("Sequence.length");
  int64_t n = 0;
  std::string err;
  Check(Call(&err, [&] { return kvrt_seq_length(rt, seq, layer, &n); }), "Sequence.length", err);
  return n;
}

void PyRuntime::Prefill(int64_t seq, int64_t layer, const InArray* q, const InArray& k,
                        const InArray& v, uintptr_t stream, bool sampled) {
  CheckI32("Sequence.prefill", {{"layer", layer}});
  const char* call = "Sequence.prefill";
  const LiveCall rt = Live(call);
  const kvrt_dtype dt = cfg_.dtype;
  TensorArg tk = CheckTensor(call, "k", k, dt, {-1, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg tv = CheckTensor(call, "v", v, dt, {tk.rows, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg tq;
  // A sample of no rows is what prefill_query_rows names for a kind that reads no queries
  // (count 0): the same as no q, as kvrt_prefill_sampled_ex takes n_queries = 0.
  const bool no_rows = sampled && q != nullptr && q->ndim() == 3 && q->shape(0) == 0 &&
                       int64_t(q->shape(1)) == cfg_.num_q_heads &&
                       int64_t(q->shape(2)) == cfg_.head_dim;
  if (no_rows) CheckDtype(call, "q", *q, dt);
  if (q != nullptr && !no_rows)
    tq = CheckTensor(call, "q", *q, dt, {sampled ? -1 : tk.rows, cfg_.num_q_heads, cfg_.head_dim});
  CheckSameDevice(call, {&tk, &tv, &tq});
  kvrt_exec ex = Exec(tk, stream);
  const int64_t n_queries = tq.data != nullptr ? tq.rows : 0;
  std::string err;
  Check(Call(&err,
             [&] {
               return kvrt_prefill_sampled_ex(rt, seq, layer, tq.data, n_queries, tk.data, tv.data,
                                              tk.rows, &ex);
             }),
        call, err);
}

std::pair<int64_t, int64_t> PyRuntime::PrefillQueryRows(int64_t n_tokens) const {
  const char* call = "Runtime.prefill_query_rows";
  const LiveCall rt = Live(call);
  int64_t count = 0, stride = 1;
  std::string err;
  Check(Call(&err, [&] { return kvrt_prefill_query_rows(rt, n_tokens, &count, &stride); }), call,
        err);
  return {count, stride};
}

void PyRuntime::Append(int64_t seq, int64_t layer, const InArray& k, const InArray& v,
                       uintptr_t stream) {
  CheckI32("Sequence.append", {{"layer", layer}});
  const char* call = "Sequence.append";
  const LiveCall rt = Live(call);
  const kvrt_dtype dt = cfg_.dtype;
  TensorArg tk = CheckTensor(call, "k", k, dt, {-1, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg tv = CheckTensor(call, "v", v, dt, {tk.rows, cfg_.num_kv_heads, cfg_.head_dim});
  CheckSameDevice(call, {&tk, &tv});
  kvrt_exec ex = Exec(tk, stream);
  std::string err;
  Check(Call(&err, [&] { return kvrt_append_ex(rt, seq, layer, tk.data, tv.data, tk.rows, &ex); }),
        call, err);
}

void PyRuntime::Attend(int64_t seq, int64_t layer, const InArray& q, const OutArray& out,
                       const OutArray* lse, uintptr_t stream) {
  CheckI32("Sequence.attend", {{"layer", layer}});
  const char* call = "Sequence.attend";
  const LiveCall rt = Live(call);
  TensorArg tq = CheckTensor(call, "q", q, cfg_.dtype, {cfg_.num_q_heads, cfg_.head_dim});
  TensorArg to =
      CheckTensor(call, "out", InArray(out), KVRT_DTYPE_F32, {cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tl = LseArg(call, lse, -1, cfg_.num_q_heads);
  CheckSameDevice(call, {&tq, &to, &tl});
  kvrt_exec ex = Exec(tq, stream);
  std::string err;
  const kvrt_status st = Call(&err, [&] { return AttendOne(rt, seq, layer, tq, to, tl, &ex); });
  Check(st, call, tl.data != nullptr ? AsOneAttend(err) : err);
}

void PyRuntime::AttendBatch(const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
                            const OutArray& out, const OutArray* lse, uintptr_t stream) {
  CheckI32("Runtime.attend_batch", {{"layer", layer}});
  const char* call = "Runtime.attend_batch";
  const LiveCall rt = Live(call);
  const int64_t n = int64_t(seqs.size());
  TensorArg tq = CheckTensor(call, "q", q, cfg_.dtype, {n, cfg_.num_q_heads, cfg_.head_dim});
  TensorArg to =
      CheckTensor(call, "out", InArray(out), KVRT_DTYPE_F32,
                  {n, cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tl = LseArg(call, lse, n, cfg_.num_q_heads);
  CheckSameDevice(call, {&tq, &to, &tl});
  kvrt_exec ex = Exec(tq, stream);
  std::string err;
  Check(Call(&err, [&] { return AttendRows(rt, seqs.data(), int32_t(n), layer, tq, to, tl, &ex); }),
        call, err);
}

void PyRuntime::AppendAttend(int64_t seq, int64_t layer, const InArray& q, const InArray& k,
                             const InArray& v, const OutArray& out, const OutArray* lse,
                             uintptr_t stream) {
  CheckI32("Sequence.append_attend", {{"layer", layer}});
  const char* call = "Sequence.append_attend";
  const LiveCall rt = Live(call);
  const kvrt_dtype dt = cfg_.dtype;
  TensorArg tq = CheckTensor(call, "q", q, dt, {cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tk = CheckTensor(call, "k", k, dt, {-1, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg tv = CheckTensor(call, "v", v, dt, {tk.rows, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg to =
      CheckTensor(call, "out", InArray(out), KVRT_DTYPE_F32, {cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tl = LseArg(call, lse, -1, cfg_.num_q_heads);
  CheckSameDevice(call, {&tq, &tk, &tv, &to, &tl});
  kvrt_exec ex = Exec(tq, stream);
  std::string err;
  bool attended = false;
  const kvrt_status st = Call(&err, [&] {
    kvrt_status s = kvrt_append_ex(rt, seq, layer, tk.data, tv.data, tk.rows, &ex);
    if (s != KVRT_OK) return s;
    attended = true;
    return AttendOne(rt, seq, layer, tq, to, tl, &ex);
  });
  Check(st, call, attended && tl.data != nullptr ? AsOneAttend(err) : err);
}

void PyRuntime::AppendAttendBatch(const std::vector<int64_t>& seqs, int64_t layer, const InArray& q,
                                  const InArray& k, const InArray& v, const OutArray& out,
                                  const OutArray* lse, uintptr_t stream) {
  CheckI32("Runtime.append_attend_batch", {{"layer", layer}});
  const char* call = "Runtime.append_attend_batch";
  const LiveCall rt = Live(call);
  const int64_t n = int64_t(seqs.size());
  const kvrt_dtype dt = cfg_.dtype;
  TensorArg tq = CheckTensor(call, "q", q, dt, {n, cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tk = CheckTensor(call, "k", k, dt, {n, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg tv = CheckTensor(call, "v", v, dt, {n, cfg_.num_kv_heads, cfg_.head_dim});
  TensorArg to =
      CheckTensor(call, "out", InArray(out), KVRT_DTYPE_F32, {n, cfg_.num_q_heads, cfg_.head_dim});
  TensorArg tl = LseArg(call, lse, n, cfg_.num_q_heads);
  CheckSameDevice(call, {&tq, &tk, &tv, &to, &tl});
  kvrt_exec ex = Exec(tq, stream);
  const std::size_t row_bytes =
      std::size_t(cfg_.num_kv_heads) * cfg_.head_dim * (dt == KVRT_DTYPE_F32 ? 4 : 2);
  std::string err;
  int64_t failed = -1;  // the sequence whose append failed
  const kvrt_status status = Call(&err, [&] {
    for (int64_t i = 0; i < n; ++i) {
      kvrt_status s = kvrt_append_ex(rt, seqs[size_t(i)], layer,
                                     static_cast<const char*>(tk.data) + i * row_bytes,
                                     static_cast<const char*>(tv.data) + i * row_bytes, 1, &ex);
      if (s != KVRT_OK) {
        failed = seqs[size_t(i)];
        return s;
      }
    }
    return AttendRows(rt, seqs.data(), int32_t(n), layer, tq, to, tl, &ex);
  });
  // NOTE: a separate statement: the message must be read after the call has run.
  Check(status, call, failed < 0 ? err : "sequence " + std::to_string(failed) + ": " + err);
}

void PyRuntime::SetHeadPolicy(int64_t layer, int64_t q_head, int64_t policy) {
  CheckI32("Runtime.set_head_policy", {{"layer", layer}, {"q_head", q_head}, {"policy", policy}});
  const LiveCall rt = Live("Runtime.set_head_policy");
  std::string err;
  Check(Call(&err, [&] {
          return kvrt_set_head_policy(rt, layer, q_head, kvrt_head_policy(policy));
        }),
        "Runtime.set_head_policy", err);
}

void PyRuntime::SetSearchEffort(int64_t effort) {
  CheckI32("Runtime.set_search_effort", {{"effort", effort}});
  const LiveCall rt = Live("Runtime.set_search_effort");
  std::string err;
  Check(Call(&err, [&] { return kvrt_set_search_effort(rt, effort); }),
        "Runtime.set_search_effort", err);
  cfg_.search_effort = effort;
}

std::vector<int64_t> PyRuntime::GetAttended(int64_t seq, int64_t layer, int64_t q_head) const {
  CheckI32("Sequence.attended", {{"layer", layer}, {"q_head", q_head}});
  const char* call = "Sequence.attended";
  const LiveCall rt = Live(call);
  std::vector<int64_t> ids;
  int64_t count = 0;
  std::string err;
  for (;;) {  // the count first, then the ids (a later attend cannot intervene: same sequence)
    Check(Call(&err, [&] {
            return kvrt_get_attended(rt, seq, layer, q_head, ids.data(), int64_t(ids.size()),
                                     &count);
          }),
          call, err);
    if (count <= int64_t(ids.size())) break;
    ids.resize(size_t(count));
  }
  ids.resize(size_t(count));
  return ids;
}

float PyRuntime::GetEstimateLse(int64_t seq, int64_t layer, int64_t q_head) const {
  CheckI32("Sequence.estimate_lse", {{"layer", layer}, {"q_head", q_head}});
  const char* call = "Sequence.estimate_lse";
  const LiveCall rt = Live(call);
  float lse = 0.f;
  std::string err;
  Check(Call(&err, [&] { return kvrt_get_estimate_lse(rt, seq, layer, q_head, &lse); }), call,
        err);
  return lse;
}

}  // namespace kvrt_py
