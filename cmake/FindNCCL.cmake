# FindNCCL.cmake — locate NCCL (nccl.h + libnccl) for the NCCL baseline of the perf tools.
#
# Searched, in order: NCCL_ROOT (CMake variable or environment), the CUDA toolkit (when
# find_package(CUDAToolkit) ran first), the system paths, and the PyTorch virtual environment's wheel
# (/opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/{include,lib}, where the GPU machines have
# it; that lib folder may hold only libnccl.so.2, so the versioned name is searched as well).
#
# Result variables:
#   NCCL_FOUND         TRUE when the header and the library were found
#   NCCL_VERSION       MAJOR.MINOR.PATCH from nccl.h
#   NCCL_INCLUDE_DIRS  include directories
#   NCCL_LIBRARIES     the library to link
#
# Imported target:
#   NCCL::NCCL

set(_nccl_hints)
foreach(_root IN ITEMS "${NCCL_ROOT}" "$ENV{NCCL_ROOT}")
  if(_root)
    list(APPEND _nccl_hints "${_root}")
  endif()
endforeach()
if(CUDAToolkit_LIBRARY_ROOT)
  list(APPEND _nccl_hints "${CUDAToolkit_LIBRARY_ROOT}")
endif()
if(CUDAToolkit_INCLUDE_DIRS)
  foreach(_inc IN LISTS CUDAToolkit_INCLUDE_DIRS)
    get_filename_component(_up "${_inc}" DIRECTORY)
    list(APPEND _nccl_hints "${_up}")
  endforeach()
endif()
file(GLOB _nccl_venv LIST_DIRECTORIES true "/opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl")
list(APPEND _nccl_hints ${_nccl_venv})

find_path(NCCL_INCLUDE_DIR NAMES nccl.h HINTS ${_nccl_hints} PATH_SUFFIXES include)
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_nccl_hints} PATH_SUFFIXES lib64 lib)
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)

if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_defs REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_part IN ITEMS MAJOR MINOR PATCH)
    string(REGEX MATCH "NCCL_${_part} +([0-9]+)" _m "${_nccl_defs}")
    set(_nccl_${_part} "${CMAKE_MATCH_1}")
  endforeach()
  if(NOT _nccl_MAJOR STREQUAL "")
    set(NCCL_VERSION "${_nccl_MAJOR}.${_nccl_MINOR}.${_nccl_PATCH}")
  endif()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND)
  set(NCCL_INCLUDE_DIRS "${NCCL_INCLUDE_DIR}")
  set(NCCL_LIBRARIES "${NCCL_LIBRARY}")
  if(NOT TARGET NCCL::NCCL)
    add_library(NCCL::NCCL UNKNOWN IMPORTED)
    set_target_properties(NCCL::NCCL PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
  endif()
endif()
