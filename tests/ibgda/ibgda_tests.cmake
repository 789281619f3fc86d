# IBGDA device-side code, verified without a NIC: the WQE/CQE encoders against rdma-core's mlx5dv.h
# (only where rdma-core's headers were found), and the production posting / polling code driven from
# host threads against the software NIC model (always). With CUDA, the same code must also compile in
# a __global__ kernel (an object library that is built, never linked or launched here), and it runs
# from kernels against the model in eaas-ibgda-gpu-tests (label `gpu`, skipped without a device).
# The host side (lib/transport/ibgda) is tested through its private headers, against fakes of
# rdma-core and CUDA (fake_verbs.hpp).
add_executable(eaas-ibgda-tests
  ${CMAKE_CURRENT_LIST_DIR}/soft_nic.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_soft_nic.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_endpoint_ops.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_context.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_host.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_wire.cpp)
if(EAAS_HAVE_IBGDA)
  # mlx5dv.h's helpers are static inline: the header is enough, no libmlx5 / libibverbs to link.
  target_sources(eaas-ibgda-tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/test_wqe.cpp ${CMAKE_CURRENT_LIST_DIR}/test_prm.cpp)
  target_include_directories(eaas-ibgda-tests PRIVATE ${mlx5dv_INCLUDE_DIRS})
endif()
target_include_directories(eaas-ibgda-tests PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/lib
                                                   ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(eaas-ibgda-tests PRIVATE eaas_test_main fmt::fmt Threads::Threads)
if(COMMAND eaas_target_defaults)
  eaas_target_defaults(eaas-ibgda-tests)
endif()
eaas_add_doctest(eaas-ibgda-tests ibgda)

if(EAAS_HAVE_CUDA)
  add_library(eaas-ibgda-cuda-compile OBJECT ${CMAKE_CURRENT_LIST_DIR}/compile_check.cu)
  target_link_libraries(eaas-ibgda-cuda-compile PRIVATE eaas::device)

  # The same posting / polling code run from GPU kernels against the model, whose QPs and data live in
  # host memory mapped into the GPU (ctest label `gpu`; without a device the binary exits 77: skipped).
  add_executable(eaas-ibgda-gpu-tests
    ${CMAKE_CURRENT_LIST_DIR}/test_soft_nic_gpu.cpp
    ${CMAKE_CURRENT_LIST_DIR}/soft_nic_gpu_kernels.cu
    ${CMAKE_CURRENT_LIST_DIR}/soft_nic.cpp)
  target_include_directories(eaas-ibgda-gpu-tests PRIVATE ${PROJECT_SOURCE_DIR}/include ${CMAKE_CURRENT_LIST_DIR})
  target_link_libraries(eaas-ibgda-gpu-tests PRIVATE eaas::eaas doctest::doctest CUDA::cudart Threads::Threads)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-ibgda-gpu-tests)
  endif()
  eaas_add_doctest(eaas-ibgda-gpu-tests gpu)
endif()
