// CPU kernels for the counter-based noise: bits, normal, add_noise and the
// fused diffusion loss.
//
// Work is cut into tiles of kTileQuads Philox blocks of one row.  Each tile
// generates its blocks once (4 outputs per block), keeps them in an L1-sized
// stack buffer and consumes them right away, so the noise never goes through
// main memory.  Tiles of all rows form one flat OpenMP loop, which parallelises
// over rows when there are many and within rows when there are few.
#include "../ops.h"
#include "../philox.h"
#include "box_muller.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace forgetscore {
namespace {

using philox::RowCounter;

constexpr int64_t kTileQuads = 256;  // 1024 elements, 4 KiB of float noise.
// Below this many elements an OpenMP fork costs more than the work.
constexpr int64_t kParallelMinElements = 16384;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// The noise generators are compiled for several x86-64 levels and picked at
// load time: the extension is built for the baseline ISA, but the Philox and
// Box-Muller loops run 2-4x faster with AVX2/AVX-512 vectors.
// (GCC >= 12 knows the x86-64-vN level names; other compilers get one build.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define FS_TARGET_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FS_TARGET_CLONES
#endif
#if defined(__GNUC__)
#define FS_NOINLINE __attribute__((noinline))
#else
#define FS_NOINLINE
#endif

// Philox blocks for quads [q0, q0 + n) of one row, written interleaved as the
// reference lays them out (lane k of quad j at 4j + k).  Iterations are
// independent, so the compiler vectorises the 10 rounds across quads.
inline void philox_loop(const RowCounter& rc, uint64_t q0, int64_t n, uint32_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = static_cast<uint32_t>(q0 + static_cast<uint64_t>(i));
    uint32_t c1 = rc.c1, c2 = rc.c2, c3 = rc.c3;
    philox::philox4x32_10(c0, c1, c2, c3, rc.k0, rc.k1);
    out[4 * i + 0] = c0;
    out[4 * i + 1] = c1;
    out[4 * i + 2] = c2;
    out[4 * i + 3] = c3;
  }
}

FS_TARGET_CLONES FS_NOINLINE void philox_tile(const RowCounter& rc, uint64_t q0, int64_t n, uint32_t* __restrict out) {
  philox_loop(rc, q0, n, out);
}

// Normals for quads [q0, q0 + n) of one row (n <= kTileQuads).
FS_TARGET_CLONES FS_NOINLINE void normal_tile(const RowCounter& rc, uint64_t q0, int64_t n, float* __restrict out) {
  alignas(64) uint32_t bits[4 * kTileQuads];
  philox_loop(rc, q0, n, bits);
  bm::normals_from_pairs(bits, 2 * n, out);
}

struct Tiling {
  int64_t rows, numel, quads, tiles_per_row;
  Tiling(int64_t rows_, int64_t numel_)
      : rows(rows_), numel(numel_), quads((numel_ + 3) / 4),
        tiles_per_row((quads + kTileQuads - 1) / kTileQuads) {}
  int64_t total() const { return rows * tiles_per_row; }
};

// Calls f(row, tile, first_quad, n_quads, first_element, n_elements) for every
// tile; tiles are independent so the schedule does not affect results.
template <typename F>
void for_each_tile(const Tiling& t, F&& f) {
  const int64_t total = t.total();
  const bool parallel = t.rows * t.numel >= kParallelMinElements && total > 1;
  // Thread count follows torch.set_num_threads like ATen's own kernels.
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t id = 0; id < total; ++id) {
    const int64_t b = id / t.tiles_per_row;
    const int64_t k = id - b * t.tiles_per_row;
    const int64_t q0 = k * kTileQuads;
    const int64_t nq = std::min(kTileQuads, t.quads - q0);
    const int64_t e0 = q0 * 4;
    const int64_t ne = std::min(nq * 4, t.numel - e0);
    f(b, k, q0, nq, e0, ne);
  }
}

