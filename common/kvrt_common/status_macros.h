#pragma once
// Debian's Abseil (20220623) ships no RETURN_IF_ERROR / ASSIGN_OR_RETURN; these are ours, once.
#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVRT_CONCAT_INNER_(a, b) a##b
#define KVRT_CONCAT_(a, b) KVRT_CONCAT_INNER_(a, b)

#define KVRT_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status kvrt_status_ = (expr);        \
    if (!kvrt_status_.ok()) return kvrt_status_; \
  } while (0)

#define KVRT_ASSIGN_OR_RETURN(lhs, expr) \
  KVRT_ASSIGN_OR_RETURN_IMPL_(KVRT_CONCAT_(kvrt_statusor_, __LINE__), lhs, expr)
#define KVRT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
