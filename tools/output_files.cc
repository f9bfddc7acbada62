#include "tools/output_files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace kvrt::cli {
namespace {

bool SameInode(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return stat(a.c_str(), &sa) == 0 && stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

// However spelled: an existing file by device and inode; files still to be created (outputs) by
// their name in the same directory (`o` and `./o`, `dir/o` and `dir/../dir/o`).
bool SameFile(const std::string& a, const std::string& b) {
  if (a == b) return true;
  struct stat st;
  const bool a_exists = stat(a.c_str(), &st) == 0, b_exists = stat(b.c_str(), &st) == 0;
  if (a_exists || b_exists) return a_exists && b_exists && SameInode(a, b);
  const std::filesystem::path pa(a), pb(b);
  if (pa.filename() != pb.filename()) return false;
  const std::string da = pa.has_parent_path() ? pa.parent_path().string() : ".";
  const std::string db = pb.has_parent_path() ? pb.parent_path().string() : ".";
  return SameInode(da, db);
}

}  // namespace

CLI::Validator OutputFile() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        if (s.empty()) return "an empty path names no file";
        struct stat st;
        if (stat(s.c_str(), &st) == 0) {
          if (S_ISDIR(st.st_mode)) return absl::StrCat(s, " is a directory");
          if (access(s.c_str(), W_OK) != 0)
            return absl::StrCat("cannot write ", s, ": ", std::strerror(errno));
          return {};
        }
        if (errno != ENOENT) return absl::StrCat("cannot write ", s, ": ", std::strerror(errno));
        std::string dir = std::filesystem::path(s).parent_path().string();
        if (dir.empty()) dir = ".";
        if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
          return absl::StrCat("cannot write ", s, ": directory ", dir, " does not exist");
        if (access(dir.c_str(), W_OK | X_OK) != 0)
          return absl::StrCat("cannot create ", s, " in ", dir, ": ", std::strerror(errno));
        return {};
      },
      "FILE");
}

absl::Status CheckOutputsApart(const std::vector<NamedPath>& inputs,
                               const std::vector<NamedPath>& outputs) {
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const NamedPath& out = outputs[i];
    if (out.path.empty()) continue;
    for (const NamedPath& in : inputs)
      if (!in.path.empty() && SameFile(out.path, in.path))
        return absl::InvalidArgumentError(absl::StrCat(out.option, ": ", out.path, " is the ",
                                                       in.option,
                                                       " file: writing it would destroy "
                                                       "the input"));
    for (std::size_t j = 0; j < i; ++j)
      if (!outputs[j].path.empty() && SameFile(out.path, outputs[j].path))
        return absl::InvalidArgumentError(absl::StrCat(out.option, " and ", outputs[j].option,
                                                       " name the same file, ", out.path));
  }
  return absl::OkStatus();
}

absl::Status WriteTextFile(const std::string& option, const std::string& path,
                           const std::string& text) {
  if (path.empty()) return absl::OkStatus();
  std::ofstream f(path);
  if (!f)
    return absl::InternalError(
        absl::StrCat(option, ": cannot open ", path, " for writing: ", std::strerror(errno)));
  f << text;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat(option, ": writing ", path, " failed"));
  return absl::OkStatus();
}

}  // namespace kvrt::cli
