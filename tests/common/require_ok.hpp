#pragma once

// REQUIRE_OK(expr): the status must be ok; on failure doctest prints the status name and the
// library's last_error() sentence.

#include <doctest/doctest.h>

#include <string>

#include "eaas/common/status.hpp"
#include "eaas/host/error.hpp"

#define REQUIRE_OK(expr)                                                                 \
  do {                                                                                   \
    const ::eaas::status s_ = (expr);                                                    \
    INFO("status: ", ::eaas::status_name(s_), " - ", std::string(::eaas::last_error())); \
    REQUIRE(s_ == ::eaas::status::ok);                                                   \
  } while (0)
