// CPU diagonal-Fisher accumulation: fisher += sum_b (G_b^T X_b)**2.
//
// The obvious einsum materialises all B per-sample gradients (B * d_out * d_in
// floats, 64 MiB for a 256x1024 layer at B = 64) and then streams them through
// memory three more times (square, sum, add).  Here fisher is cut into tiles,
// one OpenMP work item per tile; an item walks over the samples, lets ATen's
// GEMM write that sample's gradient tile into a small per-thread scratch that
// stays in cache, and squares it into fisher right away.  Extra memory is a
// few scratch tiles per thread, i.e. O(d_out * d_in) at most, whatever B and L.
// Each fisher element is owned by one item, so there are no atomics and runs
// are reproducible for a given thread count (the tile shape, and with it the
// GEMM's summation order, follows the thread count).
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace forgetscore {
namespace {

// Floats per scratch tile (1 MiB).  Every tile re-reads all of X (or G), so
// tiles should be as large as the cache allows; with this budget a thread
// usually owns one full-width slab of d_out / threads rows.  Timed with B=64,
// L=77 on 256x1024, 320x768 and 640x768 layers: 64 KiB tiles were 1.3-2x
// slower, 1-4 MiB tiles all within noise of each other.
constexpr int64_t kTileFloats = int64_t{1} << 18;
// Half/bfloat16 inputs are widened in blocks of at most this many positions,
// which bounds the conversion buffers when L is large.
constexpr int64_t kWidenFloats = int64_t{1} << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether every square of a contiguous float32 tensor is 0 or a normal float32: |v| in [2**-63, 2**63]. A
// NaN is not, so it takes the exact path, which carries it just the same. (An int flag, not `ok &= bool`:
// only this form is vectorised, and this runs on every L == 1 call.)
bool squares_are_normal(const at::Tensor& t) {
  const float lo = 0x1p-63f, hi = 0x1p63f;
  const float* p = t.data_ptr<float>();
  int bad = 0;
  for (int64_t k = 0, n = t.numel(); k < n; ++k) {
    const float a = std::fabs(p[k]);
    bad |= (a != 0.0f) & ((a < lo) | !(a <= hi));
  }
  return bad == 0;
}

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int64_t tile_floats() {
  // Undocumented knob for tuning runs; not part of the interface.
  if (const char* v = std::getenv("FORGETSCORE_FISHER_TILE_FLOATS")) {
    const long long n = std::atoll(v);
    if (n > 0) return n;
  }
  return kTileFloats;
}

struct Tiles {
  int64_t h, w, rows, cols;
  int64_t count() const { return rows * cols; }
};

// Tile shape: full-width rows when d_out gives every thread enough rows, else
// column blocks too; the tile count is rounded to a multiple of the thread
// count so that a static schedule is balanced.
Tiles plan_tiles(int64_t d_out, int64_t d_in, int64_t threads) {
  const int64_t budget = tile_floats();
  Tiles t{};
  t.cols = 1;
  if (ceil_div(d_out, 8) < threads) t.cols = std::max<int64_t>(1, std::min(threads, ceil_div(d_in, 256)));
  t.w = ceil_div(d_in, t.cols);
  t.cols = ceil_div(d_in, t.w);
  const int64_t h_max = std::max<int64_t>(1, budget / t.w);
  int64_t rows = ceil_div(d_out, h_max);
  rows = ceil_div(ceil_div(rows * t.cols, threads) * threads, t.cols);
  t.h = ceil_div(d_out, std::min(rows, d_out));
  // GEMM kernels work in register blocks of 8+ rows; avoid ragged tiny tiles.
  if (t.h > 8 && d_out > 8) t.h = std::min(d_out, ceil_div(t.h, 8) * 8);
  t.rows = ceil_div(d_out, t.h);
  return t;
}

template <typename F>
void square_into(F* __restrict fisher, int64_t ld, const float* __restrict s, int64_t h, int64_t w) {
  for (int64_t r = 0; r < h; ++r) {
    F* __restrict f = fisher + r * ld;
    const float* __restrict g = s + r * w;
    for (int64_t c = 0; c < w; ++c) f[c] += static_cast<F>(g[c] * g[c]);
  }
}

template <typename F>
void fisher_tiles(const at::Tensor& fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs) {
  const int64_t B = inputs.size(0), L = inputs.size(1), d_in = inputs.size(2), d_out = grad_outputs.size(2);
  const int threads = std::max(1, at::get_num_threads());
  const Tiles t = plan_tiles(d_out, d_in, threads);
  const bool widen = inputs.scalar_type() != at::kFloat;
  const int64_t l_block = widen ? std::max<int64_t>(1, std::min(L, kWidenFloats / std::max(t.w, t.h))) : L;
  F* const fisher_ptr = fisher.data_ptr<F>();
  // Per-thread buffers are allocated here, on the calling thread: the scratch
  // tile, and for half inputs the widened slices of X_b and G_b.
  const int64_t per_thread = t.h * t.w + (widen ? l_block * (t.w + t.h) : 0);
  const at::Tensor buffers = at::empty({threads, per_thread}, inputs.options().dtype(at::kFloat));
  // An exception must not cross the OpenMP region: keep the first, rethrow after.
  std::exception_ptr error;

#pragma omp parallel for schedule(static) num_threads(threads) if (t.count() > 1)
  for (int64_t item = 0; item < t.count(); ++item) {
    try {
      // The GEMMs below run single-threaded: inside a parallel region ATen and
      // the BLAS see omp_in_parallel() and do not fork again.
      c10::NoGradGuard no_grad;
      const at::Tensor mine = buffers.select(0, thread_index());
      const int64_t o0 = (item / t.cols) * t.h, i0 = (item % t.cols) * t.w;
      const int64_t h = std::min(t.h, d_out - o0), w = std::min(t.w, d_in - i0);
      at::Tensor s = mine.narrow(0, 0, h * w).view({h, w});
      at::Tensor xbuf, gbuf;
      if (widen) {
        xbuf = mine.narrow(0, t.h * t.w, l_block * w).view({l_block, w});
        gbuf = mine.narrow(0, t.h * t.w + l_block * t.w, l_block * h).view({l_block, h});
      }
      for (int64_t b = 0; b < B; ++b) {
        // Slices are strided views: the GEMM reads G_b^T through a transpose
        // flag and X_b through its leading dimension, without copies.
        const at::Tensor xb = inputs.select(0, b).narrow(1, i0, w);
        const at::Tensor gb = grad_outputs.select(0, b).narrow(1, o0, h);
        if (!widen) {
          at::mm_out(s, gb.t(), xb);
        } else {
          for (int64_t l0 = 0; l0 < L; l0 += l_block) {
            const int64_t lc = std::min(l_block, L - l0);
            const at::Tensor xw = xbuf.narrow(0, 0, lc).copy_(xb.narrow(0, l0, lc));
            const at::Tensor gw = gbuf.narrow(0, 0, lc).copy_(gb.narrow(0, l0, lc));
            if (l0 == 0)
              at::mm_out(s, gw.t(), xw);
            else
              s.addmm_(gw.t(), xw);
          }
        }
        square_into<F>(fisher_ptr + o0 * d_in + i0, d_in, s.data_ptr<float>(), h, w);
      }
    } catch (...) {
#pragma omp critical(forgetscore_fisher_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

// With one position the per-sample gradient is an outer product g x^T, so sum_b (g_b x_b^T)**2 = (G**2)^T (X**2):
// one GEMM over the batch. The reference squares each product g x, which fits float32 wherever the result
// does, but g**2 and x**2 alone can under- or overflow where (g x)**2 does not (g = 1e20, x = 1e-20). The
// float32 GEMM is used only where no square leaves float32's normal range; otherwise (`exact`) the squares and
// their sum over the batch are formed in double, where no square of a float32 can, and rounded once to float32
// as the reference's float32 sum is, so that an entry is inf exactly where that sum overflows.
void add_outer_squares(const at::Tensor& fisher, const at::Tensor& x, const at::Tensor& g, bool exact) {
  c10::NoGradGuard no_grad;
  if (!exact) {
    const at::Tensor x2 = x.to(at::kFloat).square(), g2 = g.to(at::kFloat).square();
    if (fisher.scalar_type() == at::kFloat)
      fisher.addmm_(g2.t(), x2);
    else
      fisher.add_(at::mm(g2.t(), x2));
    return;
  }
  const at::Tensor x2 = x.to(at::kDouble).square(), g2 = g.to(at::kDouble).square();
  fisher.add_(at::mm(g2.t(), x2).to(at::kFloat));
}

void cpu_fisher_accumulate(const at::Tensor& fisher, const at::Tensor& inputs_, const at::Tensor& grad_outputs_) {
  TORCH_CHECK(fisher.device().is_cpu() && inputs_.device().is_cpu() && grad_outputs_.device().is_cpu(),
              "fisher_accumulate: all tensors must be on the CPU");
  TORCH_CHECK(fisher.scalar_type() == at::kFloat || fisher.scalar_type() == at::kDouble,
              "fisher must be float32 or float64");
  TORCH_CHECK(fisher.is_contiguous(), "fisher must be contiguous (it is updated in place)");
  TORCH_CHECK(inputs_.dim() == 3 && grad_outputs_.dim() == 3, "inputs and grad_outputs must be [B, L, d]");
  const auto st = inputs_.scalar_type();
  TORCH_CHECK(st == grad_outputs_.scalar_type() && (st == at::kFloat || st == at::kHalf || st == at::kBFloat16),
              "inputs and grad_outputs must share one dtype among float32, float16, bfloat16");
  const int64_t B = inputs_.size(0), L = inputs_.size(1), d_in = inputs_.size(2);
  const int64_t d_out = grad_outputs_.size(2);
  TORCH_CHECK(grad_outputs_.size(0) == B && grad_outputs_.size(1) == L, "inputs and grad_outputs disagree on B, L");
  TORCH_CHECK(fisher.dim() == 2 && fisher.size(0) == d_out && fisher.size(1) == d_in, "fisher must be [d_out, d_in]");
  if (B == 0 || L == 0 || d_in == 0 || d_out == 0) return;

  c10::NoGradGuard no_grad;
  const at::Tensor inputs = inputs_.detach().contiguous(), grad_outputs = grad_outputs_.detach().contiguous();

  if (L == 1) {
    const at::Tensor x = inputs.view({B, d_in}).to(at::kFloat), g = grad_outputs.view({B, d_out}).to(at::kFloat);
    add_outer_squares(fisher, x, g, !squares_are_normal(x) || !squares_are_normal(g));
    return;
  }

  if (fisher.scalar_type() == at::kDouble)
    fisher_tiles<double>(fisher, inputs, grad_outputs);
  else
    fisher_tiles<float>(fisher, inputs, grad_outputs);
}

}  // namespace forgetscore
