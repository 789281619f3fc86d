# etcd backend tests, included from tests/CMakeLists.txt. Built when eaas has its etcd backend
# (libcurl found: lib/registry/etcd.cmake sets the global property EAAS_HAVE_ETCD).
#   eaas-etcd-wire-tests  the client against a fake etcd (a loopback HTTP thread): needs no etcd.
#   eaas-etcd-tests       the conformance suite (test_registry.cpp, test_directory.cpp) and etcd-specific
#                         cases against real etcd processes on loopback; exits 77 (ctest: skipped) when
#                         no etcd binary is installed (Debian: etcd-server).
get_property(_eaas_have_etcd GLOBAL PROPERTY EAAS_HAVE_ETCD)
if(NOT _eaas_have_etcd)
  message(STATUS "eaas: etcd tests: off (eaas is built without its etcd backend)")
  return()
endif()

add_executable(eaas-etcd-wire-tests ${CMAKE_CURRENT_LIST_DIR}/test_etcd_wire.cpp)
target_include_directories(eaas-etcd-wire-tests PRIVATE ${PROJECT_SOURCE_DIR}/lib)
target_link_libraries(eaas-etcd-wire-tests PRIVATE eaas_test_main fmt::fmt)

add_executable(eaas-etcd-tests
  ${CMAKE_CURRENT_LIST_DIR}/test_etcd_backend.cpp
  ${CMAKE_CURRENT_LIST_DIR}/etcd_process.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_registry.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_directory.cpp)
target_include_directories(eaas-etcd-tests PRIVATE ${PROJECT_SOURCE_DIR}/lib ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(eaas-etcd-tests PRIVATE eaas::eaas doctest::doctest fmt::fmt)
target_compile_definitions(eaas-etcd-tests PRIVATE EAAS_REGISTRY_PEER="$<TARGET_FILE:eaas-registry-peer>")
add_dependencies(eaas-etcd-tests eaas-registry-peer)

foreach(t IN ITEMS eaas-etcd-wire-tests eaas-etcd-tests)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(${t})
  endif()
endforeach()
eaas_add_doctest(eaas-etcd-wire-tests registry)
eaas_add_doctest(eaas-etcd-tests etcd)  # doctest_list.cmake: SKIP_RETURN_CODE 77, one at a time