std::vector<RowCounter> row_counters(uint64_t seed, const at::Tensor& sample_ids, const at::Tensor& draw_ids) {
  const int64_t B = sample_ids.size(0);
  const int64_t* sid = sample_ids.data_ptr<int64_t>();
  const int64_t* did = draw_ids.data_ptr<int64_t>();
  std::vector<RowCounter> rcs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) rcs[b] = philox::make_row_counter(seed, sid[b], did[b]);
  return rcs;
}

void check_ids(const at::Tensor& sample_ids, const at::Tensor& draw_ids) {
  TORCH_CHECK(sample_ids.device().is_cpu() && draw_ids.device().is_cpu(), "ids must be CPU tensors");
  TORCH_CHECK(sample_ids.scalar_type() == at::kLong && draw_ids.scalar_type() == at::kLong,
              "sample_ids and draw_ids must be int64");
  TORCH_CHECK(sample_ids.dim() == 1 && draw_ids.dim() == 1 && sample_ids.size(0) == draw_ids.size(0),
              "sample_ids and draw_ids must be 1-D of equal length");
}

void check_rows(const at::Tensor& t, int64_t B, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B, name, " must be [B, D]");
}

void check_coefs(const at::Tensor& cs, const at::Tensor& cn, int64_t B) {
  TORCH_CHECK(cs.scalar_type() == at::kFloat && cn.scalar_type() == at::kFloat, "coefficients must be float32");
  TORCH_CHECK(cs.numel() == B && cn.numel() == B, "coefficients must have B entries");
}

template <typename T>
void add_noise_impl(const T* __restrict x0, const float* cs, const float* cn, const std::vector<RowCounter>& rcs,
                    const Tiling& t, T* __restrict out) {
  for_each_tile(t, [&](int64_t b, int64_t, int64_t q0, int64_t nq, int64_t e0, int64_t ne) {
    alignas(64) float eps[4 * kTileQuads];
    normal_tile(rcs[b], static_cast<uint64_t>(q0), nq, eps);
    const float a = cs[b], s = cn[b];
    const T* __restrict x = x0 + b * t.numel + e0;
    T* __restrict y = out + b * t.numel + e0;
    for (int64_t e = 0; e < ne; ++e) y[e] = from_float<T>(a * to_float(x[e]) + s * eps[e]);
  });
}

// Per-tile partial sums are kept in double and added per row in tile order, so
// the loss does not depend on the thread count and loses nothing to rounding
// over long rows; the final value is cast to float32.
template <typename O, typename X>
void loss_impl(const O* __restrict mo, const X* __restrict x0, const float* cs, const float* cn,
               const std::vector<RowCounter>& rcs, const Tiling& t, Prediction pred, const float* mask,
               int64_t mask_stride, float* out) {
  const int64_t B = t.rows, nt = t.tiles_per_row;
  std::vector<double> part(static_cast<size_t>(B * nt)), mpart(mask ? static_cast<size_t>(B * nt) : 0);
  for_each_tile(t, [&](int64_t b, int64_t k, int64_t q0, int64_t nq, int64_t e0, int64_t ne) {
    alignas(64) float eps[4 * kTileQuads];
    if (pred != Prediction::kSample) normal_tile(rcs[b], static_cast<uint64_t>(q0), nq, eps);
    const O* __restrict o = mo + b * t.numel + e0;
    const X* __restrict x = x0 + b * t.numel + e0;
    const float a = cs[b], s = cn[b];
    // The target is formed in float32 exactly as the reference does; only the
    // squared errors are summed in double.
    alignas(64) float sq[4 * kTileQuads];
    switch (pred) {
      case Prediction::kEpsilon:
        for (int64_t e = 0; e < ne; ++e) {
          const float d = to_float(o[e]) - eps[e];
          sq[e] = d * d;
        }
        break;
      case Prediction::kVPrediction:
        for (int64_t e = 0; e < ne; ++e) {
          const float y = a * eps[e] - s * to_float(x[e]);
          const float d = to_float(o[e]) - y;
          sq[e] = d * d;
        }
        break;
      case Prediction::kSample:
        for (int64_t e = 0; e < ne; ++e) {
          const float d = to_float(o[e]) - to_float(x[e]);
          sq[e] = d * d;
        }
        break;
    }
    double acc = 0.0;
    if (mask) {
      const float* __restrict m = mask + b * mask_stride + e0;
      double macc = 0.0;
      for (int64_t e = 0; e < ne; ++e) {
        acc += static_cast<double>(m[e] * sq[e]);
        macc += static_cast<double>(m[e]);
      }
      mpart[b * nt + k] = macc;
    } else {
      for (int64_t e = 0; e < ne; ++e) acc += static_cast<double>(sq[e]);
    }
    part[b * nt + k] = acc;
  });
  for (int64_t b = 0; b < B; ++b) {
    double num = 0.0, den = mask ? 0.0 : static_cast<double>(t.numel);
    for (int64_t k = 0; k < nt; ++k) num += part[b * nt + k];
    if (mask)
      for (int64_t k = 0; k < nt; ++k) den += mpart[b * nt + k];
    // Where the sum overflows float32 the reference's and the GPU kernels' float32 sums give inf, which the
    // caller reports as an overflow; the double sum would still give a finite mean, so it says inf too.
    const float total = static_cast<float>(num);
    out[b] = std::isinf(total) ? total : static_cast<float>(num / den);
  }
}

