#pragma once
// Subcommands of the kvrt CLI register themselves here, so adding one is adding one file.
#include <functional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace kvrt::cli {

// Adds the subcommand to `app` and sets its callback. The callback returns the process exit code
// through `*exit_code` (0 ok, 1 failure, 2 usage).
using CommandSetup = std::function<void(CLI::App& app, int* exit_code)>;

struct CommandRegistry {
  static std::vector<std::pair<std::string, CommandSetup>>& All() {
    static std::vector<std::pair<std::string, CommandSetup>> all;
    return all;
  }
};

struct RegisterCommand {
  RegisterCommand(std::string name, CommandSetup setup) {
    CommandRegistry::All().emplace_back(std::move(name), std::move(setup));
  }
};

// Subcommand `name` of `app`, created on first use (for groups such as `kvrt bench ...`).
inline CLI::App* GetOrAddGroup(CLI::App& app, const std::string& name,
                               const std::string& description) {
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    if (sub->get_name() == name) return sub;
  CLI::App* group = app.add_subcommand(name, description);
  group->require_subcommand(1);
  return group;
}

}  // namespace kvrt::cli

#define KVRT_CLI_CONCAT_INNER_(a, b) a##b
#define KVRT_CLI_CONCAT_(a, b) KVRT_CLI_CONCAT_INNER_(a, b)
#define KVRT_REGISTER_COMMAND(name, fn) \
  static ::kvrt::cli::RegisterCommand KVRT_CLI_CONCAT_(kvrt_cmd_, __LINE__)(name, fn)
