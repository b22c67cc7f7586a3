// LML's direction weights from the per-sample Gram, shared by the CPU op (csrc/lml_weights.cpp) and the CUDA
// kernel (lml_weights.cu): plain code on fixed-size arrays, no torch headers. Per sample, in float64, with Gram
// the (m x m) Gram matrix of V = [d, dirs...] (d the raw direction) and C the (m x r) mixing matrix (U = V C),
// both row-major (math: reference.lml_weights):
//   w = (damping I + C^T Gram C)^{-1} C^T Gram e_0,  c = e_0 - C w,  n2 = c^T Gram c,
//   W = scale (sqrt(Gram_00 / n2) c - e_0) where n2 > 0, else 0 (also for NaN: the step keeps d).
#pragma once
#include <math.h>
#include <stdint.h>

#include "update_params.h"

#ifdef __CUDACC__
#define DS_HOST_DEVICE __host__ __device__
#else
#define DS_HOST_DEVICE
#endif

#define DS_LML_MAX_M (1 + DS_MAX_DIRS)

// Solves a w = rhs for n x n row-major a (overwritten; rhs becomes w): Gaussian elimination with partial pivoting.
DS_HOST_DEVICE inline void ds_lml_solve(double* a, double* rhs, int n) {
  for (int col = 0; col < n; ++col) {
    int piv = col;
    for (int row = col + 1; row < n; ++row)
      if (fabs(a[row * n + col]) > fabs(a[piv * n + col])) piv = row;
    if (piv != col) {
      for (int j = 0; j < n; ++j) {
        const double tmp = a[col * n + j];
        a[col * n + j] = a[piv * n + j];
        a[piv * n + j] = tmp;
      }
      const double tmp = rhs[col];
      rhs[col] = rhs[piv];
      rhs[piv] = tmp;
    }
    for (int row = col + 1; row < n; ++row) {
      const double f = a[row * n + col] / a[col * n + col];
      for (int j = col; j < n; ++j) a[row * n + j] -= f * a[col * n + j];
      rhs[row] -= f * rhs[col];
    }
  }
  for (int row = n - 1; row >= 0; --row) {
    double s = rhs[row];
    for (int j = row + 1; j < n; ++j) s -= a[row * n + j] * rhs[j];
    rhs[row] = s / a[row * n + row];
  }
}

// One sample: gram (m x m), c (m x r) with m <= DS_LML_MAX_M, r <= m; writes w (m).
DS_HOST_DEVICE inline void ds_lml_sample_weights(const double* gram, const double* c, int m, int r, double damping,
                                                 double scale, double* w) {
  double gram_c[DS_LML_MAX_M * DS_LML_MAX_M];  // Gram C, m x r
  for (int i = 0; i < m; ++i)
    for (int k = 0; k < r; ++k) {
      double s = 0.0;
      for (int j = 0; j < m; ++j) s += gram[i * m + j] * c[j * r + k];
      gram_c[i * r + k] = s;
    }
  double a[DS_LML_MAX_M * DS_LML_MAX_M], sol[DS_LML_MAX_M];  // damping I + C^T Gram C and C^T Gram e_0
  for (int k = 0; k < r; ++k) {
    for (int l = 0; l < r; ++l) {
      double s = 0.0;
      for (int i = 0; i < m; ++i) s += c[i * r + k] * gram_c[i * r + l];
      a[k * r + l] = s + (k == l ? damping : 0.0);
    }
    sol[k] = 0.0;
    for (int i = 0; i < m; ++i) sol[k] += c[i * r + k] * gram[i * m];
  }
  ds_lml_solve(a, sol, r);
  double cv[DS_LML_MAX_M];  // c = e_0 - C w
  for (int i = 0; i < m; ++i) {
    double s = i == 0 ? 1.0 : 0.0;
    for (int k = 0; k < r; ++k) s -= c[i * r + k] * sol[k];
    cv[i] = s;
  }
  double n2 = 0.0;
  for (int i = 0; i < m; ++i) {
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += gram[i * m + j] * cv[j];
    n2 += cv[i] * s;
  }
  const bool ok = n2 > 0;
  const double f = ok ? sqrt(gram[0] / n2) : 0.0;
  for (int i = 0; i < m; ++i) w[i] = ok ? scale * (f * cv[i] - (i == 0 ? 1.0 : 0.0)) : 0.0;
}

#if defined(__CUDACC__) || defined(DS_LML_WEIGHTS_CUDA_LAUNCHER)
#include <cuda_runtime.h>
#ifdef __cplusplus
extern "C" {
#endif
// Device pointers: gram (batch, m, m), mix (m, r), weights (batch, m), all contiguous float64; one thread per
// sample on `stream`. Returns a cudaError_t value (cudaSuccess = 0).
int ds_lml_weights_cuda(const double* gram, const double* mix, int64_t batch, int m, int r, double damping,
                        double scale, double* weights, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
