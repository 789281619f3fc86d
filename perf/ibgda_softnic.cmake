# The ibgda posting path measured on a GPU against the software NIC (tests/ibgda/soft_nic):
# `eaas::perf::run_ibgda_softnic()` (perf/ibgda_softnic.hpp), the body of
# `eaas-pingpong --transport ibgda --soft-nic`. Included from perf/CMakeLists.txt once
# eaas_perf_driver exists; CUDA builds only. The soft NIC is test code: it is compiled into this
# library, never into eaas_host.
if(EAAS_HAVE_CUDA AND NOT TARGET eaas_perf_ibgda_softnic)
  add_library(eaas_perf_ibgda_softnic STATIC
    ${CMAKE_CURRENT_LIST_DIR}/ibgda_softnic.cu
    ${PROJECT_SOURCE_DIR}/tests/ibgda/soft_nic.cpp)
  target_include_directories(eaas_perf_ibgda_softnic
    PUBLIC ${CMAKE_CURRENT_LIST_DIR}
    PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/tests/ibgda)
  target_link_libraries(eaas_perf_ibgda_softnic PUBLIC eaas_perf_driver CUDA::cudart PRIVATE Threads::Threads)
  # As eaas-alltoall: one shared CUDA runtime for the whole executable.
  set_target_properties(eaas_perf_ibgda_softnic PROPERTIES CUDA_RUNTIME_LIBRARY Shared POSITION_INDEPENDENT_CODE ON)
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas_perf_ibgda_softnic)
  endif()
endif()
