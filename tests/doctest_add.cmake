# Registers each doctest TEST_CASE of `target` as its own ctest test, labelled `label`, by asking the
# binary for its list at build time (one ctest entry per case: parallel runs and clear reports).
# A target that was not built shows up as one failing "<target>_NOT_BUILT" test instead of breaking ctest.
function(eaas_add_doctest target label)
  set(list_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_tests.cmake")
  set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/${target}_include.cmake")
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:${target}> -DOUT=${list_file} -DLABEL=${label}
            -DSUPP=${PROJECT_SOURCE_DIR}/tests/lsan.supp
            -P ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/doctest_list.cmake
    VERBATIM)
  file(WRITE "${wrapper}"
    "if(EXISTS \"${list_file}\")\n  include(\"${list_file}\")\nelse()\n"
    "  add_test(${target}_NOT_BUILT ${target}_NOT_BUILT)\nendif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${wrapper}")
endfunction()
