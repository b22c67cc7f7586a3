// Host side of the resampling ops shared by the CPU and CUDA backends: the schemas, argument checks and outputs.
// Math: cuda/resample_math.h (and python/diffsampler/reference.py, the truth).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "cuda/resample_math.h"
#include "status.h"

namespace diffsampler {

// log_w (G, K) float32, uniforms (G, 1) or (G, K) float64 (sorted per group for multinomial / residual),
// method: 0 systematic, 1 stratified, 2 multinomial, 3 residual; resample a group where ESS < ess_threshold K.
// Returns (log_w_out (G, K) float32, ancestors (G, K) int64 within-group, ess (G,) float32, resampled (G,) bool,
// log_norm (G,) float32).
// Invalid uniforms (ds_uniform_ok) are clamped (ds_unit) and OR DS_ERR_UNIFORM into `status` (int32, one element)
// on the device; the CPU kernel raises instead.
constexpr const char* kResampleAncestorsSchema =
    "resample_ancestors(Tensor log_w, Tensor uniforms, int method, float ess_threshold, Tensor(a!)? status=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";
// particles (G K, ...) or (G, K, ...), any dtype: rows k of resampled groups with ancestors[n, k] != k take row
// ancestors[n, k] of their group, in place. An ancestor outside [0, K) is clamped into range and ORs
// DS_ERR_ANCESTOR into `status` on the device; the CPU kernel raises instead.
constexpr const char* kResampleMoveSchema =
    "resample_move(Tensor(a!) particles, Tensor ancestors, Tensor resampled, Tensor(b!)? status=None) -> ()";


using ResampleOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks the arguments and allocates the outputs on log_w's device.
inline ResampleOutputs resample_outputs(const at::Tensor& log_w, const at::Tensor& uniforms, int64_t method) {
  TORCH_CHECK(log_w.dim() == 2 && log_w.size(0) > 0 && log_w.size(1) > 0,
              "resample_ancestors: log_w must have shape (G, K) with G, K >= 1, got ", log_w.sizes());
  TORCH_CHECK(log_w.scalar_type() == at::kFloat, "resample_ancestors: log_w must be float32, got ",
              log_w.scalar_type());
  const int64_t G = log_w.size(0), K = log_w.size(1);
  TORCH_CHECK(K <= DS_RESAMPLE_MAX_PARTICLES, "resample_ancestors: at most ", DS_RESAMPLE_MAX_PARTICLES,
              " particles per group, got K = ", K);
  TORCH_CHECK(method >= 0 && method <= 3, "resample_ancestors: method must be 0..3, got ", method);
  const int64_t width = method == DS_SYSTEMATIC ? 1 : K;
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 2 && uniforms.size(0) == G &&
                  uniforms.size(1) == width,
              "resample_ancestors: uniforms must be float64 of shape (", G, ", ", width, "), got ",
              uniforms.scalar_type(), " ", uniforms.sizes());
  TORCH_CHECK(uniforms.device() == log_w.device(), "resample_ancestors: uniforms must be on log_w's device");
  const auto f32 = log_w.options().dtype(at::kFloat);
  return {at::empty({G, K}, f32), at::empty({G, K}, log_w.options().dtype(at::kLong)), at::empty({G}, f32),
          at::empty({G}, log_w.options().dtype(at::kBool)), at::empty({G}, f32)};
}

// Checks the move's arguments; returns the bytes of one particle (row).
inline int64_t resample_row_bytes(const at::Tensor& particles, const at::Tensor& ancestors,
                                  const at::Tensor& resampled) {
  TORCH_CHECK(ancestors.dim() == 2 && ancestors.scalar_type() == at::kLong && ancestors.is_contiguous(),
              "resample_move: ancestors must be a contiguous (G, K) int64 tensor");
  const int64_t G = ancestors.size(0), K = ancestors.size(1);
  TORCH_CHECK(resampled.scalar_type() == at::kBool && resampled.dim() == 1 && resampled.size(0) == G &&
                  resampled.is_contiguous(),
              "resample_move: resampled must be a contiguous (G,) bool tensor");
  const bool flat = particles.dim() >= 1 && particles.size(0) == G * K;
  const bool grouped = particles.dim() >= 2 && particles.size(0) == G && particles.size(1) == K;
  TORCH_CHECK(flat || grouped, "resample_move: particles must have shape (G K, ...) or (G, K, ...) with G = ", G,
              ", K = ", K, ", got ", particles.sizes());
  TORCH_CHECK(particles.device() == ancestors.device() && resampled.device() == ancestors.device(),
              "resample_move: particles, ancestors and resampled must be on one device");
  return particles.numel() / (G * K) * static_cast<int64_t>(particles.element_size());
}

}  // namespace diffsampler
