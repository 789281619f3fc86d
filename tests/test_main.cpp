#define DOCTEST_CONFIG_IMPLEMENT
#include "common/doctest_main.hpp"

int main(int argc, char** argv) { return eaas::test::run_tests(argc, argv); }
