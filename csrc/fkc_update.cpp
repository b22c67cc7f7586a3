#include "fkc_update.h"

#include <vector>

namespace diffsampler {

std::tuple<at::Tensor, at::Tensor> run_fkc_update(const at::Tensor& x_in, at::TensorList outs,
                                                  at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                                  const FkcLaunch& launch) {
  const int64_t m = static_cast<int64_t>(outs.size());
  TORCH_CHECK(m >= 1 && m <= DS_FKC_MAX_OUTS, "fkc_update: outs must hold 1 to ", DS_FKC_MAX_OUTS, " tensors, got ",
              m);
  const int64_t pairs = m * (m + 1) / 2;
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == 2 + m + pairs, "fkc_update: coeffs must have 2 + M + M (M + 1) "
              "/ 2 = ", 2 + m + pairs, " entries [a, c, e.., w..], got ", coeffs.size());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(0) > 0, "fkc_update: x must have a non-empty batch dim 0");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fkc_update: x must be float32, float16 or bfloat16, got ", dtype);
  ds_fkc_tensors t{};
  std::vector<at::Tensor> keep;
  auto operand = [&](const at::Tensor& v, const char* name) {
    TORCH_CHECK(v.sizes() == x_in.sizes() && v.scalar_type() == dtype && v.device() == x_in.device(), "fkc_update: ",
                name, " must have x's shape, dtype and device");
    keep.push_back(v.contiguous());
    return keep.back().data_ptr();
  };
  t.x = operand(x_in, "x");
  for (int64_t j = 0; j < m; ++j) t.outs[j] = operand(outs[j], "outs[j]");
  if (noise.has_value()) t.noise = operand(*noise, "noise");
  const int64_t batch = x_in.size(0);
  t.n = x_in.numel();
  t.per_sample = t.n / batch;
  t.n_outs = static_cast<int>(m);
  t.a = static_cast<float>(coeffs[0]);
  t.c = static_cast<float>(coeffs[1]);
  for (int64_t j = 0; j < m; ++j) t.e[j] = static_cast<float>(coeffs[2 + j]);
  auto x_next = at::empty_like(keep[0]);
  t.x_next = x_next.data_ptr();
  const int64_t chunks = std::max<int64_t>((t.per_sample + DS_FKC_CHUNK - 1) / DS_FKC_CHUNK, 1);
  for (int64_t p = 0; p < pairs; ++p) t.w[p] = coeffs[2 + m + p];
  auto partial = at::zeros({batch, chunks}, x_in.options().dtype(at::kDouble));
  t.partial = partial.data_ptr<double>();
  const ds_fkc_dtype kind = dtype == at::kFloat ? DS_FKC_FLOAT32 : (dtype == at::kHalf ? DS_FKC_FLOAT16 : DS_FKC_BFLOAT16);
  if (t.n > 0) launch(kind, t);
  return {x_next, chunks == 1 ? partial.view({batch}) : partial.sum(1)};
}

}  // namespace diffsampler
