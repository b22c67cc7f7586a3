// lml_weights on the CPU and the op's schema (a fragment of the diffsampler library): LML's direction weights
// from the per-sample Gram (diffsampler.lml.correction_weights), one small solve per sample
// (csrc/cuda/lml_weights.h) instead of about 15 torch ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lml_weights.h"

namespace diffsampler {
namespace {

at::Tensor lml_weights_cpu(const at::Tensor& gram_in, const at::Tensor& mix_in, double damping, double scale) {
  TORCH_CHECK(gram_in.device().is_cpu(), "lml_weights_cpu: gram must be a CPU tensor, got ", gram_in.device());
  const auto [gram, mix] = lml_weights_operands(gram_in, mix_in);
  const int64_t batch = gram.size(0), m = gram.size(1);
  auto w = at::empty({batch, m}, gram.options());
  const double* gram_data = gram.data_ptr<double>();
  const double* c = mix.data_ptr<double>();
  double* out = w.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b)
    ds_lml_sample_weights(gram_data + b * m * m, c, static_cast<int>(m), static_cast<int>(mix.size(1)), damping, scale,
                          out + b * m);
  return w;
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_FRAGMENT(diffsampler, m) { m.def(diffsampler::kLmlWeightsSchema); }

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) { m.impl("lml_weights", &diffsampler::lml_weights_cpu); }
