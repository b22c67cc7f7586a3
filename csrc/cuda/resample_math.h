// The integer resampling pipeline shared by the C++ CPU and CUDA kernels (host and device code; no torch headers).
// Same math as python/diffsampler/reference.py (quantized_weights, quantized_ess, resample_thresholds): exact
// int64 arithmetic plus a fixed sequence of correctly rounded float operations, so every backend gets the same
// ancestors and decisions from the same uniforms (docs/smc.md).
#pragma once
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DS_HD __host__ __device__ __forceinline__
#else
#define DS_HD inline
#endif

#include "error_flags.h"

#define DS_RESAMPLE_MAX_PARTICLES (1 << 17)

enum ds_resample_method { DS_SYSTEMATIC = 0, DS_STRATIFIED = 1, DS_MULTINOMIAL = 2, DS_RESIDUAL = 3 };

// q = floor(2^28 exp(x)) for x = lw - max(lw) <= 0 (x clamped at -32, where q is 0 already):
// X = floor(x 2^24), y = X round(log2(e) 2^30) = log2 weight at scale 2^54, n = floor(y / 2^54) in [-47, 0],
// 2^frac by a degree-9 Taylor polynomial in 2^30 fixed point, then the shift by n.
DS_HD int64_t ds_weight_q(float x) {
  x = x < -32.0f ? -32.0f : x;
  const int64_t X = static_cast<int64_t>(floorf(x * 16777216.0f));
  const int64_t y = X * 1549082005LL;
  const int64_t n = y >> 54;
  const int64_t f = (y - n * (1LL << 54)) >> 24;
  int64_t p = 109;
  p = 1419 + ((p * f) >> 30);
  p = 16377 + ((p * f) >> 30);
  p = 165394 + ((p * f) >> 30);
  p = 1431680 + ((p * f) >> 30);
  p = 10327387 + ((p * f) >> 30);
  p = 59597083 + ((p * f) >> 30);
  p = 257941248 + ((p * f) >> 30);
  p = 744261118 + ((p * f) >> 30);
  p = 1073741824 + ((p * f) >> 30);
  return p >> (2 - n);
}

// The three exact int64 sums of sum q^2 (q = hi 2^14 + lo): hi^2, hi lo, lo^2 of one weight.
DS_HD void ds_square_parts(int64_t q, int64_t& a, int64_t& b, int64_t& c) {
  const int64_t hi = q >> 14, lo = q & ((1 << 14) - 1);
  a = hi * hi;
  b = hi * lo;
  c = lo * lo;
}

// ESS = T^2 / sum q^2 (products by powers of two are exact, so a fused multiply-add gives the same numbers).
DS_HD double ds_ess(int64_t total, int64_t a, int64_t b, int64_t c) {
  const double t = static_cast<double>(total);
  const double sq = static_cast<double>(a) * 268435456.0 + static_cast<double>(b) * 32768.0 + static_cast<double>(c);
  return t * t / sq;
}

// A uniform clamped into [0, 1] (NaN as 0): out-of-range uniforms never give positions outside [0, total).
DS_HD double ds_unit(double u) { return u >= 0.0 ? (u < 1.0 ? u : 1.0) : 0.0; }

// Whether uniform j of a group (width of them) is valid: in [0, 1) and, for multinomial / residual, not below
// uniform j - 1 (they must be sorted). Kernels flag DS_ERR_UNIFORM where it is not.
DS_HD bool ds_uniform_ok(int method, const double* u, int64_t j) {
  const bool in_range = u[j] >= 0.0 && u[j] < 1.0;
  return in_range && (method < DS_MULTINOMIAL || j == 0 || u[j - 1] <= u[j]);
}

// Position of draw j in [0, total): min(floor(u_j total), total - 1), u_j by method (reference.resample_thresholds)
// from the group's uniforms (1 for systematic, K sorted for multinomial and residual) through ds_unit;
// count = residual's R.
DS_HD int64_t ds_position(int method, int64_t j, const double* u, int64_t K, int64_t count, int64_t total) {
  double v;
  if (method == DS_SYSTEMATIC) {
    v = (static_cast<double>(j) + ds_unit(u[0])) / static_cast<double>(K);
  } else if (method == DS_STRATIFIED) {
    v = (static_cast<double>(j) + ds_unit(u[j])) / static_cast<double>(K);
  } else if (method == DS_MULTINOMIAL) {
    v = ds_unit(u[j]);
  } else {
    const double top = ds_unit(u[count < K - 1 ? count : K - 1]);
    v = top > 0 ? ds_unit(u[j]) / top : 0.0;
  }
  const int64_t t = static_cast<int64_t>(v * static_cast<double>(total));
  return t < total ? t : total - 1;
}
