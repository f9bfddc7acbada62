#pragma once
// A timeline of kvrt's host work, for finding where a decode step's or a prompt build's time goes
// when no host profiler is at hand (the GPU machine has none): with the environment variable
// KVRT_TIMELINE=<file> set when the process first records, every KVRT_SPAN scope is kept (per
// thread, without locks) and written at exit as Chrome trace-event JSON (chrome://tracing,
// Perfetto; tools/gpu_bench/timeline_summary.py sums it per span). Unset, a span costs one
// relaxed load. Not part of the C API: a diagnostic, documented in docs/benchmarks.md.
#include <cstdint>

namespace kvrt::timeline {

// Whether KVRT_TIMELINE named a file (read once).
bool Enabled();
// Keeps [begin_ns, end_ns) of `name` (a string literal) on this thread, with one integer argument
// (a batch member, a kv head; -1: none). At most kMaxSpansPerThread per thread.
void Record(const char* name, int64_t arg, int64_t begin_ns, int64_t end_ns);
constexpr int64_t kMaxSpansPerThread = int64_t{1} << 20;

class Span {
 public:
  Span(const char* name, int64_t arg = -1);
  ~Span() { End(); }
  // Ends the span before the scope does (once).
  void End();
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  const char* name_;
  int64_t arg_;
  int64_t begin_ns_;  // 0: not recording
};

}  // namespace kvrt::timeline

#define KVRT_SPAN_CAT2_(a, b) a##b
#define KVRT_SPAN_CAT_(a, b) KVRT_SPAN_CAT2_(a, b)
// KVRT_SPAN("name") or KVRT_SPAN("name", arg): the rest of the enclosing scope.
#define KVRT_SPAN(...) ::kvrt::timeline::Span KVRT_SPAN_CAT_(kvrt_span_, __LINE__)(__VA_ARGS__)
