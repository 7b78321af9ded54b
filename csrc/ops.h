// Torch-facing entry points of the native backends (see
// forgetscore/kernels/BACKENDS.md for the contract they implement).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <string>

namespace forgetscore {

enum class Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

Prediction parse_prediction(const std::string& name);

at::Tensor cpu_bits(uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids, int64_t numel);
at::Tensor cpu_normal(uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids, int64_t numel);
at::Tensor cpu_add_noise(const at::Tensor& x0, const at::Tensor& coef_signal, const at::Tensor& coef_noise,
                         uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids);
at::Tensor cpu_diffusion_loss(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& coef_signal,
                              const at::Tensor& coef_noise, uint64_t seed, const at::Tensor& sample_ids,
                              const at::Tensor& draw_ids, const std::string& prediction_type,
                              const std::optional<at::Tensor>& mask);
void cpu_fisher_accumulate(const at::Tensor& fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs);
// fisher += (G**2)^T (X**2) for X [B, d_in], G [B, d_out] on any device (the L == 1 case of both backends);
// `exact` squares in double, for values whose float32 squares would under- or overflow (see cpu/fisher.cpp).
void add_outer_squares(const at::Tensor& fisher, const at::Tensor& x, const at::Tensor& g, bool exact);

#ifdef FORGETSCORE_WITH_CUDA
at::Tensor cuda_bits(uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids, int64_t numel);
at::Tensor cuda_normal(uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids, int64_t numel);
at::Tensor cuda_add_noise(const at::Tensor& x0, const at::Tensor& coef_signal, const at::Tensor& coef_noise,
                          uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids);
at::Tensor cuda_diffusion_loss(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& coef_signal,
                               const at::Tensor& coef_noise, uint64_t seed, const at::Tensor& sample_ids,
                               const at::Tensor& draw_ids, const std::string& prediction_type,
                               const std::optional<at::Tensor>& mask);
void cuda_fisher_accumulate(const at::Tensor& fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs);
#endif

}  // namespace forgetscore
