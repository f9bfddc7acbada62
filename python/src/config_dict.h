// kvrt_config and kvrt_stats as Python dicts keyed by the C field names. Enum fields travel by
// name: dtype "f32" | "f16" | "bf16", index_kind as kvrt_index_kind_name/parse spell it,
// cold_attention "cpu" | "fetch" | "auto".
#pragma once

#include <kvrt.h>
#include <nanobind/nanobind.h>

namespace kvrt_py {

namespace nb = nanobind;

// kvrt_config_default() with the fields of `fields` set; raises kvrt.InvalidArgumentError for an
// unknown field, a value out of the field's C type or an unknown enum name (the index kind's
// message is kvrt_index_kind_parse's). Range checks are the library's (kvrt_runtime_create).
kvrt_config ConfigFromDict(const nb::dict& fields);
nb::dict ConfigToDict(const kvrt_config& config);
nb::dict StatsToDict(const kvrt_stats& stats);

}  // namespace kvrt_py
