#pragma once

// The main() of every eaas test binary, included by exactly one file per binary (with
// DOCTEST_CONFIG_IMPLEMENT defined before doctest.h): runs doctest, exits 77 (ctest: skipped) with a
// message when the binary's prerequisite is missing, and fails when the filters matched no test case
// (a ctest entry that runs nothing must not pass).

#include <doctest/doctest.h>

#include <cstdio>

namespace eaas::test {

inline int g_cases_run = 0;

struct run_counter : doctest::IReporter {
  explicit run_counter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override { ++g_cases_run; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};

/// `missing`: null, or a function that returns a message when the prerequisite is absent.
inline int run_tests(int argc, char** argv, const char* (*missing)() = nullptr) {
  doctest::Context ctx(argc, argv);
  if (!ctx.shouldExit() && missing != nullptr) {
    if (const char* why = missing()) {
      std::printf("%s\n", why);
      return 77;
    }
  }
  const int rc = ctx.run();
  if (ctx.shouldExit()) return rc;  // --help, --list-test-cases, ...
  if (rc == 0 && g_cases_run == 0) {
    std::fprintf(stderr, "error: no test case matched the filters\n");
    return 1;
  }
  return rc;
}

}  // namespace eaas::test

DOCTEST_REGISTER_LISTENER("eaas_run_counter", 1, eaas::test::run_counter);
