// Raw-pointer interface of the CUDA kernels.
//
// Deliberately free of torch headers and of CUDA language extensions: the .cu
// files compile standalone with plain nvcc (which is how CI checks them without
// a CUDA build of torch), and the torch-facing glue, a host C++ file, includes
// this header too.  All pointers are device pointers to contiguous row-major
// data; every launcher enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace forgetscore {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Same numbering as forgetscore::Prediction on the C++ side.
enum class Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// out[b, e] = uint32 lane e of row b's Philox stream, widened to int64.
cudaError_t launch_bits(uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                        int64_t numel, int64_t* out, cudaStream_t stream);

// out[b, e] = standard normal (float32).
cudaError_t launch_normal(uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                          int64_t numel, float* out, cudaStream_t stream);

// out = coef_signal[b] * x0 + coef_noise[b] * eps in float32, stored as `dtype`
// (float32/float16/bfloat16, the same for x0 and out).
cudaError_t launch_add_noise(const void* x0, DType dtype, const float* coef_signal, const float* coef_noise,
                             uint64_t seed, const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows,
                             int64_t cols, void* out, cudaStream_t stream);

// Number of blocks each row is split into by launch_diffusion_loss; the caller
// provides a float workspace of 2 * rows * chunks.  Depends only on the shape,
// so results are reproducible across GPUs.
int64_t diffusion_loss_chunks(int64_t rows, int64_t cols);

// out[b] = sum_e m (o - y)^2 / sum_e m (or / cols without a mask).  mask is
// null or float32 with row stride mask_row_stride (0: one row shared by all).
cudaError_t launch_diffusion_loss(const void* model_output, DType output_dtype, const void* x0, DType x0_dtype,
                                  const float* coef_signal, const float* coef_noise, uint64_t seed,
                                  const int64_t* sample_ids, const int64_t* draw_ids, int64_t rows, int64_t cols,
                                  Prediction prediction, const float* mask, int64_t mask_row_stride,
                                  float* workspace, float* out, cudaStream_t stream);

// How many sample groups launch_fisher_accumulate should process concurrently
// for a layer of this shape on a GPU with `sm_count` multiprocessors (1 when
// the fisher tiles alone fill the GPU).
int fisher_sample_splits(int64_t batch, int64_t d_out, int64_t d_in, int sm_count);

// fisher[d_out, d_in] (float32 or float64) += sum_b (G_b^T X_b)^2 with inputs
// [batch, L, d_in] and grad_outputs [batch, L, d_out] of dtype `dtype`.  With
// splits > 1, workspace must hold splits * d_out * d_in floats.
cudaError_t launch_fisher_accumulate(void* fisher, DType fisher_dtype, const void* inputs, const void* grad_outputs,
                                     DType dtype, int64_t batch, int64_t length, int64_t d_in, int64_t d_out,
                                     int splits, float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetscore
