#include "cpu_binding.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <new>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrt::runtime {
namespace {

// CPU ids a set must hold on this machine: the affinity calls refuse a set smaller than the
// kernel's mask, which covers every configured (possible) CPU.
int MachineCpus() {
  static const int n = [] {
    const long conf = sysconf(_SC_NPROCESSORS_CONF);
    return static_cast<int>(std::max<long>(CPU_SETSIZE, conf));
  }();
  return n;
}

// "0-3,8" from ascending ids.
std::string CompactList(const std::vector<int>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    absl::StrAppend(&out, out.empty() ? "" : ",", ids[i]);
    if (j > i) absl::StrAppend(&out, "-", ids[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

// Parses a kernel CPU list ("0-3,8-11\n"); empty on a malformed list.
std::vector<int> ParseCpuList(const std::string& text) {
  std::vector<int> ids;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, ',')) {
    part.erase(std::remove_if(part.begin(), part.end(), ::isspace), part.end());
    if (part.empty()) continue;
    int lo = 0, hi = 0;
    char dash = 0;
    std::stringstream p(part);
    if (!(p >> lo)) return {};
    hi = lo;
    if (p >> dash && (dash != '-' || !(p >> hi))) return {};
    if (lo < 0 || hi < lo) return {};
    for (int c = lo; c <= hi; ++c) ids.push_back(c);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

// The masks this thread had before each binding it is in pinned it (innermost last): a worker
// in one runtime's arena may enter another arena from a task.
struct Saved {
  const ArenaCpuBinding* binding;
  CpuSet mask;
};
thread_local std::vector<Saved> t_saved;

}  // namespace

std::vector<int> OnlineCpus() {
  std::ifstream f("/sys/devices/system/cpu/online");
  std::string text;
  if (f && std::getline(f, text)) {
    std::vector<int> ids = ParseCpuList(text);
    if (!ids.empty()) return ids;
  }
  const long n = std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN));
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i) ids[i] = static_cast<int>(i);
  return ids;
}

CpuSet::CpuSet() : cpus_(MachineCpus()), bytes_(CPU_ALLOC_SIZE(cpus_)), set_(CPU_ALLOC(cpus_)) {
  if (!set_) throw std::bad_alloc();
  CPU_ZERO_S(bytes_, set_.get());
}

CpuSet CpuSet::Range(int first, int count) {
  CpuSet s;
  for (int64_t c = first; c < int64_t{first} + count && c < s.cpus_; ++c)
    CPU_SET_S(static_cast<int>(c), s.bytes_, s.set_.get());
  return s;
}

CpuSet CpuSet::OfThisThread() {
  CpuSet s;
  if (pthread_getaffinity_np(pthread_self(), s.bytes_, s.set_.get()) != 0) {
    CPU_ZERO_S(s.bytes_, s.set_.get());
  }
  return s;
}

bool CpuSet::Has(int cpu) const {
  return cpu >= 0 && cpu < cpus_ && CPU_ISSET_S(cpu, bytes_, set_.get());
}

bool CpuSet::operator==(const CpuSet& other) const {
  return bytes_ == other.bytes_ && CPU_EQUAL_S(bytes_, set_.get(), other.set_.get());
}

std::string CpuSet::ToString() const {
  std::vector<int> ids;
  for (int c = 0; c < cpus_; ++c)
    if (Has(c)) ids.push_back(c);
  return CompactList(ids);
}

bool CpuSet::ApplyToThisThread() const {
  return pthread_setaffinity_np(pthread_self(), bytes_, set_.get()) == 0;
}

absl::Status CheckCpuRange(int first, int count) {
  const int64_t last = int64_t{first} + count - 1;
  const std::vector<int> online = OnlineCpus();
  auto fields = [&] {
    return absl::StrCat("config.worker_cpu_first = ", first, ", config.worker_cpu_count = ", count,
                        " (CPUs ", first, "-", last, ")");
  };
  // NOTE: checked against the ids first, so that a huge count is refused without a huge loop.
  if (last >= MachineCpus() || last > online.back()) {
    return absl::InvalidArgumentError(
        absl::StrCat(fields(), ": past the machine's CPUs; online CPUs: ", CompactList(online)));
  }
  std::vector<int> missing;
  for (int c = first; c <= last; ++c)
    if (!std::binary_search(online.begin(), online.end(), c)) missing.push_back(c);
  if (!missing.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(fields(), ": CPU(s) ", CompactList(missing),
                     " are not online; online CPUs: ", CompactList(online)));
  }
  // NOTE: online is not enough: a cgroup cpuset (a container's --cpuset-cpus) may leave some of
  // them out, and a worker's pthread_setaffinity_np would then fail (or narrow the set) with no
  // one to tell. A thread of our own tries the range here, where an error can still be returned.
  const CpuSet want = CpuSet::Range(first, count);
  bool applied = false;
  std::string got;
  std::thread probe([&] {
    applied = want.ApplyToThisThread();
    got = CpuSet::OfThisThread().ToString();
  });
  probe.join();
  if (!applied || got != want.ToString()) {
    return absl::InvalidArgumentError(absl::StrCat(
        fields(), ": online, but this process may not run on ", applied ? "all of them" : "them",
        " (a cgroup cpuset?); a thread pinned to the range got CPUs ", applied ? got : "none"));
  }
  return absl::OkStatus();
}

ArenaCpuBinding::ArenaCpuBinding(tbb::task_arena& arena, int first, int count)
    : tbb::task_scheduler_observer(arena), range_(CpuSet::Range(first, count)) {
  arena.initialize();
  observe(true);
}

ArenaCpuBinding::~ArenaCpuBinding() {
  // NOTE: oneTBB sends no exit notification to the threads still in the arena when observation
  // stops, and a worker that never got one would stay pinned while it serves other arenas. The
  // arena is idle by now (the runtime's work is done), so its workers leave within a moment:
  // wait for them, but bounded, since leaving is oneTBB's decision.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  while (pinned_.load() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  observe(false);
}

void ArenaCpuBinding::on_scheduler_entry(bool is_worker) {
  // The caller's own thread (is_worker false) is not ours to move.
  if (!is_worker) return;
  t_saved.push_back({this, CpuSet::OfThisThread()});
  pinned_.fetch_add(1);
  // NOTE: a refusal (a CPU taken offline since CheckCpuRange) leaves the worker where it was:
  // slower, never wrong, and a library has no one to tell from a worker thread.
  (void)range_.ApplyToThisThread();
}

void ArenaCpuBinding::on_scheduler_exit(bool is_worker) {
  if (!is_worker || t_saved.empty() || t_saved.back().binding != this) return;
  (void)t_saved.back().mask.ApplyToThisThread();
  t_saved.pop_back();
  pinned_.fetch_sub(1);
}

}  // namespace kvrt::runtime
