// CUDA diagonal-Fisher accumulation: fisher += sum_b (G_b^T X_b)^2.
//
// Each thread block owns a kTileO x kTileI tile of fisher.  For every sample b
// it computes that tile of the per-sample gradient G_b^T X_b (a small GEMM
// over the L positions, staged through shared memory), squares it in
// registers and keeps the running sum there; only the final sum is written.
// Per-sample gradients therefore never reach global memory.  When the tiles
// alone cannot fill the GPU, blockIdx.z splits the samples into groups whose
// sums land in a workspace and are added in a fixed order, so results stay
// deterministic (no atomics).
#include "common.cuh"

namespace forgetscore {
namespace cuda {
namespace {

using detail::Convert;

constexpr int kTileO = 64;                    // fisher rows per block
constexpr int kTileI = 64;                    // fisher columns per block
constexpr int kTileL = 16;                    // positions staged per step
constexpr int kThreadsX = 16, kThreadsY = 16;  // 256 threads, 4x4 outputs each
constexpr int kMicro = 4;

template <typename T, typename F>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    fisher_kernel(F* __restrict__ fisher, float* __restrict__ workspace, const T* __restrict__ inputs,
                  const T* __restrict__ grad_outputs, int64_t batch, int64_t length, int64_t d_in, int64_t d_out) {
  // +4 pads keep 16-byte alignment of rows for the float4 reads below.
  __shared__ __align__(16) float g_tile[kTileL][kTileO + 4];
  __shared__ __align__(16) float x_tile[kTileL][kTileI + 4];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileO;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileI;
  const int64_t splits = gridDim.z;
  const int64_t per_split = (batch + splits - 1) / splits;
  const int64_t b_begin = blockIdx.z * per_split;
  const int64_t b_end = b_begin + per_split < batch ? b_begin + per_split : batch;

  float sum[kMicro][kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) sum[r][c] = 0.0f;

  for (int64_t b = b_begin; b < b_end; ++b) {
    const T* xb = inputs + b * length * d_in;
    const T* gb = grad_outputs + b * length * d_out;
    float acc[kMicro][kMicro];
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) acc[r][c] = 0.0f;

    for (int64_t l0 = 0; l0 < length; l0 += kTileL) {
      // Stage kTileL positions of G_b (columns o0..) and X_b (columns i0..):
      // consecutive threads read consecutive columns, so loads coalesce.
#pragma unroll
      for (int k = 0; k < (kTileL * kTileO) / (kThreadsX * kThreadsY); ++k) {
        const int e = tid + k * kThreadsX * kThreadsY;
        const int l = e / kTileO, o = e % kTileO;
        const int64_t gl = l0 + l, go = o0 + o;
        g_tile[l][o] = (gl < length && go < d_out) ? Convert<T>::load(gb, gl * d_out + go) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < (kTileL * kTileI) / (kThreadsX * kThreadsY); ++k) {
        const int e = tid + k * kThreadsX * kThreadsY;
        const int l = e / kTileI, i = e % kTileI;
        const int64_t gl = l0 + l, gi = i0 + i;
        x_tile[l][i] = (gl < length && gi < d_in) ? Convert<T>::load(xb, gl * d_in + gi) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int l = 0; l < kTileL; ++l) {
        const float4 gv = *reinterpret_cast<const float4*>(&g_tile[l][ty * kMicro]);
        const float4 xv = *reinterpret_cast<const float4*>(&x_tile[l][tx * kMicro]);
        const float g[kMicro] = {gv.x, gv.y, gv.z, gv.w};
        const float x[kMicro] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int r = 0; r < kMicro; ++r)
#pragma unroll
          for (int c = 0; c < kMicro; ++c) acc[r][c] = fmaf(g[r], x[c], acc[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) sum[r][c] = fmaf(acc[r][c], acc[r][c], sum[r][c]);
  }

#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int64_t o = o0 + ty * kMicro + r;
    if (o >= d_out) continue;
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t i = i0 + tx * kMicro + c;
      if (i >= d_in) continue;
      if (workspace)
        workspace[static_cast<int64_t>(blockIdx.z) * d_out * d_in + o * d_in + i] = sum[r][c];
      else
        fisher[o * d_in + i] += static_cast<F>(sum[r][c]);
    }
  }
}

// fisher += sum over sample groups, in group order.
template <typename F>
__global__ void fisher_reduce_kernel(F* __restrict__ fisher, const float* __restrict__ workspace, int splits,
                                     int64_t n) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += workspace[z * n + p];
    fisher[p] += static_cast<F>(s);
  }
}

template <typename T, typename F>
cudaError_t launch_typed(F* fisher, const T* inputs, const T* grad_outputs, int64_t batch, int64_t length,
                         int64_t d_in, int64_t d_out, int splits, float* workspace, cudaStream_t stream) {
  const int64_t tiles_i = (d_in + kTileI - 1) / kTileI, tiles_o = (d_out + kTileO - 1) / kTileO;
  if (tiles_o > 65535 || splits > 65535) return cudaErrorInvalidValue;
  const bool split = splits > 1 && workspace != nullptr;
  const dim3 grid(static_cast<unsigned int>(tiles_i), static_cast<unsigned int>(tiles_o),
                  static_cast<unsigned int>(split ? splits : 1));
  const dim3 block(kThreadsX, kThreadsY);
  fisher_kernel<T, F><<<grid, block, 0, stream>>>(fisher, split ? workspace : nullptr, inputs, grad_outputs, batch,
                                                  length, d_in, d_out);
  if (split) {
    const int64_t n = d_out * d_in;
    fisher_reduce_kernel<F><<<detail::grid_for(n), detail::kThreads, 0, stream>>>(fisher, workspace, splits, n);
  }
  return cudaGetLastError();
}

}  // namespace

int fisher_sample_splits(int64_t batch, int64_t d_out, int64_t d_in, int sm_count) {
  const int64_t tiles = ((d_in + kTileI - 1) / kTileI) * ((d_out + kTileO - 1) / kTileO);
  // Aim for about two resident blocks per multiprocessor; each group should
  // still see a few samples so the extra reduction pass stays cheap.
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  int64_t splits = want;
  const int64_t max_by_batch = batch / 4 > 1 ? batch / 4 : 1;
  if (splits > max_by_batch) splits = max_by_batch;
  if (splits > 16) splits = 16;
  if (splits < 1) splits = 1;
  return static_cast<int>(splits);
}

cudaError_t launch_fisher_accumulate(void* fisher, DType fisher_dtype, const void* inputs, const void* grad_outputs,
                                     DType dtype, int64_t batch, int64_t length, int64_t d_in, int64_t d_out,
                                     int splits, float* workspace, cudaStream_t stream) {
  if (batch == 0 || length == 0 || d_in == 0 || d_out == 0) return cudaSuccess;
  if (fisher_dtype != DType::kFloat32 && fisher_dtype != DType::kFloat64) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  detail::dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(inputs);
    const T* g = static_cast<const T*>(grad_outputs);
    if (fisher_dtype == DType::kFloat64)
      status = launch_typed<T, double>(static_cast<double*>(fisher), x, g, batch, length, d_in, d_out, splits,
                                       workspace, stream);
    else
      status = launch_typed<T, float>(static_cast<float*>(fisher), x, g, batch, length, d_in, d_out, splits,
                                      workspace, stream);
  });
  return status;
}

}  // namespace cuda
}  // namespace forgetscore
