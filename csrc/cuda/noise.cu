// CUDA kernels for the counter-based noise: bits, normal, add_noise and the
// fused diffusion loss.  One thread handles one Philox block (4 consecutive
// elements of a row), so each block is generated exactly once and the noise
// never touches global memory in add_noise / diffusion_loss.
#include "common.cuh"
#include "../philox.h"

namespace forgetscore {
namespace cuda {
namespace {

using detail::Convert;
using detail::kThreads;
using philox::RowCounter;

struct Quad {
  int64_t row, quad, first, count;  // count: elements of this quad inside the row (1..4)
};

__device__ __forceinline__ Quad locate(int64_t idx, int64_t quads, int64_t cols) {
  Quad q;
  q.row = idx / quads;
  q.quad = idx - q.row * quads;
  q.first = q.quad * 4;
  const int64_t left = cols - q.first;
  q.count = left < 4 ? left : 4;
  return q;
}

__device__ __forceinline__ void row_block(uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids,
                                          const Quad& q, uint32_t bits[4]) {
  const RowCounter rc = philox::make_row_counter(seed, sample_ids[q.row], draw_ids[q.row]);
  philox::row_block(rc, static_cast<uint64_t>(q.quad), bits);
}

__global__ void bits_kernel(uint64_t seed, const int64_t* __restrict__ sample_ids,
                            const int64_t* __restrict__ draw_ids, int64_t rows, int64_t cols,
                            int64_t* __restrict__ out) {
  const int64_t quads = (cols + 3) / 4, total = rows * quads;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Quad q = locate(idx, quads, cols);
    uint32_t bits[4];
    row_block(seed, sample_ids, draw_ids, q, bits);
    int64_t* y = out + q.row * cols + q.first;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < q.count) y[k] = static_cast<int64_t>(bits[k]);
  }
}

__global__ void normal_kernel(uint64_t seed, const int64_t* __restrict__ sample_ids,
                              const int64_t* __restrict__ draw_ids, int64_t rows, int64_t cols,
                              float* __restrict__ out) {
  const int64_t quads = (cols + 3) / 4, total = rows * quads;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Quad q = locate(idx, quads, cols);
    uint32_t bits[4];
    float z[4];
    row_block(seed, sample_ids, draw_ids, q, bits);
    philox::block_to_normals(bits, z);
    float* y = out + q.row * cols + q.first;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < q.count) y[k] = z[k];
  }
}

template <typename T>
__global__ void add_noise_kernel(const T* __restrict__ x0, const float* __restrict__ coef_signal,
                                 const float* __restrict__ coef_noise, uint64_t seed,
                                 const int64_t* __restrict__ sample_ids, const int64_t* __restrict__ draw_ids,
                                 int64_t rows, int64_t cols, T* __restrict__ out) {
  const int64_t quads = (cols + 3) / 4, total = rows * quads;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Quad q = locate(idx, quads, cols);
    uint32_t bits[4];
    float z[4];
    row_block(seed, sample_ids, draw_ids, q, bits);
    philox::block_to_normals(bits, z);
    const float a = coef_signal[q.row], s = coef_noise[q.row];
    const int64_t base = q.row * cols + q.first;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < q.count) {
        // Two roundings then an add, as in the reference; no fused multiply-add.
        const float v = __fadd_rn(__fmul_rn(a, Convert<T>::load(x0, base + k)), __fmul_rn(s, z[k]));
        Convert<T>::store(out, base + k, v);
      }
    }
  }
}

// Each block sums one chunk of one row (grid: chunks x rows) and writes its
// partial sums; loss_finalize_kernel adds the chunks of a row in order.  No
// atomics, so the loss is bit-reproducible run to run.
template <typename O, typename X>
__global__ void loss_partial_kernel(const O* __restrict__ model_output, const X* __restrict__ x0,
                                    const float* __restrict__ coef_signal, const float* __restrict__ coef_noise,
                                    uint64_t seed, const int64_t* __restrict__ sample_ids,
                                    const int64_t* __restrict__ draw_ids, int64_t cols, int prediction,
                                    const float* __restrict__ mask, int64_t mask_row_stride,
                                    float* __restrict__ partial_sum, float* __restrict__ partial_mask) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t quads = (cols + 3) / 4;
  const int64_t per_chunk = (quads + chunks - 1) / chunks;
  const int64_t q_begin = chunk * per_chunk;
  const int64_t q_end = q_begin + per_chunk < quads ? q_begin + per_chunk : quads;
  const RowCounter rc = philox::make_row_counter(seed, sample_ids[row], draw_ids[row]);
  const float a = coef_signal[row], s = coef_noise[row];
  const O* o = model_output + row * cols;
  const X* x = x0 + row * cols;
  const float* m = mask ? mask + row * mask_row_stride : nullptr;
  float acc = 0.0f, macc = 0.0f;
  for (int64_t quad = q_begin + threadIdx.x; quad < q_end; quad += blockDim.x) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (prediction != static_cast<int>(Prediction::kSample)) {
      uint32_t bits[4];
      philox::row_block(rc, static_cast<uint64_t>(quad), bits);
      philox::block_to_normals(bits, z);
    }
    const int64_t first = quad * 4;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = first + k;
      if (e < cols) {
        const float xv = Convert<X>::load(x, e);
        float target;
        if (prediction == static_cast<int>(Prediction::kEpsilon))
          target = z[k];
        else if (prediction == static_cast<int>(Prediction::kVPrediction))
          target = __fsub_rn(__fmul_rn(a, z[k]), __fmul_rn(s, xv));
        else
          target = xv;
        const float d = Convert<O>::load(o, e) - target;
        const float sq = __fmul_rn(d, d);
        if (m) {
          acc += m[e] * sq;
          macc += m[e];
        } else {
          acc += sq;
        }
      }
    }
  }
  // Fixed-shape tree reduction in shared memory: deterministic order.
  __shared__ float s_sum[kThreads];
  __shared__ float s_mask[kThreads];
  s_sum[threadIdx.x] = acc;
  s_mask[threadIdx.x] = macc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + stride];
      s_mask[threadIdx.x] += s_mask[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial_sum[row * chunks + chunk] = s_sum[0];
    partial_mask[row * chunks + chunk] = s_mask[0];
  }
}

__global__ void loss_finalize_kernel(const float* __restrict__ partial_sum, const float* __restrict__ partial_mask,
                                     int64_t rows, int64_t chunks, int64_t cols, bool masked,
                                     float* __restrict__ out) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  // Chunks are combined in double: the partials may span millions of elements.
  double num = 0.0, den = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    num += partial_sum[row * chunks + c];
    den += partial_mask[row * chunks + c];
  }
  if (!masked) den = static_cast<double>(cols);
  // A sum that overflows float32 is inf, as in the reference, whichever chunks it was split into.
  const float total = static_cast<float>(num);
  out[row] = isinf(total) ? total : static_cast<float>(num / den);
}

template <typename O, typename X>
cudaError_t launch_loss_typed(const void* model_output, const void* x0, const float* coef_signal,
                              const float* coef_noise, uint64_t seed, const int64_t* sample_ids,
                              const int64_t* draw_ids, int64_t rows, int64_t cols, Prediction prediction,
                              const float* mask, int64_t mask_row_stride, float* workspace, float* out,
                              cudaStream_t stream) {
  const int64_t chunks = diffusion_loss_chunks(rows, cols);
  float* partial_sum = workspace;
  float* partial_mask = workspace + rows * chunks;
  // gridDim.y is limited to 65535 rows per launch: go through the rows in slices.
  const int64_t max_rows = 65535;
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
    const int64_t nr = rows - r0 < max_rows ? rows - r0 : max_rows;
    const dim3 grid(static_cast<unsigned int>(chunks), static_cast<unsigned int>(nr));
    loss_partial_kernel<O, X><<<grid, kThreads, 0, stream>>>(
        static_cast<const O*>(model_output) + r0 * cols, static_cast<const X*>(x0) + r0 * cols, coef_signal + r0,
        coef_noise + r0, seed, sample_ids + r0, draw_ids + r0, cols, static_cast<int>(prediction),
        mask ? mask + r0 * mask_row_stride : nullptr, mask_row_stride, partial_sum + r0 * chunks,
        partial_mask + r0 * chunks);
  }
  const unsigned int blocks = static_cast<unsigned int>((rows + kThreads - 1) / kThreads);
  loss_finalize_kernel<<<blocks, kThreads, 0, stream>>>(partial_sum, partial_mask, rows, chunks, cols,
                                                        mask != nullptr, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bits(uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                        int64_t numel, int64_t* out, cudaStream_t stream) {
  const int64_t total = rows * ((numel + 3) / 4);
  if (total == 0) return cudaSuccess;
  bits_kernel<<<detail::grid_for(total), kThreads, 0, stream>>>(seed, sample_ids, draw_ids, rows, numel, out);
  return cudaGetLastError();
}

cudaError_t launch_normal(uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                          int64_t numel, float* out, cudaStream_t stream) {
  const int64_t total = rows * ((numel + 3) / 4);
  if (total == 0) return cudaSuccess;
  normal_kernel<<<detail::grid_for(total), kThreads, 0, stream>>>(seed, sample_ids, draw_ids, rows, numel, out);
  return cudaGetLastError();
}

cudaError_t launch_add_noise(const void* x0, DType dtype, const float* coef_signal, const float* coef_noise,
                             uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                             int64_t cols, void* out, cudaStream_t stream) {
  const int64_t total = rows * ((cols + 3) / 4);
  if (total == 0) return cudaSuccess;
  const bool known = detail::dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_noise_kernel<T><<<detail::grid_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x0), coef_signal, coef_noise, seed, sample_ids, draw_ids, rows, cols,
        static_cast<T*>(out));
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

int64_t diffusion_loss_chunks(int64_t rows, int64_t cols) {
  (void)rows;
  // ~4 Philox blocks per thread per chunk; at most 1024 chunks per row.
  const int64_t quads = (cols + 3) / 4;
  const int64_t per_block = static_cast<int64_t>(kThreads) * 4;
  int64_t chunks = (quads + per_block - 1) / per_block;
  if (chunks < 1) chunks = 1;
  if (chunks > 1024) chunks = 1024;
  return chunks;
}

cudaError_t launch_diffusion_loss(const void* model_output, DType output_dtype, const void* x0, DType x0_dtype,
                                  const float* coef_signal, const float* coef_noise, uint64_t seed,
                                  const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows, int64_t cols,
                                  Prediction prediction, const float* mask, int64_t mask_row_stride,
                                  float* workspace, float* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t status = cudaErrorInvalidValue;
  detail::dispatch_half_types(output_dtype, [&](auto otag) {
    using O = decltype(otag);
    detail::dispatch_half_types(x0_dtype, [&](auto xtag) {
      using X = decltype(xtag);
      status = launch_loss_typed<O, X>(model_output, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids, rows,
                                       cols, prediction, mask, mask_row_stride, workspace, out, stream);
    });
  });
  return status;
}

}  // namespace cuda
}  // namespace forgetscore
