# run-consumer.cmake — configure, build and run one outside consumer project (cmake -P).
#
#   cmake -DCONSUMER_SOURCE_DIR=... -DCONSUMER_BINARY_DIR=... -DCONSUMER_ARGS_FILE=... [-DCONSUMER_CONFIG=Release]
#         -P run-consumer.cmake
#
# CONSUMER_ARGS_FILE sets CONSUMER_ARGS, the extra configure arguments. Any nonzero step fails the script.

cmake_minimum_required(VERSION 3.25)

foreach(_v IN ITEMS CONSUMER_SOURCE_DIR CONSUMER_BINARY_DIR CONSUMER_ARGS_FILE)
  if(NOT ${_v})
    message(FATAL_ERROR "run-consumer.cmake: ${_v} is not set")
  endif()
endforeach()
include("${CONSUMER_ARGS_FILE}")

set(_config_args "")
set(_build_config "")
if(CONSUMER_CONFIG)
  set(_config_args "-DCMAKE_BUILD_TYPE=${CONSUMER_CONFIG}")
  set(_build_config --config "${CONSUMER_CONFIG}")
endif()

function(_run what)
  string(REPLACE ";" " " _pretty "${ARGN}")
  message(STATUS "[${what}] ${_pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc STREQUAL "0")
    message(FATAL_ERROR "[${what}] failed: ${_rc}")
  endif()
endfunction()

# --fresh: a consumer is configured from scratch every time, like a user's first try; objects are reused.
_run(configure "${CMAKE_COMMAND}" --fresh -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BINARY_DIR}"
  ${CONSUMER_ARGS} ${_config_args})

include(ProcessorCount)
ProcessorCount(_jobs)
if(_jobs EQUAL 0)
  set(_jobs 2)
endif()
_run(build "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY_DIR}" ${_build_config} --parallel ${_jobs})

# The consumer projects name their program eaas-consumer; multi-config generators put it under <config>/.
set(_exe "${CONSUMER_BINARY_DIR}/eaas-consumer")
if(NOT EXISTS "${_exe}" AND CONSUMER_CONFIG)
  set(_exe "${CONSUMER_BINARY_DIR}/${CONSUMER_CONFIG}/eaas-consumer")
endif()
if(NOT EXISTS "${_exe}")
  message(FATAL_ERROR "[run] consumer program not found under ${CONSUMER_BINARY_DIR}")
endif()
message(STATUS "[run] ${_exe}")
execute_process(COMMAND "${_exe}" RESULT_VARIABLE _rc TIMEOUT 120)
if(NOT _rc STREQUAL "0")
  message(FATAL_ERROR "[run] ${_exe} failed: ${_rc}")
endif()
