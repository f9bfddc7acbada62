// kvrt: replays recorded attention traces through libkvrt and reports recall, output error,
// latency and memory against exact attention; generates synthetic traces; benchmarks.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>

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
  // The commands run inside parse (CLI11 callbacks). They report their errors by status; what
  // escapes as an exception (an allocation no command foresaw) still ends with a message and
  // exit code 1 instead of an abort that loses the buffered output.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's own codes (105 for a value a check refused, 106 for a missing option, ...) become
    // the usage code every command returns for bad options: 0 help/version, 2 usage.
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    std::fprintf(stderr, "kvrt: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "kvrt: internal error: %s\n", e.what());
    return 1;
  }
  return exit_code;
}
