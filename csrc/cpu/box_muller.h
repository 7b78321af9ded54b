// Vectorisable Box-Muller for the CPU kernels.
//
// libm's logf/sinf/cosf are scalar calls and cost ~15 ns per element, several
// times more than the Philox rounds.  Here log and sin/cos are branch-free
// polynomials in double precision that the compiler vectorises; each result is
// accurate to ~1e-13 before it is rounded to float32, so the floats that enter
// the final product r * cos(theta) are the correctly rounded values (up to rare
// ties), i.e. within the ~1 ulp of any float32 libm, including the one the
// PyTorch reference uses.  The rounding points (float r, float cos/sin, float
// product) mirror the reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "../philox.h"

namespace forgetscore {
namespace bm {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Natural log of a positive normal float, evaluated in double.
inline double log_pos(float x) {
  // x = m * 2**e with m in [sqrt(1/2), sqrt(2)), so that |s| below stays
  // <= 0.172.  Offsetting the bits by (1 - sqrt(1/2)) before splitting picks
  // that range without a branch (branches would stop the vectoriser).
  constexpr uint32_t kSqrtHalfBits = 0x3F3504F3u;
  const uint32_t ix = float_bits(x) + (0x3F800000u - kSqrtHalfBits);
  const int32_t e = static_cast<int32_t>(ix >> 23) - 127;
  const double m = static_cast<double>(bits_float((ix & 0x007FFFFFu) + kSqrtHalfBits));
  const double f = m - 1.0;  // exact
  // log(1 + f) = 2 atanh(s), s = f / (2 + f): odd series in s, 8 terms give
  // a truncation error below s**17 / 17 ~ 1e-14 relative.
  const double s = f / (2.0 + f);
  const double s2 = s * s;
  const double p =
      s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13 + s2 * (1.0 / 15)))))));
  const double log_m = 2.0 * s + 2.0 * s * p;
  return static_cast<double>(e) * 0.6931471805599453 + log_m;
}

// sin and cos of x in [0, 2*pi] (plus a little), evaluated in double.
inline void sincos_small(double x, double* sin_out, double* cos_out) {
  // Nearest multiple of pi/2 by the round-to-nearest shift trick (no libm call,
  // so the loop vectorises).  x < 8 keeps q tiny and the reduction exact enough.
  const double shifter = 6755399441055744.0;  // 1.5 * 2**52
  const double qd = (x * 0.63661977236758134 + shifter) - shifter;
  const int32_t q = static_cast<int32_t>(qd);
  // Cody-Waite: pi/2 split so that qd * kPio2Hi is exact for small q.
  const double kPio2Hi = 1.5707963267341256e+00;  // 32 significant bits
  const double kPio2Lo = 6.0771005065061922e-11;
  const double y = (x - qd * kPio2Hi) - qd * kPio2Lo;
  const double y2 = y * y;
  // Taylor series on |y| <= pi/4: the first omitted terms are < 1e-14.
  const double sy = y + y * y2 *
                            (-1.0 / 6 + y2 * (1.0 / 120 + y2 * (-1.0 / 5040 + y2 * (1.0 / 362880 +
                             y2 * (-1.0 / 39916800 + y2 * (1.0 / 6227020800.0))))));
  const double cy = 1.0 + y2 * (-0.5 + y2 * (1.0 / 24 + y2 * (-1.0 / 720 + y2 * (1.0 / 40320 +
                             y2 * (-1.0 / 3628800 + y2 * (1.0 / 479001600.0 + y2 * (-1.0 / 87178291200.0)))))));
  // Quadrant q: (sin, cos) = (sy, cy), (cy, -sy), (-sy, -cy), (-cy, sy),
  // selected with bit operations so that the loop has no control flow.
  uint64_t sb, cb;
  std::memcpy(&sb, &sy, sizeof sb);
  std::memcpy(&cb, &cy, sizeof cb);
  const uint64_t swap = uint64_t{0} - static_cast<uint64_t>(q & 1);
  uint64_t s_bits = (sb & ~swap) | (cb & swap);
  uint64_t c_bits = (cb & ~swap) | (sb & swap);
  s_bits ^= static_cast<uint64_t>(q & 2) << 62;
  c_bits ^= static_cast<uint64_t>((q + 1) & 2) << 62;
  double s, c;
  std::memcpy(&s, &s_bits, sizeof s);
  std::memcpy(&c, &c_bits, sizeof c);
  *sin_out = s;
  *cos_out = c;
}

// Normals from n_pairs Box-Muller pairs of uint32 lanes (bits[2p], bits[2p+1]).
inline void normals_from_pairs(const uint32_t* __restrict bits, int64_t n_pairs, float* __restrict out) {
  for (int64_t p = 0; p < n_pairs; ++p) {
    const float ua = philox::bits_to_uniform(bits[2 * p]);
    const float ub = philox::bits_to_uniform(bits[2 * p + 1]);
    // theta is rounded to float32 exactly as in the reference.
    const float theta = ub * philox::kTwoPiF;
    const float r = static_cast<float>(std::sqrt(-2.0 * log_pos(ua)));
    double s, c;
    sincos_small(static_cast<double>(theta), &s, &c);
    out[2 * p] = r * static_cast<float>(c);
    out[2 * p + 1] = r * static_cast<float>(s);
  }
}

}  // namespace bm
}  // namespace forgetscore
