# Registers each doctest TEST_CASE of `target` as its own ctest test, labelled `label`, by asking the
# binary for its list at build time (one ctest entry per case: parallel runs and clear reports).
function(eaas_add_doctest target label)
  set(list_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_tests.cmake")
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:${target}> -DOUT=${list_file} -DLABEL=${label}
            -P ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/doctest_list.cmake
    VERBATIM)
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${list_file})
endfunction()
