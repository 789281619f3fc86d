# eaas-nvshmem-pingpong: the NVSHMEM put-with-signal ping-pong baseline of issues #3 and #6, built only where
# NVSHMEM is found (include/nvshmem.h, lib/libnvshmem_host.so*, lib/libnvshmem_device.a). Included from
# perf/CMakeLists.txt inside if(EAAS_HAVE_CUDA), after eaas_perf_driver.
#
# Where: NVSHMEM_ROOT (cache) when set, and only there; else $ENV{NVSHMEM_HOME}, the pip wheel of the torch venv
# (nvidia-nvshmem-cu*), /usr/local/nvshmem, /opt/nvidia/nvshmem. The pip wheel ships libnvshmem_host.so.3 without
# an unversioned link; that name is accepted.
#
# NVSHMEM's device library keeps global device state, so it needs relocatable device code and a device link:
# that is set on this executable only, never on the eaas libraries (see STYLE.md, "Types").

set(NVSHMEM_ROOT "" CACHE PATH "NVSHMEM installation for eaas-nvshmem-pingpong (include/, lib/)")

set(_eaas_nvshmem_candidates)
if(NVSHMEM_ROOT)
  list(APPEND _eaas_nvshmem_candidates "${NVSHMEM_ROOT}")
else()
  if(DEFINED ENV{NVSHMEM_HOME})
    list(APPEND _eaas_nvshmem_candidates "$ENV{NVSHMEM_HOME}")
  endif()
  file(GLOB _eaas_nvshmem_venv LIST_DIRECTORIES true "/opt/torch/.venv/lib/python3*/site-packages/nvidia/nvshmem")
  list(APPEND _eaas_nvshmem_candidates ${_eaas_nvshmem_venv} /usr/local/nvshmem /opt/nvidia/nvshmem)
endif()

set(_eaas_nvshmem_dir "")
set(_eaas_nvshmem_why "")
foreach(_dir IN LISTS _eaas_nvshmem_candidates)
  if(NOT EXISTS "${_dir}/include/nvshmem.h")
    list(APPEND _eaas_nvshmem_why "${_dir}: no include/nvshmem.h")
    continue()
  endif()
  if(NOT EXISTS "${_dir}/lib/libnvshmem_device.a")
    list(APPEND _eaas_nvshmem_why "${_dir}: no lib/libnvshmem_device.a")
    continue()
  endif()
  # The shortest of libnvshmem_host.so, libnvshmem_host.so.3, libnvshmem_host.so.3.4.5.
  file(GLOB _hosts "${_dir}/lib/libnvshmem_host.so*")
  list(FILTER _hosts INCLUDE REGEX "/libnvshmem_host\\.so(\\.[0-9]+)*$")
  set(_host "")
  foreach(_h IN LISTS _hosts)
    string(LENGTH "${_h}" _len)
    if(NOT _host OR _len LESS _host_len)
      set(_host "${_h}")
      set(_host_len ${_len})
    endif()
  endforeach()
  if(NOT _host)
    list(APPEND _eaas_nvshmem_why "${_dir}: no lib/libnvshmem_host.so*")
    continue()
  endif()
  set(_eaas_nvshmem_dir "${_dir}")
  set(_eaas_nvshmem_host "${_host}")
  break()
endforeach()

if(_eaas_nvshmem_dir)
  set(_eaas_nvshmem_version "unknown version")
  foreach(_vh IN ITEMS non_abi/nvshmem_version.h nvshmem_version.h)
    if(EXISTS "${_eaas_nvshmem_dir}/include/${_vh}")
      file(STRINGS "${_eaas_nvshmem_dir}/include/${_vh}" _vlines REGEX "#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION")
      set(_v "")
      foreach(_part IN ITEMS MAJOR MINOR PATCH)
        string(REGEX MATCH "NVSHMEM_VENDOR_${_part}_VERSION[ \t]+([0-9]+)" _m "${_vlines}")
        list(APPEND _v "${CMAKE_MATCH_1}")
      endforeach()
      list(JOIN _v "." _eaas_nvshmem_version)
      break()
    endif()
  endforeach()

  # An imported shared library, not a bare path: the host link keeps the full path (a path to a file without a
  # SONAME would become -lnvshmem_host, which needs the unversioned link the wheel lacks), and the device link
  # leaves it out (nvcc -dlink need not understand a .so.3).
  if(NOT TARGET eaas_nvshmem_host)
    add_library(eaas_nvshmem_host SHARED IMPORTED)
    set_target_properties(eaas_nvshmem_host PROPERTIES IMPORTED_LOCATION "${_eaas_nvshmem_host}")
  endif()

  add_executable(eaas-nvshmem-pingpong ${CMAKE_CURRENT_LIST_DIR}/nvshmem_pingpong.cu)
  target_include_directories(eaas-nvshmem-pingpong SYSTEM PRIVATE "${_eaas_nvshmem_dir}/include")
  # Where the UID bootstrap plugin (nvshmem_bootstrap_uid.so.3) is, should the library's own location not be
  # found at run time.
  target_compile_definitions(eaas-nvshmem-pingpong PRIVATE EAAS_NVSHMEM_LIB_DIR="${_eaas_nvshmem_dir}/lib")
  target_link_libraries(eaas-nvshmem-pingpong PRIVATE eaas_perf_driver CLI11::CLI11
                        "${_eaas_nvshmem_dir}/lib/libnvshmem_device.a" eaas_nvshmem_host CUDA::cudart
                        CUDA::cuda_driver)
  set_target_properties(eaas-nvshmem-pingpong PROPERTIES
    CUDA_SEPARABLE_COMPILATION ON
    CUDA_RESOLVE_DEVICE_SYMBOLS ON
    CUDA_RUNTIME_LIBRARY Shared
    BUILD_RPATH "${_eaas_nvshmem_dir}/lib")
  if(COMMAND eaas_target_defaults)
    eaas_target_defaults(eaas-nvshmem-pingpong)
  endif()
  if(EAAS_INSTALL)
    set_property(TARGET eaas-nvshmem-pingpong PROPERTY INSTALL_RPATH "${CMAKE_INSTALL_RPATH};${_eaas_nvshmem_dir}/lib")
    install(TARGETS eaas-nvshmem-pingpong RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
  message(STATUS "eaas: NVSHMEM baseline: yes (NVSHMEM ${_eaas_nvshmem_version}, ${_eaas_nvshmem_dir})")
else()
  if(NOT _eaas_nvshmem_candidates)
    set(_eaas_nvshmem_why "nowhere to look")
  endif()
  list(JOIN _eaas_nvshmem_why "; " _eaas_nvshmem_why)
  message(STATUS "eaas: NVSHMEM baseline: no (${_eaas_nvshmem_why}; set NVSHMEM_ROOT)")
endif()
