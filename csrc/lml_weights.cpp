// LML's direction weights from the per-sample Gram (diffsampler.lml.correction_weights): one small solve per
// sample on the CPU instead of about 15 torch ops. Per sample b in float64 (math: reference.lml_weights):
//   w = (damping I + C^T G C)^{-1} C^T G e_0,  c = e_0 - C w,  n2 = c^T G c,
//   W = scale (sqrt(G_00 / n2) c - e_0) where n2 > 0, else 0.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <utility>

#include "cuda/update_params.h"

namespace diffsampler {
namespace {

constexpr int kMaxM = 1 + DS_MAX_DIRS;

// Solves a w = rhs for n x n row-major a (overwritten; rhs becomes w): Gaussian elimination with partial pivoting.
void solve(double* a, double* rhs, int n) {
  for (int col = 0; col < n; ++col) {
    int piv = col;
    for (int row = col + 1; row < n; ++row)
      if (std::abs(a[row * n + col]) > std::abs(a[piv * n + col])) piv = row;
    if (piv != col) {
      for (int j = 0; j < n; ++j) std::swap(a[col * n + j], a[piv * n + j]);
      std::swap(rhs[col], rhs[piv]);
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

// One sample: g (m x m), c (m x r), both row-major; writes w (m).
void sample_weights(const double* g, const double* c, int m, int r, double damping, double scale, double* w) {
  double gc[kMaxM * kMaxM];  // G C, m x r
  for (int i = 0; i < m; ++i)
    for (int k = 0; k < r; ++k) {
      double s = 0.0;
      for (int j = 0; j < m; ++j) s += g[i * m + j] * c[j * r + k];
      gc[i * r + k] = s;
    }
  double a[kMaxM * kMaxM], sol[kMaxM];  // damping I + C^T G C and C^T G e_0
  for (int k = 0; k < r; ++k) {
    for (int l = 0; l < r; ++l) {
      double s = 0.0;
      for (int i = 0; i < m; ++i) s += c[i * r + k] * gc[i * r + l];
      a[k * r + l] = s + (k == l ? damping : 0.0);
    }
    sol[k] = 0.0;
    for (int i = 0; i < m; ++i) sol[k] += c[i * r + k] * g[i * m];
  }
  solve(a, sol, r);
  double cv[kMaxM];  // c = e_0 - C w
  for (int i = 0; i < m; ++i) {
    double s = i == 0 ? 1.0 : 0.0;
    for (int k = 0; k < r; ++k) s -= c[i * r + k] * sol[k];
    cv[i] = s;
  }
  double n2 = 0.0;
  for (int i = 0; i < m; ++i) {
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += g[i * m + j] * cv[j];
    n2 += cv[i] * s;
  }
  const bool ok = n2 > 0;  // false for 0 and NaN: the step keeps g
  const double f = ok ? std::sqrt(g[0] / n2) : 0.0;
  for (int i = 0; i < m; ++i) w[i] = ok ? scale * (f * cv[i] - (i == 0 ? 1.0 : 0.0)) : 0.0;
}

// gram (B, M, M) float64, mix (M, r) float64 -> weights (B, M) float64.
constexpr const char* kLmlWeightsSchema = "lml_weights(Tensor gram, Tensor mix, float damping, float scale) -> Tensor";

at::Tensor lml_weights_cpu(const at::Tensor& gram_in, const at::Tensor& mix_in, double damping, double scale) {
  TORCH_CHECK(gram_in.device().is_cpu() && mix_in.device().is_cpu(), "lml_weights_cpu: CPU tensors expected");
  TORCH_CHECK(gram_in.dim() == 3 && gram_in.size(1) == gram_in.size(2) && gram_in.size(1) >= 1 &&
                  gram_in.size(1) <= kMaxM,
              "lml_weights: gram must have shape (B, M, M) with 1 <= M <= ", kMaxM, ", got ", gram_in.sizes());
  const int64_t m = gram_in.size(1);
  TORCH_CHECK(mix_in.dim() == 2 && mix_in.size(0) == m && mix_in.size(1) <= m,
              "lml_weights: mix must have shape (M, r) = (", m, ", r) with r <= M, got ", mix_in.sizes());
  TORCH_CHECK(gram_in.scalar_type() == at::kDouble && mix_in.scalar_type() == at::kDouble,
              "lml_weights: gram and mix must be float64");
  const auto gram = gram_in.contiguous();
  const auto mix = mix_in.contiguous();
  const int64_t batch = gram.size(0);
  const int r = static_cast<int>(mix.size(1));
  auto w = at::empty({batch, m}, gram.options());
  const double* g = gram.data_ptr<double>();
  const double* c = mix.data_ptr<double>();
  double* out = w.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b)
    sample_weights(g + b * m * m, c, static_cast<int>(m), r, damping, scale, out + b * m);
  return w;
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_FRAGMENT(diffsampler, m) { m.def(diffsampler::kLmlWeightsSchema); }

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) { m.impl("lml_weights", &diffsampler::lml_weights_cpu); }
