// Torch-facing side of the CUDA kernels: checks tensors, allocates outputs and
// workspaces through ATen (so they come from torch's caching allocator), and
// launches on the current stream of the tensors' device.  Compiled only in
// CUDA builds (FORGETSCORE_WITH_CUDA); the kernels themselves live in the .cu
// files behind the raw-pointer interface of kernels.cuh.
#include "../ops.h"
#include "kernels.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/GradMode.h>

namespace forgetscore {
namespace {

namespace fk = ::forgetscore::cuda;

fk::DType kernel_dtype(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat: return fk::DType::kFloat32;
    case at::kHalf: return fk::DType::kFloat16;
    case at::kBFloat16: return fk::DType::kBFloat16;
    case at::kDouble: return fk::DType::kFloat64;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", st);
  }
}

void check_half_type(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_on(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the ids are on ", device);
}

void check_ids(const at::Tensor& sample_ids, const at::Tensor& draw_ids) {
  TORCH_CHECK(sample_ids.is_cuda(), "sample_ids must be a CUDA tensor");
  check_on(draw_ids, sample_ids.device(), "draw_ids");
  TORCH_CHECK(sample_ids.scalar_type() == at::kLong && draw_ids.scalar_type() == at::kLong,
              "sample_ids and draw_ids must be int64");
  TORCH_CHECK(sample_ids.dim() == 1 && draw_ids.dim() == 1 && sample_ids.size(0) == draw_ids.size(0),
              "sample_ids and draw_ids must be 1-D of equal length");
}

void check_coefs(const at::Tensor& cs, const at::Tensor& cn, const at::Device& device, int64_t B) {
  check_on(cs, device, "coef_signal");
  check_on(cn, device, "coef_noise");
  TORCH_CHECK(cs.scalar_type() == at::kFloat && cn.scalar_type() == at::kFloat, "coefficients must be float32");
  TORCH_CHECK(cs.numel() == B && cn.numel() == B, "coefficients must have B entries");
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "forgetscore CUDA kernel ", what, " failed: ", cudaGetErrorString(status));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

at::Tensor cuda_bits(uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_, int64_t numel) {
  check_ids(sample_ids_, draw_ids_);
  TORCH_CHECK(numel >= 0, "numel must be non-negative");
  const c10::cuda::CUDAGuard guard(sample_ids_.device());
  const at::Tensor sid = sample_ids_.contiguous(), did = draw_ids_.contiguous();
  const int64_t B = sid.size(0);
  at::Tensor out = at::empty({B, numel}, sid.options().dtype(at::kLong));
  check_launch(fk::launch_bits(seed, sid.data_ptr<int64_t>(), did.data_ptr<int64_t>(), B, numel,
                               out.data_ptr<int64_t>(), current_stream()),
               "bits");
  return out;
}

at::Tensor cuda_normal(uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_, int64_t numel) {
  check_ids(sample_ids_, draw_ids_);
  TORCH_CHECK(numel >= 0, "numel must be non-negative");
  const c10::cuda::CUDAGuard guard(sample_ids_.device());
  const at::Tensor sid = sample_ids_.contiguous(), did = draw_ids_.contiguous();
  const int64_t B = sid.size(0);
  at::Tensor out = at::empty({B, numel}, sid.options().dtype(at::kFloat));
  check_launch(fk::launch_normal(seed, sid.data_ptr<int64_t>(), did.data_ptr<int64_t>(), B, numel,
                                 out.data_ptr<float>(), current_stream()),
               "normal");
  return out;
}

at::Tensor cuda_add_noise(const at::Tensor& x0_, const at::Tensor& coef_signal_, const at::Tensor& coef_noise_,
                          uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_) {
  check_ids(sample_ids_, draw_ids_);
  const at::Device device = sample_ids_.device();
  const int64_t B = sample_ids_.size(0);
  check_on(x0_, device, "x0");
  check_half_type(x0_, "x0");
  TORCH_CHECK(x0_.dim() == 2 && x0_.size(0) == B, "x0 must be [B, D]");
  check_coefs(coef_signal_, coef_noise_, device, B);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor x0 = x0_.contiguous(), cs = coef_signal_.contiguous(), cn = coef_noise_.contiguous();
  const at::Tensor sid = sample_ids_.contiguous(), did = draw_ids_.contiguous();
  at::Tensor out = at::empty_like(x0);
  check_launch(fk::launch_add_noise(x0.data_ptr(), kernel_dtype(x0.scalar_type(), "x0"), cs.data_ptr<float>(),
                                    cn.data_ptr<float>(), seed, sid.data_ptr<int64_t>(), did.data_ptr<int64_t>(), B,
                                    x0.size(1), out.data_ptr(), current_stream()),
               "add_noise");
  return out;
}

at::Tensor cuda_diffusion_loss(const at::Tensor& model_output_, const at::Tensor& x0_, const at::Tensor& coef_signal_,
                               const at::Tensor& coef_noise_, uint64_t seed, const at::Tensor& sample_ids_,
                               const at::Tensor& draw_ids_, const std::string& prediction_type,
                               const std::optional<at::Tensor>& mask_) {
  check_ids(sample_ids_, draw_ids_);
  const at::Device device = sample_ids_.device();
  const int64_t B = sample_ids_.size(0);
  check_on(x0_, device, "x0");
  check_on(model_output_, device, "model_output");
  check_half_type(x0_, "x0");
  check_half_type(model_output_, "model_output");
  TORCH_CHECK(x0_.dim() == 2 && x0_.size(0) == B, "x0 must be [B, D]");
  TORCH_CHECK(model_output_.sizes() == x0_.sizes(), "model_output and x0 must have the same shape");
  check_coefs(coef_signal_, coef_noise_, device, B);
  const Prediction pred = parse_prediction(prediction_type);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor mo = model_output_.contiguous(), x0 = x0_.contiguous();
  const at::Tensor cs = coef_signal_.contiguous(), cn = coef_noise_.contiguous();
  const at::Tensor sid = sample_ids_.contiguous(), did = draw_ids_.contiguous();
  const int64_t D = x0.size(1);
  at::Tensor mask;
  const float* mask_ptr = nullptr;
  int64_t mask_stride = 0;
  if (mask_.has_value() && mask_->defined()) {
    check_on(*mask_, device, "mask");
    mask = mask_->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kFloat, "mask must be float32");
    TORCH_CHECK(mask.dim() == 2 && mask.size(1) == D && (mask.size(0) == 1 || mask.size(0) == B),
                "mask must be [1, D] or [B, D]");
    mask_ptr = mask.data_ptr<float>();
    mask_stride = mask.size(0) == 1 ? 0 : D;  // one shared row: no broadcast copy
  }
  at::Tensor out = at::empty({B}, x0.options().dtype(at::kFloat));
  if (B == 0) return out;
  const int64_t chunks = fk::diffusion_loss_chunks(B, D);
  at::Tensor workspace = at::empty({2 * B * chunks}, x0.options().dtype(at::kFloat));
  check_launch(fk::launch_diffusion_loss(mo.data_ptr(), kernel_dtype(mo.scalar_type(), "model_output"), x0.data_ptr(),
                                         kernel_dtype(x0.scalar_type(), "x0"), cs.data_ptr<float>(),
                                         cn.data_ptr<float>(), seed, sid.data_ptr<int64_t>(),
                                         did.data_ptr<int64_t>(), B, D, static_cast<fk::Prediction>(pred), mask_ptr,
                                         mask_stride, workspace.data_ptr<float>(), out.data_ptr<float>(),
                                         current_stream()),
               "diffusion_loss");
  return out;
}

void cuda_fisher_accumulate(const at::Tensor& fisher, const at::Tensor& inputs_, const at::Tensor& grad_outputs_) {
  TORCH_CHECK(fisher.is_cuda(), "fisher must be a CUDA tensor");
  const at::Device device = fisher.device();
  check_on(inputs_, device, "inputs");
  check_on(grad_outputs_, device, "grad_outputs");
  TORCH_CHECK(fisher.scalar_type() == at::kFloat || fisher.scalar_type() == at::kDouble,
              "fisher must be float32 or float64");
  TORCH_CHECK(fisher.is_contiguous(), "fisher must be contiguous (it is updated in place)");
  TORCH_CHECK(inputs_.dim() == 3 && grad_outputs_.dim() == 3, "inputs and grad_outputs must be [B, L, d]");
  check_half_type(inputs_, "inputs");
  TORCH_CHECK(inputs_.scalar_type() == grad_outputs_.scalar_type(), "inputs and grad_outputs must share a dtype");
  const int64_t B = inputs_.size(0), L = inputs_.size(1), d_in = inputs_.size(2), d_out = grad_outputs_.size(2);
  TORCH_CHECK(grad_outputs_.size(0) == B && grad_outputs_.size(1) == L, "inputs and grad_outputs disagree on B, L");
  TORCH_CHECK(fisher.dim() == 2 && fisher.size(0) == d_out && fisher.size(1) == d_in, "fisher must be [d_out, d_in]");
  if (B == 0 || L == 0 || d_in == 0 || d_out == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  c10::NoGradGuard no_grad;
  const at::Tensor inputs = inputs_.detach().contiguous(), grad_outputs = grad_outputs_.detach().contiguous();

  if (L == 1) {
    // One cuBLAS GEMM beats the tiled kernel. Its squares are formed in double whatever the values, since
    // choosing the float32 GEMM where they allow it would need their range on the host (a synchronisation).
    add_outer_squares(fisher, inputs.view({B, d_in}), grad_outputs.view({B, d_out}), /*exact=*/true);
    return;
  }

  int sm_count = 0;
  check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()), "device query");
  const int splits = fk::fisher_sample_splits(B, d_out, d_in, sm_count);
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({splits, d_out, d_in}, inputs.options().dtype(at::kFloat));
  check_launch(fk::launch_fisher_accumulate(fisher.data_ptr(), kernel_dtype(fisher.scalar_type(), "fisher"),
                                            inputs.data_ptr(), grad_outputs.data_ptr(),
                                            kernel_dtype(inputs.scalar_type(), "inputs"), B, L, d_in, d_out, splits,
                                            splits > 1 ? workspace.data_ptr<float>() : nullptr, current_stream()),
               "fisher_accumulate");
}

}  // namespace forgetscore
