// Philox4x32-10 counter-based generator, uniform and Box-Muller transforms.
//
// Shared by the C++ (CPU) and CUDA kernels, so it depends on nothing but the
// C standard headers.  The scheme must match forgetscore/kernels/reference.py
// bit for bit: counter (quad, draw_id, sample_id lo, sample_id hi), key
// (seed lo, seed hi), uniform from the top 24 bits.
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS_HOST_DEVICE inline
#endif

namespace forgetscore {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
// float32(2*pi): the reference multiplies the float32 uniform by this float32
// constant, so theta is rounded identically everywhere.
constexpr float kTwoPiF = 6.28318530717958647692f;
// 2**-24: the uniform keeps 24 bits; ((x >> 8) + 0.5) * 2**-24 in float32, rounded alike everywhere.
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;

FS_HOST_DEVICE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  // Written as one 64-bit product so that compilers vectorise it on CPUs
  // (vpmuludq) when the caller loops over many counters.
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// One Philox4x32-10 block.  c and k are taken by value so that callers can keep
// everything in registers; the result overwrites c0..c3.
FS_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                  uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    // Bumping the key after the round (instead of before rounds 1..9) gives
    // the same schedule and keeps the loop body branch-free.
    k0 += kW0;
    k1 += kW1;
  }
}

// Counter of the block that holds quad `quad` of the row (sample_id, draw_id).
struct RowCounter {
  uint32_t c1, c2, c3, k0, k1;
};

FS_HOST_DEVICE RowCounter make_row_counter(uint64_t seed, int64_t sample_id, int64_t draw_id) {
  RowCounter rc;
  const uint64_t sid = static_cast<uint64_t>(sample_id);
  rc.c1 = static_cast<uint32_t>(static_cast<uint64_t>(draw_id));
  rc.c2 = static_cast<uint32_t>(sid);
  rc.c3 = static_cast<uint32_t>(sid >> 32);
  rc.k0 = static_cast<uint32_t>(seed);
  rc.k1 = static_cast<uint32_t>(seed >> 32);
  return rc;
}

FS_HOST_DEVICE void row_block(const RowCounter& rc, uint64_t quad, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(quad), c1 = rc.c1, c2 = rc.c2, c3 = rc.c3;
  philox4x32_10(c0, c1, c2, c3, rc.k0, rc.k1);
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Exact in float32 and strictly inside (0, 1), so log() below is finite.
FS_HOST_DEVICE float bits_to_uniform(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * kTwoPow24Inv;
}

// Box-Muller on one pair of lanes: (r cos theta, r sin theta) with r from
// lane a and theta from lane b.  theta is rounded to float32 as in the
// reference; r, cos and sin are evaluated in double and rounded to float32, so
// they are (almost always) the correctly rounded values, within the ~1 ulp of
// whatever float32 libm the reference runs on.  The vectorised CPU path in
// cpu/box_muller.h rounds at the same points.
FS_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float ua = bits_to_uniform(a);
  const float ub = bits_to_uniform(b);
  const float r = static_cast<float>(sqrt(-2.0 * log(static_cast<double>(ua))));
  const double theta = static_cast<double>(ub * kTwoPiF);
  double s, c;
#if defined(__CUDA_ARCH__)
  sincos(theta, &s, &c);
#else
  s = sin(theta);
  c = cos(theta);
#endif
  *z0 = r * static_cast<float>(c);
  *z1 = r * static_cast<float>(s);
}

// Four normals from one block: lanes (0,1) and (2,3) are the Box-Muller pairs.
FS_HOST_DEVICE void block_to_normals(const uint32_t x[4], float z[4]) {
  box_muller(x[0], x[1], &z[0], &z[1]);
  box_muller(x[2], x[3], &z[2], &z[3]);
}

}  // namespace philox
}  // namespace forgetscore
