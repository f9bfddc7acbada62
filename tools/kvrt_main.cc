// kvrt: replays recorded attention traces through libkvrt and reports recall, output error,
// latency and memory against exact attention; generates synthetic traces; benchmarks.
#include <algorithm>
#include <cstdio>

#include "CLI/CLI.hpp"
#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "kvrt.h"
#include "tools/command.h"

#if defined(__SANITIZE_ADDRESS__)
#define KVRT_CLI_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define KVRT_CLI_SANITIZED 1
#endif
#endif

int main(int argc, char** argv) {
#ifndef KVRT_CLI_SANITIZED
  // A crash prints the signal and a symbolized stack to stderr (a report to act on, where a bare
  // "Segmentation fault" loses even the buffered output); the sanitizers keep their own handlers.
  absl::InitializeSymbolizer(argv[0]);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions());
#endif
  CLI::App app{"kvrt: long-context KV runtime - trace replay, generation and benchmarks"};
  app.set_version_flag("--version", std::string("kvrt ") + kvrt_version());
  app.require_subcommand(1);
  int exit_code = 0;
  auto& commands = kvrt::cli::CommandRegistry::All();
  std::sort(commands.begin(), commands.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [name, setup] : commands) setup(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
