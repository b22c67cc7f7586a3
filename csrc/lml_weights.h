// Host side of lml_weights (LML's direction weights from the per-sample Gram) shared by the CPU and CUDA
// registrations: the schema and the argument checks. Math: csrc/cuda/lml_weights.h.
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "cuda/lml_weights.h"

namespace diffsampler {

// gram (B, M, M) float64, mix (M, r) float64 -> weights (B, M) float64.
constexpr const char* kLmlWeightsSchema = "lml_weights(Tensor gram, Tensor mix, float damping, float scale) -> Tensor";

// Checks the operands; returns them contiguous.
inline std::pair<at::Tensor, at::Tensor> lml_weights_operands(const at::Tensor& gram, const at::Tensor& mix) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1 &&
                  gram.size(1) <= DS_LML_MAX_M,
              "lml_weights: gram must have shape (B, M, M) with 1 <= M <= ", DS_LML_MAX_M, ", got ", gram.sizes());
  const int64_t m = gram.size(1);
  TORCH_CHECK(mix.dim() == 2 && mix.size(0) == m && mix.size(1) <= m,
              "lml_weights: mix must have shape (M, r) = (", m, ", r) with r <= M, got ", mix.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kDouble && mix.scalar_type() == at::kDouble,
              "lml_weights: gram and mix must be float64");
  TORCH_CHECK(mix.device() == gram.device(), "lml_weights: mix must be on gram's device");
  return {gram.contiguous(), mix.contiguous()};
}

}  // namespace diffsampler
