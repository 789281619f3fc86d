# Findmlx5dv.cmake — locate rdma-core's mlx5 direct-verbs interface (libmlx5 + libibverbs).
#
# eaas needs <infiniband/mlx5dv.h> and the libraries mlx5 and ibverbs for the ibgda transport
# (QP/CQ creation through mlx5 DEVX, and the WQE/CQE layouts the device code encodes).
#
# Result variables:
#   mlx5dv_FOUND        TRUE when the header and both libraries were found
#   mlx5dv_VERSION      rdma-core's libmlx5 version from pkg-config, when known
#   mlx5dv_INCLUDE_DIRS include directories
#   mlx5dv_LIBRARIES    libraries to link (mlx5, then ibverbs)
#
# Imported targets:
#   mlx5dv::ibverbs     libibverbs
#   mlx5dv::mlx5dv      libmlx5 (links mlx5dv::ibverbs)

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_mlx5dv_mlx5 QUIET libmlx5)
  pkg_check_modules(PC_mlx5dv_ibverbs QUIET libibverbs)
endif()

find_path(mlx5dv_INCLUDE_DIR
  NAMES infiniband/mlx5dv.h
  HINTS ${PC_mlx5dv_mlx5_INCLUDEDIR} ${PC_mlx5dv_mlx5_INCLUDE_DIRS})
find_library(mlx5dv_mlx5_LIBRARY
  NAMES mlx5
  HINTS ${PC_mlx5dv_mlx5_LIBDIR} ${PC_mlx5dv_mlx5_LIBRARY_DIRS})
find_library(mlx5dv_ibverbs_LIBRARY
  NAMES ibverbs
  HINTS ${PC_mlx5dv_ibverbs_LIBDIR} ${PC_mlx5dv_ibverbs_LIBRARY_DIRS})
mark_as_advanced(mlx5dv_INCLUDE_DIR mlx5dv_mlx5_LIBRARY mlx5dv_ibverbs_LIBRARY)

if(PC_mlx5dv_mlx5_VERSION)
  set(mlx5dv_VERSION "${PC_mlx5dv_mlx5_VERSION}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(mlx5dv
  REQUIRED_VARS mlx5dv_mlx5_LIBRARY mlx5dv_ibverbs_LIBRARY mlx5dv_INCLUDE_DIR
  VERSION_VAR mlx5dv_VERSION)

if(mlx5dv_FOUND)
  set(mlx5dv_INCLUDE_DIRS "${mlx5dv_INCLUDE_DIR}")
  set(mlx5dv_LIBRARIES "${mlx5dv_mlx5_LIBRARY}" "${mlx5dv_ibverbs_LIBRARY}")
  if(NOT TARGET mlx5dv::ibverbs)
    add_library(mlx5dv::ibverbs UNKNOWN IMPORTED)
    set_target_properties(mlx5dv::ibverbs PROPERTIES
      IMPORTED_LOCATION "${mlx5dv_ibverbs_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${mlx5dv_INCLUDE_DIR}")
  endif()
  if(NOT TARGET mlx5dv::mlx5dv)
    add_library(mlx5dv::mlx5dv UNKNOWN IMPORTED)
    set_target_properties(mlx5dv::mlx5dv PROPERTIES
      IMPORTED_LOCATION "${mlx5dv_mlx5_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${mlx5dv_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES mlx5dv::ibverbs)
  endif()
endif()
