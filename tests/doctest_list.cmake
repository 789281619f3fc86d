# cmake -P helper: EXE = doctest binary, OUT = file to write add_test() lines to, LABEL = ctest label.
execute_process(COMMAND ${EXE} --list-test-cases --no-version
                OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${EXE} --list-test-cases failed: ${rc}")
endif()
# A ';' would split the CMake list: let doctest's '?' wildcard stand for it.
string(REPLACE ";" "?" out "${out}")
string(REPLACE "\n" ";" lines "${out}")
# Multi-process tests spin processes on every core: run them one at a time.
set(EXTRA "")
if(LABEL STREQUAL "mp" OR LABEL STREQUAL "registry" OR LABEL STREQUAL "runtime")
  set(EXTRA "RUN_SERIAL TRUE")
elseif(LABEL STREQUAL "ibgda")
  # Under AddressSanitizer: hwloc's PCI discovery leaks inside a dlopen()ed plugin (tests/lsan.supp says
  # why); the slow unwinder lets the suppression see hwloc_topology_load. Ignored by other builds.
  set(EXTRA "ENVIRONMENT [=[LSAN_OPTIONS=suppressions=${SUPP}:fast_unwind_on_malloc=0]=]")
elseif(LABEL STREQUAL "gpu")
  set(EXTRA "SKIP_RETURN_CODE 77 RUN_SERIAL TRUE TIMEOUT 120")
elseif(LABEL STREQUAL "etcd")
  # Real etcd processes (exit 77 without an etcd binary); lease timings want the machine to themselves.
  set(EXTRA "SKIP_RETURN_CODE 77 RUN_SERIAL TRUE TIMEOUT 120")
endif()
set(content "")
foreach(line IN LISTS lines)
  string(STRIP "${line}" name)
  if(name STREQUAL "" OR name MATCHES "^\\[doctest\\]" OR name MATCHES "^=+$")
    continue()
  endif()
  # doctest filters split at ',': escape it (one backslash reaches doctest through the bracket argument).
  string(REPLACE "," "\\," filter "${name}")
  set(test_name "${LABEL}: ${name}")
  string(APPEND content
    "add_test([=[${test_name}]=] [=[${EXE}]=] [=[--test-case=${filter}]=] --no-version)\n"
    "set_tests_properties([=[${test_name}]=] PROPERTIES LABELS ${LABEL} TIMEOUT 300 ${EXTRA})\n")
endforeach()
file(WRITE ${OUT} "${content}")
