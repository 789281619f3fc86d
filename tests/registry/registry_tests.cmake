# Registry tests: the conformance suite against the embedded server (and, in etcd_tests.cmake,
# against a real etcd), the embedded server's own cases, and the liveness peer process.
add_executable(eaas-registry-peer ${CMAKE_CURRENT_LIST_DIR}/peer.cpp)
target_link_libraries(eaas-registry-peer PRIVATE eaas::eaas)

add_executable(eaas-registry-tests
  ${CMAKE_CURRENT_LIST_DIR}/test_registry.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_directory.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_embedded.cpp
  ${CMAKE_CURRENT_LIST_DIR}/backend_embedded.cpp)
target_include_directories(eaas-registry-tests PRIVATE ${PROJECT_SOURCE_DIR}/lib)
target_link_libraries(eaas-registry-tests PRIVATE eaas_test_main)
target_compile_definitions(eaas-registry-tests PRIVATE EAAS_REGISTRY_PEER="$<TARGET_FILE:eaas-registry-peer>")
add_dependencies(eaas-registry-tests eaas-registry-peer)
foreach(t IN ITEMS eaas-registry-peer eaas-registry-tests)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(${t})
  endif()
endforeach()
eaas_add_doctest(eaas-registry-tests registry)

if(TARGET eaas-registry)
  add_test(NAME "registry: eaas-registry command line" COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cli_test.sh
                                                               $<TARGET_FILE:eaas-registry>)
  set_tests_properties("registry: eaas-registry command line" PROPERTIES LABELS registry TIMEOUT 60 RUN_SERIAL TRUE)
endif()
