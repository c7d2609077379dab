// EG_HD marks a function compiled for both the host (CPU kernels, C++ tests)
// and the device (CUDA kernels), so the CPU tests cover the bit logic the GPU
// runs. Every header under csrc/wire uses it.
#pragma once

#if defined(__CUDACC__)
#define EG_HD __host__ __device__ __forceinline__
#else
#define EG_HD inline
#endif
