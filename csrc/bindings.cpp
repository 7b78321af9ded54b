// The forgetscore._C extension module: CPU kernels always, CUDA kernels when
// the build compiled them in (FORGETSCORE_WITH_CUDA).
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

namespace {

constexpr bool kHasCuda =
#ifdef FORGETSCORE_WITH_CUDA
    true;
#else
    false;
#endif

// setup.py passes the sources' fingerprint as a bare token (s + 16 hex digits); made a string here.
#ifndef FORGETSCORE_SOURCES
#define FORGETSCORE_SOURCES unknown
#endif
#define FORGETSCORE_STRINGIFY_(x) #x
#define FORGETSCORE_STRINGIFY(x) FORGETSCORE_STRINGIFY_(x)

// Kernels run without the GIL so other Python threads (data loading) proceed.
using nogil = py::call_guard<py::gil_scoped_release>;

template <typename Bits, typename Normal, typename AddNoise, typename Loss, typename Fisher>
void def_backend(py::module_& m, const std::string& prefix, Bits bits, Normal normal, AddNoise add_noise, Loss loss,
                 Fisher fisher) {
  // seed is uint64_t: pybind11 accepts any Python int in [0, 2**64) and
  // rejects negatives or larger values with a TypeError.
  m.def((prefix + "bits").c_str(), bits, "uint32 Philox stream as int64 [B, numel]", py::arg("seed"),
        py::arg("sample_ids"), py::arg("draw_ids"), py::arg("numel"), nogil());
  m.def((prefix + "normal").c_str(), normal, "standard normals float32 [B, numel]", py::arg("seed"),
        py::arg("sample_ids"), py::arg("draw_ids"), py::arg("numel"), nogil());
  m.def((prefix + "add_noise").c_str(), add_noise, "x_t = a * x0 + b * eps in x0's dtype", py::arg("x0"),
        py::arg("coef_signal"), py::arg("coef_noise"), py::arg("seed"), py::arg("sample_ids"), py::arg("draw_ids"),
        nogil());
  m.def((prefix + "diffusion_loss").c_str(), loss, "per-row (masked) mean squared error, float32 [B]",
        py::arg("model_output"), py::arg("x0"), py::arg("coef_signal"), py::arg("coef_noise"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("draw_ids"), py::arg("prediction_type"), py::arg("mask") = py::none(),
        nogil());
  m.def((prefix + "fisher_accumulate").c_str(), fisher, "fisher += sum_b (G_b^T X_b)**2 in place", py::arg("fisher"),
        py::arg("inputs"), py::arg("grad_outputs"), nogil());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "forgetscore native kernels (C++/OpenMP and optionally CUDA)";
  m.def("has_cuda", []() { return kHasCuda; }, "whether the CUDA kernels were compiled in");
  m.attr("SOURCES") = FORGETSCORE_STRINGIFY(FORGETSCORE_SOURCES);
  def_backend(m, "cpu_", &forgetscore::cpu_bits, &forgetscore::cpu_normal, &forgetscore::cpu_add_noise,
              &forgetscore::cpu_diffusion_loss, &forgetscore::cpu_fisher_accumulate);
#ifdef FORGETSCORE_WITH_CUDA
  def_backend(m, "cuda_", &forgetscore::cuda_bits, &forgetscore::cuda_normal, &forgetscore::cuda_add_noise,
              &forgetscore::cuda_diffusion_loss, &forgetscore::cuda_fisher_accumulate);
#endif
}
