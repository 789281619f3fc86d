# eaasWarnings.cmake — per-target defaults shared by lib/, tests/ and perf/.
#
#   eaas_target_defaults(<target>)  warnings for the target's C++ sources (never its CUDA sources,
#                                   where nvcc would forward them to the host compiler for generated
#                                   code that we do not own).
#   eaas_set_warnings(<target>)     same thing; kept as the descriptive name.
#
# Project-wide settings (C++ standard, sanitizers) are set in the top-level CMakeLists.txt and apply
# to every target below it; these functions carry only what must be per target.

include_guard(GLOBAL)

function(eaas_set_warnings target)
  get_target_property(_type ${target} TYPE)
  if(_type STREQUAL "INTERFACE_LIBRARY")
    return()  # nothing is compiled; warnings must not leak into consumers
  endif()
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:-Wall;-Wextra>"
    "$<$<COMPILE_LANG_AND_ID:CXX,MSVC>:/W4>")
endfunction()

function(eaas_target_defaults target)
  eaas_set_warnings(${target})
endfunction()