template <typename F>
void dispatch_float_type(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", st);
  }
}

}  // namespace

Prediction parse_prediction(const std::string& name) {
  if (name == "epsilon") return Prediction::kEpsilon;
  if (name == "v_prediction") return Prediction::kVPrediction;
  if (name == "sample") return Prediction::kSample;
  TORCH_CHECK(false, "unknown prediction_type '", name, "' (expected epsilon, v_prediction or sample)");
}

at::Tensor cpu_bits(uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_, int64_t numel) {
  check_ids(sample_ids_, draw_ids_);
  TORCH_CHECK(numel >= 0, "numel must be non-negative");
  const at::Tensor sample_ids = sample_ids_.contiguous(), draw_ids = draw_ids_.contiguous();
  const int64_t B = sample_ids.size(0);
  at::Tensor out = at::empty({B, numel}, sample_ids.options().dtype(at::kLong));
  const auto rcs = row_counters(seed, sample_ids, draw_ids);
  int64_t* o = out.data_ptr<int64_t>();
  const Tiling t(B, numel);
  for_each_tile(t, [&](int64_t b, int64_t, int64_t q0, int64_t nq, int64_t e0, int64_t ne) {
    alignas(64) uint32_t bits[4 * kTileQuads];
    philox_tile(rcs[b], static_cast<uint64_t>(q0), nq, bits);
    int64_t* __restrict y = o + b * numel + e0;
    for (int64_t e = 0; e < ne; ++e) y[e] = static_cast<int64_t>(bits[e]);
  });
  return out;
}

at::Tensor cpu_normal(uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_, int64_t numel) {
  check_ids(sample_ids_, draw_ids_);
  TORCH_CHECK(numel >= 0, "numel must be non-negative");
  const at::Tensor sample_ids = sample_ids_.contiguous(), draw_ids = draw_ids_.contiguous();
  const int64_t B = sample_ids.size(0);
  at::Tensor out = at::empty({B, numel}, sample_ids.options().dtype(at::kFloat));
  const auto rcs = row_counters(seed, sample_ids, draw_ids);
  float* o = out.data_ptr<float>();
  const Tiling t(B, numel);
  for_each_tile(t, [&](int64_t b, int64_t, int64_t q0, int64_t nq, int64_t e0, int64_t ne) {
    alignas(64) float eps[4 * kTileQuads];
    normal_tile(rcs[b], static_cast<uint64_t>(q0), nq, eps);
    std::copy(eps, eps + ne, o + b * numel + e0);
  });
  return out;
}

