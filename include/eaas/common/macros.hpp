#pragma once

/// Execution-space macros. Under nvcc they mark functions for host and/or device; under a plain C++
/// compiler they become `inline`, so the protocol code above the ops compiles (and is tested) with g++.

#if defined(__CUDACC__)
#define EAAS_HOST_DEVICE __host__ __device__ __forceinline__
#define EAAS_DEVICE __device__ __forceinline__
#define EAAS_HOST __host__ inline
#else
#define EAAS_HOST_DEVICE inline
#define EAAS_DEVICE inline
#define EAAS_HOST inline
#endif

/// True while compiling device code (the device pass of nvcc).
#if defined(__CUDA_ARCH__)
#define EAAS_DEVICE_CODE 1
#else
#define EAAS_DEVICE_CODE 0
#endif

#if defined(__GNUC__)
#define EAAS_LIKELY(x) __builtin_expect(!!(x), 1)
#define EAAS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define EAAS_LIKELY(x) (x)
#define EAAS_UNLIKELY(x) (x)
#endif
