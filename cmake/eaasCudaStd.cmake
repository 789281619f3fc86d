# eaas::device requires cxx_std_20, which CMake also applies to CUDA sources. CMake before 3.27
# does not know nvcc's flag for C++20 and would stop with "requires the language dialect CUDA20";
# nvcc has accepted -std=c++20 since CUDA 12.0. Included by eaas's build and by eaasConfig.cmake.
if(CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA" AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
endif()