at::Tensor cpu_add_noise(const at::Tensor& x0_, const at::Tensor& coef_signal_, const at::Tensor& coef_noise_,
                         uint64_t seed, const at::Tensor& sample_ids_, const at::Tensor& draw_ids_) {
  check_ids(sample_ids_, draw_ids_);
  const int64_t B = sample_ids_.size(0);
  check_rows(x0_, B, "x0");
  check_coefs(coef_signal_, coef_noise_, B);
  const at::Tensor x0 = x0_.contiguous(), cs = coef_signal_.contiguous(), cn = coef_noise_.contiguous();
  const at::Tensor sample_ids = sample_ids_.contiguous(), draw_ids = draw_ids_.contiguous();
  at::Tensor out = at::empty_like(x0);
  const auto rcs = row_counters(seed, sample_ids, draw_ids);
  const Tiling t(B, x0.size(1));
  dispatch_float_type(x0.scalar_type(), "x0", [&](auto tag) {
    using T = decltype(tag);
    add_noise_impl<T>(x0.data_ptr<T>(), cs.data_ptr<float>(), cn.data_ptr<float>(), rcs, t, out.data_ptr<T>());
  });
  return out;
}

at::Tensor cpu_diffusion_loss(const at::Tensor& model_output_, const at::Tensor& x0_, const at::Tensor& coef_signal_,
                              const at::Tensor& coef_noise_, uint64_t seed, const at::Tensor& sample_ids_,
                              const at::Tensor& draw_ids_, const std::string& prediction_type,
                              const std::optional<at::Tensor>& mask_) {
  check_ids(sample_ids_, draw_ids_);
  const int64_t B = sample_ids_.size(0);
  check_rows(x0_, B, "x0");
  check_rows(model_output_, B, "model_output");
  TORCH_CHECK(model_output_.size(1) == x0_.size(1), "model_output and x0 must have the same shape");
  check_coefs(coef_signal_, coef_noise_, B);
  const Prediction pred = parse_prediction(prediction_type);
  const at::Tensor mo = model_output_.contiguous(), x0 = x0_.contiguous();
  const at::Tensor cs = coef_signal_.contiguous(), cn = coef_noise_.contiguous();
  const at::Tensor sample_ids = sample_ids_.contiguous(), draw_ids = draw_ids_.contiguous();
  const int64_t D = x0.size(1);
  at::Tensor mask;
  const float* mask_ptr = nullptr;
  int64_t mask_stride = 0;
  if (mask_.has_value() && mask_->defined()) {
    mask = mask_->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.device().is_cpu(), "mask must be a float32 CPU tensor");
    TORCH_CHECK(mask.dim() == 2 && mask.size(1) == D && (mask.size(0) == 1 || mask.size(0) == B),
                "mask must be [1, D] or [B, D]");
    mask_ptr = mask.data_ptr<float>();
    // One shared row is read by every sample: stride 0 instead of a broadcast copy.
    mask_stride = mask.size(0) == 1 ? 0 : D;
  }
  at::Tensor out = at::empty({B}, x0.options().dtype(at::kFloat));
  const auto rcs = row_counters(seed, sample_ids, draw_ids);
  const Tiling t(B, D);
  dispatch_float_type(mo.scalar_type(), "model_output", [&](auto otag) {
    using O = decltype(otag);
    dispatch_float_type(x0.scalar_type(), "x0", [&](auto xtag) {
      using X = decltype(xtag);
      loss_impl<O, X>(mo.data_ptr<O>(), x0.data_ptr<X>(), cs.data_ptr<float>(), cn.data_ptr<float>(), rcs, t, pred,
                      mask_ptr, mask_stride, out.data_ptr<float>());
    });
  });
  return out;
}

}  // namespace forgetscore
