#include "kvrt_common/timeline.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kvrt_common/clock.h"

namespace kvrt::timeline {
namespace {

struct Event {
  const char* name;
  int64_t arg, begin_ns, end_ns;
};

struct ThreadLog {
  int tid;
  std::vector<Event> events;
};

// Owns every thread's log (threads keep a raw pointer) and writes them all at exit.
class Registry {
 public:
  Registry() {
    const char* path = std::getenv("KVRT_TIMELINE");
    if (path != nullptr && path[0] != '\0') path_ = path;
  }
  ~Registry() { Write(); }
  bool enabled() const { return !path_.empty(); }

  ThreadLog* NewLog() {
    std::lock_guard<std::mutex> lock(mu_);
    logs_.push_back(std::make_unique<ThreadLog>());
    logs_.back()->tid = static_cast<int>(logs_.size());
    logs_.back()->events.reserve(4096);
    return logs_.back().get();
  }

 private:
  void Write() {
    if (path_.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    std::FILE* f = std::fopen(path_.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "kvrt: KVRT_TIMELINE: cannot write %s\n", path_.c_str());
      return;
    }
    int64_t t0 = INT64_MAX;
    for (const auto& log : logs_)
      for (const Event& e : log->events) t0 = std::min(t0, e.begin_ns);
    std::fprintf(f, "{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
    bool first = true;
    for (const auto& log : logs_) {
      for (const Event& e : log->events) {
        // Span names are the code's own literals: nothing to escape.
        std::fprintf(f,
                     "%s{\"name\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%.3f,"
                     "\"dur\":%.3f,\"args\":{\"arg\":%lld}}",
                     first ? "" : ",\n", e.name, log->tid, (e.begin_ns - t0) / 1e3,
                     (e.end_ns - e.begin_ns) / 1e3, static_cast<long long>(e.arg));
        first = false;
      }
    }
    std::fprintf(f, "\n]}\n");
    std::fclose(f);
  }

  std::string path_;
  std::mutex mu_;
  std::vector<std::unique_ptr<ThreadLog>> logs_;
};

Registry& TheRegistry() {
  static Registry registry;
  return registry;
}

}  // namespace

bool Enabled() {
  static const bool enabled = TheRegistry().enabled();
  return enabled;
}

void Record(const char* name, int64_t arg, int64_t begin_ns, int64_t end_ns) {
  thread_local ThreadLog* log = TheRegistry().NewLog();
  if (static_cast<int64_t>(log->events.size()) >= kMaxSpansPerThread) return;
  log->events.push_back({name, arg, begin_ns, end_ns});
}

Span::Span(const char* name, int64_t arg)
    : name_(name), arg_(arg), begin_ns_(Enabled() ? NowNs() : 0) {}

void Span::End() {
  if (begin_ns_ != 0) Record(name_, arg_, begin_ns_, NowNs());
  begin_ns_ = 0;
}

}  // namespace kvrt::timeline
