#include "fault_injection.h"

#include <new>
#include <stdexcept>
#include <string>

#include "absl/strings/str_cat.h"

namespace kvrt::runtime::fault {
namespace detail {

std::atomic<int> armed[kNumSites] = {};
namespace {
std::atomic<int> mode[kNumSites] = {};
}  // namespace

absl::Status Consume(Site site, const char* kind, const char* operation) {
  auto& n = armed[static_cast<int>(site)];
  // NOTE: a compare-exchange loop, not fetch_sub: concurrent hits (index updates of several kv
  // heads run in parallel) must consume exactly the armed number, never drive it below zero.
  int left = n.load(std::memory_order_relaxed);
  while (left > 0 && !n.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
  }
  if (left <= 0) return absl::OkStatus();  // another thread took the last one
  const std::string msg = absl::StrCat(kind, " ", operation, ": injected fault (test hook)");
  switch (static_cast<Mode>(mode[static_cast<int>(site)].load(std::memory_order_relaxed))) {
    case Mode::kThrow: throw std::runtime_error(msg);
    case Mode::kBadAlloc: throw std::bad_alloc();
    case Mode::kStatus: break;
  }
  return absl::InternalError(msg);
}

}  // namespace detail

void FailNext(Site site, int n, Mode mode) {
  detail::mode[static_cast<int>(site)].store(static_cast<int>(mode), std::memory_order_relaxed);
  detail::armed[static_cast<int>(site)].store(n > 0 ? n : 0, std::memory_order_relaxed);
}

int Pending(Site site) {
  return detail::armed[static_cast<int>(site)].load(std::memory_order_relaxed);
}

}  // namespace kvrt::runtime::fault
