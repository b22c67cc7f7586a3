// Host side of fkc_update shared by the CPU and CUDA backends: argument checks, contiguous operands, the chunk
// sums and the pair weights of the increment. Math: csrc/cuda/fkc_update.h.
#pragma once
#include <ATen/ATen.h>

#include <functional>

#include "cuda/fkc_update.h"

namespace diffsampler {

using FkcLaunch = std::function<void(ds_fkc_dtype, const ds_fkc_tensors&)>;

// coeffs = [a, c, e_0..e_{M-1}, w_00, w_01, .., w_{M-1,M-1}] for M = len(outs) <= DS_FKC_MAX_OUTS: returns
// (x', increment), increment[b] = sum_{m <= n} w_mn <out_m, out_n>_b in float64 (shape (B,)).
constexpr const char* kFkcUpdateSchema =
    "fkc_update(Tensor x, Tensor[] outs, float[] coeffs, Tensor? noise) -> (Tensor, Tensor)";

std::tuple<at::Tensor, at::Tensor> run_fkc_update(const at::Tensor& x, at::TensorList outs,
                                                  at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                                  const FkcLaunch& launch);

}  // namespace diffsampler
