#pragma once
// The CPU affinity of this process's threads as the kernel reports it (/proc/self/task), for
// tests of config.worker_cpu_first / worker_cpu_count that look from outside the library.
#include <dirent.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

// The calling thread's kernel id.
inline long ThisTid() { return static_cast<long>(syscall(SYS_gettid)); }

// The ids of the process's threads now.
inline std::vector<long> ProcessTids() {
  std::vector<long> tids;
  if (DIR* d = opendir("/proc/self/task")) {
    while (const dirent* e = readdir(d))
      if (e->d_name[0] != '.') tids.push_back(std::stol(e->d_name));
    closedir(d);
  }
  return tids;
}

// A thread's CPUs as the kernel lists them ("0", "0-1", "0-3,8"); "" once the thread is gone.
inline std::string CpusAllowed(long tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/status");
  std::string line;
  const std::string key = "Cpus_allowed_list:";
  while (std::getline(f, line))
    if (line.compare(0, key.size(), key) == 0) {
      const auto at = line.find_first_not_of(" \t", key.size());
      return at == std::string::npos ? "" : line.substr(at);
    }
  return "";
}
