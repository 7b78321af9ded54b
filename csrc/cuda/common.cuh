// Device helpers shared by the CUDA kernels: dtype conversion and launch sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace forgetscore {
namespace cuda {
namespace detail {

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  __device__ __forceinline__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ __forceinline__ static void store(float* p, int64_t i, float v) { p[i] = v; }
};

// Round-to-nearest-even on the way down, as torch's .to(dtype) does.
template <>
struct Convert<__half> {
  __device__ __forceinline__ static float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  __device__ __forceinline__ static void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, int64_t i, float v) {
    p[i] = __float2bfloat16_rn(v);
  }
};

constexpr int kThreads = 256;

// Grid for a grid-stride loop over n items: enough blocks to fill any current
// GPU several times over, never more than there is work for.
inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = 65535;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Calls f with a value-initialised tag of the element type behind `dtype`;
// returns false for dtypes the kernel does not take.
template <typename F>
bool dispatch_half_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kFloat16: f(__half{}); return true;
    case DType::kBFloat16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace forgetscore
