// kvrt: replays recorded attention traces through libkvrt and reports recall, output error,
// latency and memory against exact attention; generates synthetic traces; benchmarks.
#include <algorithm>
#include <cstdio>

#include "CLI/CLI.hpp"
#include "kvrt.h"
#include "tools/command.h"

int main(int argc, char** argv) {
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
