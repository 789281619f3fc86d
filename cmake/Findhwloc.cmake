# Findhwloc.cmake — locate the Portable Hardware Locality library (hwloc).
#
# Uses pkg-config when available and falls back to find_path/find_library.
#
# Result variables:
#   hwloc_FOUND         TRUE when headers and library were found
#   hwloc_VERSION       version string (from pkg-config or HWLOC_API_VERSION in hwloc.h)
#   hwloc_INCLUDE_DIRS  include directories
#   hwloc_LIBRARIES     libraries to link
#
# Imported target:
#   hwloc::hwloc
#
# Hints: hwloc_ROOT (CMake >= 3.12 honours <Pkg>_ROOT) or CMAKE_PREFIX_PATH.

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_hwloc QUIET hwloc)
endif()

find_path(hwloc_INCLUDE_DIR
  NAMES hwloc.h
  HINTS ${PC_hwloc_INCLUDEDIR} ${PC_hwloc_INCLUDE_DIRS})
find_library(hwloc_LIBRARY
  NAMES hwloc libhwloc
  HINTS ${PC_hwloc_LIBDIR} ${PC_hwloc_LIBRARY_DIRS})
mark_as_advanced(hwloc_INCLUDE_DIR hwloc_LIBRARY)

# Prefer pkg-config's version, but only if it describes the header we found.
if(PC_hwloc_FOUND AND PC_hwloc_VERSION)
  set(hwloc_VERSION "${PC_hwloc_VERSION}")
elseif(hwloc_INCLUDE_DIR AND EXISTS "${hwloc_INCLUDE_DIR}/hwloc.h")
  # HWLOC_API_VERSION is 0xMMmmpp00 (major, minor, patch of the API, not the release).
  file(STRINGS "${hwloc_INCLUDE_DIR}/hwloc.h" _hwloc_api_line REGEX "^#define[ \t]+HWLOC_API_VERSION[ \t]+0x")
  if(_hwloc_api_line MATCHES "0x([0-9a-fA-F][0-9a-fA-F])([0-9a-fA-F][0-9a-fA-F])([0-9a-fA-F][0-9a-fA-F])")
    math(EXPR _hwloc_major "0x${CMAKE_MATCH_1}")
    math(EXPR _hwloc_minor "0x${CMAKE_MATCH_2}")
    math(EXPR _hwloc_patch "0x${CMAKE_MATCH_3}")
    set(hwloc_VERSION "${_hwloc_major}.${_hwloc_minor}.${_hwloc_patch}")
  endif()
  unset(_hwloc_api_line)
  unset(_hwloc_major)
  unset(_hwloc_minor)
  unset(_hwloc_patch)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(hwloc
  REQUIRED_VARS hwloc_LIBRARY hwloc_INCLUDE_DIR
  VERSION_VAR hwloc_VERSION)

if(hwloc_FOUND)
  set(hwloc_INCLUDE_DIRS "${hwloc_INCLUDE_DIR}")
  set(hwloc_LIBRARIES "${hwloc_LIBRARY}")
  if(NOT TARGET hwloc::hwloc)
    add_library(hwloc::hwloc UNKNOWN IMPORTED)
    set_target_properties(hwloc::hwloc PROPERTIES
      IMPORTED_LOCATION "${hwloc_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${hwloc_INCLUDE_DIR}")
  endif()
endif()
