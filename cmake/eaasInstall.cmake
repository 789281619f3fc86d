# eaasInstall.cmake — install rules, the CMake package (installed and build-tree), and its dependencies.
# Included from the top-level CMakeLists.txt after every exported target exists.

include_guard(GLOBAL)
include(CMakePackageConfigHelpers)

set(EAAS_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/eaas" CACHE STRING
  "Install directory of eaasConfig.cmake, relative to the prefix")
mark_as_advanced(EAAS_INSTALL_CMAKEDIR)

set(_eaas_exported_targets eaas_device eaas_host eaas)
if(TARGET eaas_runtime)
  list(APPEND _eaas_exported_targets eaas_runtime)
endif()

# --- which find_dependency() calls the package config needs --------------------------------------------------------
# A shared eaas_host hides its private dependencies; a static one exposes them as $<LINK_ONLY:...>, so the consumer
# must find them too. Scanning the exported link interfaces keeps this right whatever lib/ links and how.
set(_eaas_link_interface "")
foreach(_t IN LISTS _eaas_exported_targets)
  get_target_property(_l ${_t} INTERFACE_LINK_LIBRARIES)
  if(_l)
    string(APPEND _eaas_link_interface ";${_l}")
  endif()
endforeach()

set(EAAS_CONFIG_FIND_DEPENDENCIES "find_dependency(Threads)\n")
foreach(_dep IN ITEMS
    "fmt::|fmt"
    "hwloc::|hwloc"
    "mlx5dv::|eaas_rdma|mlx5dv"
    "CUDA::|CUDAToolkit"
    "nlohmann_json::|nlohmann_json"
    "CURL::|CURL")
  string(REPLACE "|" ";" _dep "${_dep}")
  list(POP_BACK _dep _package)
  foreach(_pattern IN LISTS _dep)
    string(FIND "${_eaas_link_interface}" "${_pattern}" _pos)
    if(_pos GREATER_EQUAL 0)
      string(APPEND EAAS_CONFIG_FIND_DEPENDENCIES "find_dependency(${_package})\n")
      break()
    endif()
  endforeach()
endforeach()

get_target_property(_eaas_host_type eaas_host TYPE)
if(_eaas_host_type STREQUAL "SHARED_LIBRARY")
  set(EAAS_CONFIG_SHARED 1)
else()
  set(EAAS_CONFIG_SHARED 0)
endif()

# --- files -----------------------------------------------------------------------------------------------------------
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/eaas"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
  FILES_MATCHING PATTERN "*.hpp" PATTERN "*.cuh" PATTERN "*.h")
install(FILES "${PROJECT_BINARY_DIR}/include/eaas/config.hpp"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/eaas")

install(TARGETS ${_eaas_exported_targets}
  EXPORT eaasTargets
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}"
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

install(EXPORT eaasTargets
  NAMESPACE eaas::
  DESTINATION "${EAAS_INSTALL_CMAKEDIR}")

# --- package config: one file, valid both installed and in the build tree (it only uses CMAKE_CURRENT_LIST_DIR) ----
configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/eaasConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/eaasConfig.cmake"
  INSTALL_DESTINATION "${EAAS_INSTALL_CMAKEDIR}")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/eaasConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMajorVersion)

# Find modules (and the CUDA C++20 shim) the config may need, next to it in both places.
set(_eaas_find_modules
  "${PROJECT_SOURCE_DIR}/cmake/Findhwloc.cmake"
  "${PROJECT_SOURCE_DIR}/cmake/Findmlx5dv.cmake"
  "${PROJECT_SOURCE_DIR}/cmake/eaasCudaStd.cmake")
foreach(_m IN LISTS _eaas_find_modules)
  configure_file("${_m}" "${PROJECT_BINARY_DIR}" COPYONLY)
endforeach()

install(FILES
  "${PROJECT_BINARY_DIR}/eaasConfig.cmake"
  "${PROJECT_BINARY_DIR}/eaasConfigVersion.cmake"
  ${_eaas_find_modules}
  DESTINATION "${EAAS_INSTALL_CMAKEDIR}")

# Build-tree package: find_package(eaas) with eaas_DIR=<build dir> uses the libraries in place.
export(EXPORT eaasTargets
  NAMESPACE eaas::
  FILE "${PROJECT_BINARY_DIR}/eaasTargets.cmake")

install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" "${PROJECT_SOURCE_DIR}/README.md"
  DESTINATION "${CMAKE_INSTALL_DOCDIR}"
  OPTIONAL)
