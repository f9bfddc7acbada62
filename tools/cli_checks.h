#pragma once
// Option checks for the CLI's numbers. CLI11's Range lets NaN through (every comparison with it is
// false) and its PositiveNumber / NonNegativeNumber print the type's limits (1.797e308) as the
// bound; these refuse NaN and name the bound the option means.
#include <cstdint>

#include "CLI/CLI.hpp"

namespace kvrt::cli {

// A finite number in [min, max]; in (min, max] with min_excluded (where min means "unset").
CLI::Validator NumberIn(double min, double max, bool min_excluded = false);
// An integer >= min.
CLI::Validator AtLeast(int64_t min);
// An integer in [min, max]. (CLI11's Range calls "abc" or "1e3" out of range.)
CLI::Validator IntIn(int64_t min, int64_t max);
// An unsigned 64-bit integer: CLI11 takes "-1" for a uint64_t as 2^64 - 1.
CLI::Validator Unsigned();

}  // namespace kvrt::cli
