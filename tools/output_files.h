#pragma once
// The CLI's output files: checked when the options are parsed, so that a typo in a path fails
// before hours of measurement instead of after them, never the file a command reads, and written
// whole or reported by option name.
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace kvrt::cli {

// A path a command can create or overwrite: not a directory, in an existing directory it may
// write to (an existing file: one it may write).
CLI::Validator OutputFile();

// An option and the path it names; empty paths are skipped by the checks below.
struct NamedPath {
  std::string option, path;
};

// Refuses an output that is one of the inputs or another output (the same file, whatever the
// spelling: device and inode), naming both options.
absl::Status CheckOutputsApart(const std::vector<NamedPath>& inputs,
                               const std::vector<NamedPath>& outputs);

// Writes `text` to `path` (when not empty); the error names the option and the file.
absl::Status WriteTextFile(const std::string& option, const std::string& path,
                           const std::string& text);

}  // namespace kvrt::cli
