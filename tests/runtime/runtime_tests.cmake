# The MoE runtime's tests: math, reference, in-process and multi-process runs, a malicious client.
if(NOT TARGET eaas_moe)
  return()
endif()
add_executable(eaas-evil-client ${CMAKE_CURRENT_LIST_DIR}/evil_client.cpp)
target_link_libraries(eaas-evil-client PRIVATE eaas_moe)

add_executable(eaas-runtime-tests ${CMAKE_CURRENT_LIST_DIR}/test_runtime.cpp ${CMAKE_CURRENT_LIST_DIR}/test_faults.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_autoscale.cpp ${CMAKE_CURRENT_LIST_DIR}/test_liar.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_commit.cpp ${CMAKE_CURRENT_LIST_DIR}/test_wire.cpp)
target_link_libraries(eaas-runtime-tests PRIVATE eaas_test_main eaas_moe nlohmann_json::nlohmann_json)
target_compile_definitions(eaas-runtime-tests PRIVATE
  EAAS_SERVER_BIN="$<TARGET_FILE:eaas-server>" EAAS_CLIENT_BIN="$<TARGET_FILE:eaas-client>"
  EAAS_EVIL_BIN="$<TARGET_FILE:eaas-evil-client>" EAAS_DEMO_BIN="$<TARGET_FILE:eaas-demo>"
  EAAS_AUTOSCALE_BIN="$<TARGET_FILE:eaas-autoscale>")
add_dependencies(eaas-runtime-tests eaas-server eaas-client eaas-evil-client eaas-demo eaas-autoscale)
foreach(t IN ITEMS eaas-evil-client eaas-runtime-tests)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(${t})
  endif()
endforeach()
eaas_add_doctest(eaas-runtime-tests runtime)

# The runtime over a real etcd (label etcd: skipped with exit 77 where no etcd binary exists).
get_property(_eaas_have_etcd GLOBAL PROPERTY EAAS_HAVE_ETCD)
if(_eaas_have_etcd)
  add_executable(eaas-runtime-etcd-tests ${CMAKE_CURRENT_LIST_DIR}/test_runtime_etcd.cpp
                                         ${CMAKE_CURRENT_LIST_DIR}/../registry/etcd_process.cpp)
  target_include_directories(eaas-runtime-etcd-tests PRIVATE ${PROJECT_SOURCE_DIR}/lib
                                                             ${CMAKE_CURRENT_LIST_DIR}/../registry)
  target_link_libraries(eaas-runtime-etcd-tests PRIVATE eaas::runtime doctest::doctest fmt::fmt
                                                        nlohmann_json::nlohmann_json)
  target_compile_definitions(eaas-runtime-etcd-tests PRIVATE
    EAAS_SERVER_BIN="$<TARGET_FILE:eaas-server>" EAAS_CLIENT_BIN="$<TARGET_FILE:eaas-client>")
  add_dependencies(eaas-runtime-etcd-tests eaas-server eaas-client)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-runtime-etcd-tests)
  endif()
  eaas_add_doctest(eaas-runtime-etcd-tests etcd)
endif()

# The runtime on GPUs (label gpu: skipped with exit 77 where there is no CUDA device).
if(EAAS_HAVE_CUDA)
  add_executable(eaas-runtime-gpu-tests ${CMAKE_CURRENT_LIST_DIR}/test_runtime_gpu.cpp)
  target_link_libraries(eaas-runtime-gpu-tests PRIVATE eaas_moe doctest::doctest nlohmann_json::nlohmann_json)
  target_compile_definitions(eaas-runtime-gpu-tests PRIVATE
    EAAS_SERVER_BIN="$<TARGET_FILE:eaas-server>" EAAS_CLIENT_BIN="$<TARGET_FILE:eaas-client>"
    EAAS_DEMO_BIN="$<TARGET_FILE:eaas-demo>" EAAS_EVIL_BIN="$<TARGET_FILE:eaas-evil-client>")
  add_dependencies(eaas-runtime-gpu-tests eaas-server eaas-client eaas-demo eaas-evil-client)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-runtime-gpu-tests)
  endif()
  eaas_add_doctest(eaas-runtime-gpu-tests gpu)
endif()

# The GPU-resident client forward (issue #9) against GPU server processes: device path, CUDA graph, a
# server killed between forwards, overflow caught on the device (label gpu: exit 77 without a CUDA device).
if(TARGET eaas_client_gpu)
  add_executable(eaas-client-step-gpu-tests ${CMAKE_CURRENT_LIST_DIR}/test_client_step_gpu.cpp)
  target_link_libraries(eaas-client-step-gpu-tests PRIVATE eaas_client_gpu doctest::doctest
                                                           nlohmann_json::nlohmann_json CUDA::cudart)
  target_compile_definitions(eaas-client-step-gpu-tests PRIVATE
    EAAS_SERVER_BIN="$<TARGET_FILE:eaas-server>" EAAS_DEMO_BIN="$<TARGET_FILE:eaas-demo>")
  add_dependencies(eaas-client-step-gpu-tests eaas-server eaas-client eaas-demo)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-client-step-gpu-tests)
  endif()
  eaas_add_doctest(eaas-client-step-gpu-tests gpu)
endif()

# The expert server's GPU-resident poll round (eaas-server --device-step) against device-path and host-path
# clients, bit-exact against a host-path server, the malicious client, kills, clients linking and leaving
# (label gpu: exit 77 without a CUDA device).
if(TARGET eaas_client_gpu)
  add_executable(eaas-server-step-gpu-tests ${CMAKE_CURRENT_LIST_DIR}/test_server_step_gpu.cpp)
  target_link_libraries(eaas-server-step-gpu-tests PRIVATE eaas_client_gpu doctest::doctest
                                                           nlohmann_json::nlohmann_json)
  target_compile_definitions(eaas-server-step-gpu-tests PRIVATE
    EAAS_SERVER_BIN="$<TARGET_FILE:eaas-server>" EAAS_DEMO_BIN="$<TARGET_FILE:eaas-demo>"
    EAAS_EVIL_BIN="$<TARGET_FILE:eaas-evil-client>")
  add_dependencies(eaas-server-step-gpu-tests eaas-server eaas-client eaas-demo eaas-evil-client)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-server-step-gpu-tests)
  endif()
  eaas_add_doctest(eaas-server-step-gpu-tests gpu)
endif()

# The monolithic baseline on one GPU (issue #9): the dense part, the local MoE layer, graph replay and
# the shrinking ablation against the CPU reference (label gpu: skipped with exit 77 without a CUDA device).
if(TARGET eaas_monolithic)
  add_executable(eaas-monolithic-gpu-tests ${CMAKE_CURRENT_LIST_DIR}/test_monolithic_gpu.cpp)
  target_link_libraries(eaas-monolithic-gpu-tests PRIVATE eaas_monolithic doctest::doctest)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-monolithic-gpu-tests)
  endif()
  eaas_add_doctest(eaas-monolithic-gpu-tests gpu)
endif()
